"""Tier 2: one ``UserIndex`` per user, in a thread-safe LRU cache bounded in bytes.

A ``UserIndex`` holds what is worth keeping between a user's queries: their lexical index
(``memory.retrieval.bm25``), caught up with the database at each query that finds the user's
``memory_version`` moved. Everything in it can be rebuilt from the database, so evicting it
loses nothing; a user who comes back is loaded from their snapshot (``memory.retrieval.store``).
The embeddings of pending messages are not here: the query model's recent calls hold them
(``memory.inference.recent.RecentEmbeddings``), dropped with that model.
"""

from __future__ import annotations

import threading
import uuid

from cachetools import Cache, LRUCache
from django.conf import settings

from memory.inference import registry
from memory.retrieval import store
from memory.retrieval.bm25 import BM25Index


class UserIndex:
    """One user's lexical index, cached by this process (see the module docstring).

    ``lock`` guards ``index``: hold it for ``sync`` and for every read of the index that
    follows (``memory.retrieval.search`` does). ``loads`` and ``catch_ups`` count how the
    index was kept current, for tests and operators.
    """

    def __init__(self, user_id: uuid.UUID) -> None:
        self.user_id = user_id
        self.lock = threading.Lock()
        self.index: BM25Index | None = None
        self.version: int | None = None
        self.loads = 0
        self.catch_ups = 0

    @property
    def nbytes(self) -> int:
        """What this entry holds, in bytes: its index (estimated)."""
        held = self.index.nbytes if self.index is not None else 0
        return held + 1024

    def sync(self, version: int) -> BM25Index:
        """The index as of ``version`` (the user's ``memory_version``, read by the caller):
        loaded on first use, caught up with the changes since when the version moved, reloaded
        when it cannot be caught up (``store.catch_up``). Caller holds ``lock``."""
        if self.index is None:
            self.index = store.load(self.user_id)
            self.loads += 1
        elif version != self.version:
            if store.catch_up(self.index, self.user_id):
                self.catch_ups += 1
            else:
                self.index = store.load(self.user_id)
                self.loads += 1
        self.version = version
        return self.index


class UserIndexCache(LRUCache):
    """cachetools' ``LRUCache`` bounded in bytes (``maxsize``; each entry's ``nbytes``), that
    counts its hits, misses and evictions (for operators). Not thread-safe by itself, like
    its base: the functions below hold ``_cache_lock``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=lambda entry: entry.nbytes)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def peek(self, key):
        """The entry for ``key`` or ``None``, without making it the most recently used."""
        return Cache.__getitem__(self, key) if key in self else None

    def popitem(self):
        # cachetools evicts through popitem() when an insert would pass maxsize.
        item = super().popitem()
        self.evictions += 1
        return item


_cache_lock = threading.Lock()
_cache: UserIndexCache | None = None


def _max_bytes() -> int:
    return int(settings.MEMFUSE["USER_CACHE_MB"] * 1024 * 1024)


def _user_cache() -> UserIndexCache:
    """The process's cache, created on first use (caller holds ``_cache_lock``)."""
    global _cache
    if _cache is None:
        _cache = UserIndexCache(_max_bytes())
    return _cache


def user_index(user_id: uuid.UUID) -> UserIndex:
    """The process's ``UserIndex`` for ``user_id``, from the LRU cache (``USER_CACHE_MB``)."""
    with _cache_lock:
        cache = _user_cache()
        entry = cache.get(user_id)
        if entry is None:
            cache.misses += 1
            entry = UserIndex(user_id)
            _store(cache, entry)
        else:
            cache.hits += 1
        return entry


def cached_user_index(user_id: uuid.UUID) -> UserIndex | None:
    """The user's ``UserIndex`` if this process has it cached (no lookup is counted)."""
    with _cache_lock:
        return _user_cache().peek(user_id) if _cache is not None else None


def resized(entry: UserIndex) -> None:
    """Account for ``entry``'s new size (after its index was loaded or grew); it may evict
    others, or itself when it alone is over the bound (it then serves this query uncached)."""
    with _cache_lock:
        cache = _user_cache()
        if cache.peek(entry.user_id) is entry:
            _store(cache, entry)


def _store(cache: UserIndexCache, entry: UserIndex) -> None:
    try:
        cache[entry.user_id] = entry
    except ValueError:  # larger than the whole cache
        cache.pop(entry.user_id, None)


def forget(user_id: uuid.UUID) -> None:
    """Drop what this process holds of the user (deleted, or replaced by an import): their
    entry, and the query model's recent calls for them (``registry.forget_recent_embeddings``)."""
    with _cache_lock:
        if _cache is not None:
            _cache.pop(user_id, None)
    registry.forget_recent_embeddings(user_id)


def cache_stats() -> dict:
    """The per-user service cache of this process since start.

    ``{"size", "bytes", "max_bytes", "hits", "misses", "evictions", "hit_rate"}``: entries
    held, their bytes and the bound (``USER_CACHE_MB``); ``hit_rate`` is hits / lookups in
    [0, 1], ``None`` before the first lookup.
    """
    with _cache_lock:
        cache = _user_cache()
        lookups = cache.hits + cache.misses
        return {
            "size": len(cache),
            "bytes": int(cache.currsize),
            "max_bytes": int(cache.maxsize),
            "hits": cache.hits,
            "misses": cache.misses,
            "evictions": cache.evictions,
            "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
        }


def reset_user_cache(*, max_bytes: int | None = None) -> None:
    """Drop every cached ``UserIndex`` and the counters; ``max_bytes`` overrides the setting.

    For tests and for an operator who wants a fresh start; nothing durable is lost.
    """
    global _cache
    with _cache_lock:
        _cache = UserIndexCache(max_bytes or _max_bytes())
