"""``RecentEmbeddings``: the query model's recent one-text calls by user and text, the one
holder of pending messages' embeddings in a process (``memory.inference.model_registry``
keeps one in its ``_recent`` slot)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from concurrent.futures import Future, wait

import numpy as np
from cachetools import Cache, LRUCache


class RecentEmbeddings:
    """The query model's recent one-text calls, by scope (a user) and text: the one holder in
    this process of the embeddings of a user's pending messages (read your writes: an add
    starts them, a query waits for them, a flush writes them) and of their recent queries.

    Two levels of cachetools' ``LRUCache``: the scopes, bounded by their entries in all
    (``maxsize``; the least recently used scope goes first, whole), and in each scope its
    texts, at most ``per_scope`` (so that one user's flood of texts never evicts the others'
    pending embeddings). A scope is known by ``str(scope)`` (a user's id, as ``UUID`` or text),
    a text by a 16-byte BLAKE2b digest of it, so that a long message costs no more than a
    short one. Thread-safe. A call under way is held as its
    future, a finished one as its rows alone (a future and its condition variable would
    double the entry); a failed or cancelled call is forgotten, so the next caller asks the
    model again. ``maxsize`` or ``per_scope`` 0 keeps nothing. Memory: about 2.1 KB a
    finished entry at 384 dimensions (``RECENT_EMBEDDINGS``).
    """

    def __init__(self, maxsize: int, per_scope: int) -> None:
        self.maxsize = max(0, maxsize)
        self.per_scope = max(0, min(per_scope, self.maxsize))
        self._lock = threading.Lock()
        # str(scope) -> LRUCache(text digest -> Future | (1, dim) float32), sized by its entries.
        self._scopes: LRUCache | None = LRUCache(maxsize=self.maxsize, getsizeof=len) if self.per_scope > 0 else None

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, scope: Hashable, text: str) -> Future | None:
        """The future of ``text``'s call for ``scope`` (a finished one: a new, done future of its
        rows), if it is recent and has not failed."""
        if self._scopes is None:
            return None
        with self._lock:
            texts = self._scopes.get(str(scope))
            entry = texts.get(self._key(text)) if texts is not None else None
        if isinstance(entry, np.ndarray):
            future: Future = Future()
            future.set_result(entry)
            return future
        if entry is not None and entry.done() and (entry.cancelled() or entry.exception() is not None):
            return None
        return entry

    def put(self, scope: Hashable, text: str, future: Future) -> None:
        """Remember ``future`` as ``text``'s call for ``scope``: its rows once it succeeds, nothing
        if it fails or is cancelled."""
        if self._scopes is None:
            return
        scope, key = str(scope), self._key(text)
        with self._lock:
            texts = self._scopes.get(scope)
            if texts is None:
                texts = LRUCache(maxsize=self.per_scope)
            texts[key] = future
            self._scopes[scope] = texts  # accounts for its new size: may evict other scopes

        def settle(done: Future) -> None:
            failed = done.cancelled() or done.exception() is not None
            # A copy: the rows may be a view of a whole batch's array, which it would keep alive.
            rows = None if failed else np.array(done.result(), dtype=np.float32)
            with self._lock:
                held = _peek(self._scopes, scope)
                if held is None or _peek(held, key) is not done:
                    return
                if not failed:
                    # Cache's own setter keeps the entry's place in the LRU order: finishing is no use.
                    Cache.__setitem__(held, key, rows)
                    return
                del held[key]
                if held:
                    self._scopes[scope] = held
                else:
                    del self._scopes[scope]

        future.add_done_callback(settle)

    def forget(self, scope: Hashable) -> None:
        """Drop every entry of ``scope`` (a deleted user's texts)."""
        if self._scopes is not None:
            with self._lock:
                self._scopes.pop(str(scope), None)

    def embeddings(self, scope: Hashable, texts: list[str], *, wait_seconds: float = 0.0) -> dict[str, np.ndarray]:
        """``{text: (dim,) float32}`` of those of ``texts`` whose call for ``scope`` has
        succeeded, waiting up to ``wait_seconds`` in all for the calls still under way."""
        futures = {text: future for text in texts if (future := self.get(scope, text)) is not None}
        if wait_seconds > 0:
            wait(list(futures.values()), timeout=wait_seconds)
        return {
            text: future.result()[0]
            for text, future in futures.items()
            if future.done() and not future.cancelled() and future.exception() is None
        }

    def stats(self) -> dict:
        """``{"entries", "under_way", "users", "max_entries", "max_per_user"}``: the calls held
        (``under_way``: of them, those not finished), the scopes holding them, and the bounds."""
        with self._lock:
            scopes = list(self._scopes.values()) if self._scopes is not None else []
            entries = [entry for texts in scopes for entry in texts.values()]
        return {
            "entries": len(entries),
            "under_way": sum(1 for entry in entries if isinstance(entry, Future)),
            "users": len(scopes),
            "max_entries": self.maxsize,
            "max_per_user": self.per_scope,
        }


def _peek(cache: LRUCache, key: Hashable):
    """``cache[key]`` or ``None``, without making it the most recently used."""
    return Cache.__getitem__(cache, key) if key in cache else None
