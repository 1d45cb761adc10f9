"""Tier 2: one ``UserIndex`` per user, in a thread-safe LRU cache bounded in bytes.

A ``UserIndex`` holds what is worth keeping between a user's queries: their lexical index
(``memory.retrieval.bm25``), caught up with the database at each query that finds the user's
``memory_version`` moved, and the embeddings of their newest pending messages. Everything in
it can be rebuilt from the database, so evicting it loses nothing; a user who comes back is
loaded from their snapshot (``memory.retrieval.store``).
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future

import numpy as np
from cachetools import Cache, LRUCache
from django.conf import settings

from memory.inference import registry
from memory.retrieval import store
from memory.retrieval.bm25 import BM25Index

# A pending message's embedding as cached (the vector and its dict entry), in bytes.
_PENDING_ENTRY_BYTES = 4 * 384 + 250


class UserIndex:
    """One user's lexical index and pending embeddings, cached by this process (see the module docstring).

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
        self._pending: dict[tuple, Future | np.ndarray] = {}
        self._pending_lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """What this entry holds, in bytes: its index and pending embeddings (estimated)."""
        held = self.index.nbytes if self.index is not None else 0
        return held + len(self._pending) * _PENDING_ENTRY_BYTES + 1024

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

    def prefetch(self, rows: list[tuple[uuid.UUID, object, str]], *, tenant_id: uuid.UUID) -> None:
        """Start embedding pending messages ``[(id, updated_at, text)]`` of this user, of
        ``tenant_id``, that a query will soon need (called after an add), behind every query,
        one text per model call (``registry.read_ahead``)."""
        with self._pending_lock:
            for doc_id, updated_at, text in rows:
                if (doc_id, updated_at) not in self._pending:
                    self._pending[(doc_id, updated_at)] = registry.read_ahead(
                        text, user_id=self.user_id, tenant_id=tenant_id
                    )
            # Only the newest are ever asked for (PENDING_EMBED_MAX): a user who adds and
            # adds without a query keeps no more than that, and the model never embeds the
            # others for nothing (a call a query waits for is not cancelled: promote_query).
            trimmed = list(self._pending)[: max(0, len(self._pending) - settings.MEMFUSE["PENDING_EMBED_MAX"])]
            dropped = [self._pending.pop(key) for key in trimmed]
            kept = {id(entry) for entry in self._pending.values()}  # two messages of one text share a call
            for entry in dropped:
                if isinstance(entry, Future) and id(entry) not in kept:
                    registry.cancel_read_ahead(entry)

    def pending_embeddings(self, rows: list[tuple[uuid.UUID, object, str]]) -> np.ndarray:
        """Embeddings ``(len(rows), dim)`` of pending messages ``[(id, updated_at, text)]``.

        Read your writes: a message not flushed yet is embedded on demand by the query
        model, once per version of its text (cached by ``(id, updated_at)``, or already on its
        way from ``prefetch``); entries of messages not asked for any more are dropped. Raises
        ``memory.inference.EmbeddingProcessError`` when the query process fails.
        """
        keys = [(doc_id, updated_at) for doc_id, updated_at, _ in rows]
        with self._pending_lock:
            self._pending = {key: self._pending[key] for key in keys if key in self._pending}
            for key, (_, _, text) in zip(keys, rows):
                entry = self._pending.get(key)
                # Started by an add behind every query: this query waits for it now, unless it
                # was cancelled past the read-ahead's bound (then asked for again).
                if isinstance(entry, Future) and not registry.promote_query(entry, [text]):
                    entry = None
                if entry is None:
                    self._pending[key] = registry.submit_query([text], scope=self.user_id)
            waiting = [self._pending[key] for key in keys]
        vectors = []
        for key, entry in zip(keys, waiting):
            if isinstance(entry, Future):
                try:
                    entry = entry.result()[0]
                except BaseException:
                    with self._pending_lock:
                        self._pending.pop(key, None)  # the next query asks again
                    raise
                with self._pending_lock:
                    if key in self._pending:
                        self._pending[key] = entry
            vectors.append(entry)
        return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


    def embedded(self, keys: list[tuple[uuid.UUID, object]]) -> dict:
        """The embeddings already computed for pending messages ``[(id, updated_at)]``:
        ``{key: (dim,) float32}``, leaving out those not asked for or still on their way."""
        found = {}
        with self._pending_lock:
            for key in keys:
                entry = self._pending.get(key)
                if isinstance(entry, Future):
                    if not entry.done() or entry.cancelled() or entry.exception() is not None:
                        continue
                    entry = entry.result()[0]
                if entry is not None:
                    found[key] = entry
        return found


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


def embedded_pending(user_id: uuid.UUID, keys: list[tuple[uuid.UUID, object]]) -> dict:
    """``UserIndex.embedded`` of the user if this process has them cached, else ``{}``: what
    a flush may take instead of embedding again (``registry.queries_embed_documents``)."""
    entry = cached_user_index(user_id)
    return entry.embedded(keys) if entry is not None else {}


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
    """Drop the user's entry (the user was deleted)."""
    with _cache_lock:
        if _cache is not None:
            _cache.pop(user_id, None)


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
