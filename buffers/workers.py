"""The flush worker pool of a process: bounded workers, a ticker, and a graceful drain.

Workers take jobs from the durable queue (``services.claim_next_job``: priority, then FIFO)
and run them; between jobs they sleep until woken (a flush request in this process, or a
``flush.request`` on the channel layer for ``runworker``) or until the next poll. The ticker
applies the time trigger and recovers work whose worker died, every ``FLUSH_TICK_SECONDS``;
at start it requests a flush of everything pending (recovery after a crash).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import close_old_connections

from buffers import events, services
from buffers.models import FlushJob, State
from memory import registry

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    """Counters of one pool since start."""

    jobs_done: int = 0
    jobs_failed: int = 0
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class FlushWorkerPool:
    """``workers`` threads running flush jobs, plus one ticker thread."""

    def __init__(self, *, workers: int, poll_seconds: float | None = None) -> None:
        self.size = workers
        self.poll_seconds = poll_seconds or settings.BUFFERS["TICK_SECONDS"]
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = PoolStats()
        self._wake = threading.Condition()
        self._pending_wakes = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def status(self) -> dict:
        """``{"workers", "busy", "jobs_done", "jobs_failed"}``: busy workers now, jobs since start."""
        with self.stats.lock:
            return {"workers": self.size, "busy": self.stats.busy, "jobs_done": self.stats.jobs_done, "jobs_failed": self.stats.jobs_failed}

    def start(self) -> None:
        """Start the workers and the ticker; the ticker first recovers everything pending."""
        for index in range(self.size):
            thread = threading.Thread(target=self._work, args=(f"{self.name}/{index}",), name=f"flush-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        ticker = threading.Thread(target=self._tick, name="flush-ticker", daemon=True)
        ticker.start()
        self._threads.append(ticker)
        events.set_local_pool(self)
        logger.info("flush worker pool started: %d workers", self.size)

    def wake(self) -> None:
        """A job may be waiting: wake one sleeping worker now."""
        with self._wake:
            self._pending_wakes += 1
            self._wake.notify()

    def _sleep(self) -> None:
        with self._wake:
            if self._pending_wakes == 0:
                self._wake.wait(self.poll_seconds)
            self._pending_wakes = max(0, self._pending_wakes - 1)

    def _work(self, worker: str) -> None:
        while not self._stopping.is_set():
            try:
                job = services.claim_next_job(worker=worker)
                if job is None:
                    # Give the connection back before sleeping: idle workers held one pool
                    # connection each (the dashboard showed 6 of 7 in use on an idle server).
                    close_old_connections()
                    self._sleep()
                    continue
                with self.stats.lock:
                    self.stats.busy += 1
                try:
                    services.run_job(job)
                finally:
                    with self.stats.lock:
                        self.stats.busy -= 1
                # The job is gone if its user was deleted meanwhile.
                state = FlushJob.objects.filter(pk=job.pk).values_list("state", flat=True).first()
                with self.stats.lock:
                    if state == State.DONE:
                        self.stats.jobs_done += 1
                    elif state == State.FAILED:
                        self.stats.jobs_failed += 1
            except Exception:
                logger.exception("flush worker %s: unexpected error", worker)
                time.sleep(self.poll_seconds)
            finally:
                close_old_connections()

    def _tick(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                if services.recover(all_pending=first):
                    self.wake()
                first = False
            except Exception:
                logger.exception("flush ticker: unexpected error")
            finally:
                close_old_connections()
            self._stopping.wait(self.poll_seconds)

    def drain(self, *, deadline_seconds: float) -> int:
        """Graceful stop: critical flushes for everything pending, run until done or deadline.

        Returns how many messages were still pending at the end (0 when fully drained).
        Pending work left over stays in the database for the next start.
        """
        services.request_shutdown_flushes()
        deadline = time.monotonic() + deadline_seconds
        remaining = 0
        while time.monotonic() < deadline:
            self.wake()
            remaining = services.pending_total()
            if remaining == 0:
                break
            time.sleep(0.1)
        self.stop()
        for thread in self._threads:  # let running flushes finish before the interpreter exits
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        close_old_connections()
        return remaining

    def stop(self) -> None:
        """Stop taking jobs; running jobs finish in their threads (daemon threads)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        events.set_local_pool(None)


_pool: FlushWorkerPool | None = None
_pool_lock = threading.Lock()


def local_pool_status() -> dict | None:
    """This process's pool (``FlushWorkerPool.status``), or ``None`` when it runs no workers."""
    pool = _pool
    return pool.status() if pool is not None else None


def should_run_in_process(argv: list[str]) -> bool:
    """Whether this process runs flush workers.

    ``runworker`` always; an ASGI server when ``FLUSH_IN_PROCESS`` is ``on``, or ``auto`` with
    the in-memory channel layer (the single-process default). Never migrate, check, tests.
    """
    from memory.registry import should_preload

    mode = settings.BUFFERS["IN_PROCESS"].lower()
    if mode == "off":
        return False
    if len(argv) > 1 and argv[1] == "runworker":
        return True
    if not should_preload(argv) or (len(argv) > 1 and argv[1] in {"locomo_eval", "memfuse_bench"}):
        return False
    if mode == "on":
        return True
    return "InMemory" in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def start_pool() -> FlushWorkerPool:
    """Start this process's pool (once) and drain it at exit within ``FLUSH_SHUTDOWN_SECONDS``."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import atexit

            _pool = FlushWorkerPool(workers=settings.BUFFERS["WORKERS"])
            _pool.start()
            # Load the background model now, beside serving, not at the first flush.
            threading.Thread(target=_start_background_embedder, name="background-embedder-start", daemon=True).start()
            atexit.register(drain_at_shutdown)
            if threading.current_thread() is threading.main_thread():
                # A plain SIGTERM would end the process without running atexit (runworker);
                # an exit lets the drain run. ASGI servers install their own graceful handler.
                signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return _pool


def _start_background_embedder() -> None:
    try:
        registry.start_background_embedder()
    except Exception:  # the first flush tries again, and its failure is retried with backoff
        logger.exception("could not start the background embedding model")


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(0)


def drain_at_shutdown() -> None:
    """Drain this process's pool once (``FlushWorkerPool.drain``), within ``FLUSH_SHUTDOWN_SECONDS``.

    Called by the ASGI lifespan's shutdown (uvicorn: its graceful stop ends with the default
    SIGTERM action, so atexit would never run) and at exit (daphne, runserver, runworker);
    whichever comes first drains, the other returns at once. Blocks: call it from a thread.
    """
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is None:
        return
    remaining = pool.drain(deadline_seconds=settings.BUFFERS["SHUTDOWN_SECONDS"])
    if remaining:
        logger.warning("shutdown: %d messages still pending; they are flushed at the next start", remaining)
    else:
        logger.info("shutdown: every pending message flushed")


def start_if_serving() -> None:
    if should_run_in_process(sys.argv):
        start_pool()
