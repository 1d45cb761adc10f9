"""One model call for the embedding requests of many callers (``EmbeddingBatcher``)."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from memory.inference.encoders import Embedder, QueryEmbedder
    from memory.inference.process import ProcessEmbedder

logger = logging.getLogger(__name__)

INTERACTIVE, BACKGROUND = 0, 1


class EmbeddingBatcher:
    """Feeds one model call with the embedding requests of many callers.

    Callers (queries, flushes of many users) submit texts and wait on a future; one model
    thread takes every request waiting when the model is free, up to ``max_texts`` texts,
    embeds them in one batched call and hands each caller its rows. While the model is busy,
    new requests pile up and go together into the next call: the model's batched throughput,
    well above its one-at-a-time rate, is the ceiling of the ingest path. Interactive
    requests (queries) go before background ones (flushes).
    ``workers`` model threads take requests at once, for a model that runs that many calls
    in parallel (a ``ProcessEmbedder`` of that ``concurrency``); with more than one, the first
    takes interactive requests only, so a query never waits for background texts to finish.

    Requests submitted with ``bounds`` (read-ahead: texts a query may soon want) are bounded
    per key: past a key's bound the oldest of its queued requests is cancelled, and never
    embedded. Cancelled entries are dropped from the queue as they pile up (``_purge``), so a
    flood of bounded requests holds at most its bounds, plus a few cancelled entries.
    """

    def __init__(
        self,
        embedder: Embedder | QueryEmbedder | ProcessEmbedder,
        *,
        max_texts: int,
        nice: int = 0,
        linger_seconds: float = 0.0,
        workers: int = 1,
    ) -> None:
        self.embedder = embedder
        self.max_texts = max_texts
        self.nice = nice
        self.linger_seconds = linger_seconds
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._interactive_queued = threading.Event()  # wakes the interactive-only worker
        # Bounded requests still queued, by key (oldest first), and the keys of each. Guarded by
        # _bounds_lock, taken before the queue's own mutex, never after it.
        self._lanes: dict[Hashable, OrderedDict[Future, None]] = {}
        self._keys_of: dict[Future, tuple[Hashable, ...]] = {}
        self._bounds_lock = threading.Lock()
        self._cancelled = 0  # cancellations since the last purge
        workers = max(1, workers)
        self._threads = [
            threading.Thread(target=self._run, args=(i == 0 and workers > 1,), name=f"embedding-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def embed(self, texts: list[str], *, priority: int = INTERACTIVE) -> np.ndarray:
        """Embed ``texts`` in the next model call: ``(n, dim)`` float32, L2-normalised rows."""
        return self.submit(texts, priority=priority).result()

    def submit(
        self, texts: list[str], *, priority: int = INTERACTIVE, bounds: Sequence[tuple[Hashable, int]] = ()
    ) -> Future:
        """``embed`` without waiting: a ``Future`` of the ``(n, dim)`` rows.

        ``bounds``: ``[(key, most)]``: at most ``most`` requests submitted with ``key`` stay
        queued at once; past it the oldest of them is cancelled (its future is cancelled and it
        is never embedded). A request leaves its bounds when the model takes it, when it is
        promoted (a caller waits for it: ``promote``) or cancelled.
        """
        future: Future = Future()
        if not texts:
            future.set_result(np.zeros((0, self.embedder.dimension), dtype=np.float32))
            return future
        if not bounds:
            self._put(priority, list(texts), future)
            return future
        with self._bounds_lock:
            # In its bounds before a model thread can take it (_take leaves them).
            self._keys_of[future] = tuple(key for key, _ in bounds)
            for key, _ in bounds:
                self._lanes.setdefault(key, OrderedDict())[future] = None
            self._put(priority, list(texts), future)
            for key, most in bounds:
                lane = self._lanes.get(key)
                while lane and len(lane) > max(0, most):
                    self._cancel_locked(next(iter(lane)))
        return future

    def _put(self, priority: int, texts: list[str], future: Future) -> None:
        self._queue.put((priority, next(self._order), texts, future))
        if priority == INTERACTIVE:
            self._interactive_queued.set()

    def cancel(self, future: Future) -> bool:
        """Cancel a bounded request still queued (one nobody waits for: not promoted), so it is
        never embedded; returns whether it was. Any other future is left alone."""
        with self._bounds_lock:
            if future not in self._keys_of:
                return False
            self._cancel_locked(future)
            return future.cancelled()

    def queued(self, key: Hashable) -> int:
        """Requests submitted with bound ``key`` that are still queued (for operators and tests)."""
        with self._bounds_lock:
            return len(self._lanes.get(key, ()))

    def _cancel_locked(self, future: Future) -> None:
        """Drop ``future`` from its bounds and cancel it (a no-op once the model took it).
        Caller holds ``_bounds_lock``."""
        self._unbound_locked(future)
        if future.cancel():
            self._cancelled += 1
            if self._cancelled >= max(64, self._queue.qsize() // 2):
                self._purge()

    def _unbound_locked(self, future: Future) -> None:
        for key in self._keys_of.pop(future, ()):
            lane = self._lanes.get(key)
            if lane is not None:
                lane.pop(future, None)
                if not lane:
                    del self._lanes[key]

    def _purge(self) -> None:
        """Drop the entries of cancelled (or already taken) requests from the queue: the model
        threads would skip them, but until then each holds its texts. Amortised O(1) per
        cancellation (called once they are half the queue)."""
        self._cancelled = 0
        # queue.PriorityQueue keeps its heap in ``queue`` under ``mutex`` (CPython's queue.py);
        # rebuilding it in place under that lock is what its own methods do.
        with self._queue.mutex:
            heap = self._queue.queue
            heap[:] = [entry for entry in heap if not (entry[3].done() or entry[3].running())]
            heapq.heapify(heap)

    def promote(self, future: Future, texts: list[str], *, priority: int = INTERACTIVE) -> bool:
        """Queue ``future``'s request (of ``texts``, as submitted) again at ``priority``: a caller
        now waits for what was submitted as background work, and must not wait behind every
        interactive request. Whichever entry the model thread takes first runs it; the other
        is skipped. The request leaves its bounds: it is never cancelled from now on. Returns
        ``False`` when it was cancelled already (past its bound): the caller asks again."""
        with self._bounds_lock:
            if future.cancelled():
                return False
            self._unbound_locked(future)
            if not (future.running() or future.done()):
                self._put(priority, list(texts), future)
        return True

    def _take(self, future: Future) -> bool:
        """Mark a queued request's future running; ``False`` if another entry of it (``promote``)
        was taken already, or it was cancelled. A bounded request leaves its bounds: it is no
        longer queued. Called by the model threads only."""
        if future.running() or future.done():
            return False
        if not future.set_running_or_notify_cancel():
            return False
        if future in self._keys_of:  # a read without the lock: only bounded requests need it
            with self._bounds_lock:
                self._unbound_locked(future)
        return True

    def _run(self, interactive_only: bool = False) -> None:
        nice = self.nice
        if nice and hasattr(os, "setpriority"):
            # Background inference in this process runs below request handling. Linux niceness
            # is per thread, and torch's intra-op threads, created by this thread's first
            # inference, inherit it.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError:
                logger.warning("could not lower the embedding thread's priority", exc_info=True)
        while True:
            if interactive_only:
                self._interactive_queued.clear()
            request = self._queue.get()
            if interactive_only and request[0] != INTERACTIVE:
                # The queue's best is background work: leave it to the other workers and wait
                # for the next interactive request (no busy loop: cleared before the get).
                self._queue.put(request)
                self._interactive_queued.wait()
                continue
            if not self._take(request[3]):
                continue  # promoted, and taken at its other entry already (or cancelled)
            requests = [request]
            size = len(requests[0][2])
            priority = requests[0][0]
            # Background batches wait up to linger_seconds for more texts: one large call embeds
            # faster per text than several small ones (less padding, fewer calls), and a
            # flush does not mind 0.1 s.
            linger_until = time.monotonic() + self.linger_seconds
            while size < self.max_texts:
                try:
                    remaining = linger_until - time.monotonic()
                    request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request[0] != priority:
                    # A lower priority waits for the next call: an interactive request is
                    # never held back by background texts merged into its call.
                    self._queue.put(request)
                    break
                if not self._take(request[3]):
                    continue
                requests.append(request)
                size += len(request[2])
            texts = [text for _, _, batch, _ in requests for text in batch]
            try:
                vectors = self.embedder.embed(texts)
            except BaseException as exc:  # hand the failure to every caller of this batch
                for *_, future in requests:
                    future.set_exception(exc)
                continue
            start = 0
            for _, _, batch, future in requests:
                future.set_result(vectors[start : start + len(batch)])
                start += len(batch)
