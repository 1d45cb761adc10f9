"""The flush worker pool of a process: bounded workers, a ticker, a heartbeat, and a graceful drain.

Workers take jobs from the durable queue (``services.claim_next_job``: turns over tenants,
then priority, then FIFO) and run them, each for at most a time slice; between jobs they sleep
until woken (a flush request in this process, or a ``flush.request`` on the channel layer for
``runworker``) or until the next poll. The ticker applies the time trigger, recovers work whose
lease expired and purges old finished jobs, every ``FLUSH_TICK_SECONDS``; at start it requests
a flush of everything pending (recovery after a crash). The heartbeat
thread beats for the process and releases the work of dead ones (``buffers.heartbeats``).

When the database cannot be reached (a restart), every thread backs off (up to 2 s between
tries) and the pool logs one line when it goes and one when it is back, no traceback.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import close_old_connections

from buffers import events, heartbeats, pending, recovery, services
from buffers.models import FlushJob, State
from runtime.pool import is_database_unavailable, is_pool_exhausted

logger = logging.getLogger(__name__)


@dataclass
class PoolStats:
    """Counters of one pool since start."""

    jobs_done: int = 0
    jobs_failed: int = 0
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


# Longest wait between two tries of a thread while the database is unreachable: it is back
# in service within this of the database's return.
MAX_BACKOFF_SECONDS = 2.0


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` (1, 2, ...) consecutive failures: 0.5, 1, 2, 2, ... s."""
    return min(0.25 * 2**failures, MAX_BACKOFF_SECONDS)


class DatabaseOutage:
    """A pool's view of the database: one log line when it becomes unreachable, one when it is back.

    Every thread of the pool reports here; only the first failure of an outage and the end of
    it are logged (``WARNING``), whatever the number of threads. The outage ends with a success
    ``QUIET_SECONDS`` after the last failure: while a restart terminates the connections one
    by one, a thread whose connection has not been reached yet still succeeds.
    """

    QUIET_SECONDS = 1.0

    def __init__(self, pool_name: str) -> None:
        self.pool_name = pool_name
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last_failure = 0.0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._last_failure = time.monotonic()
            if self._since is not None:
                return
            self._since = self._last_failure
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("flush workers of %s: database unavailable or busy (%s); backing off until it is back", self.pool_name, first_line)

    def succeeded(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None or time.monotonic() - self._last_failure < self.QUIET_SECONDS:
                return
            since, self._since = self._since, None
        logger.warning("flush workers of %s: database reachable again after %.1f s", self.pool_name, time.monotonic() - since)


class FlushWorkerPool:
    """``workers`` threads running flush jobs, plus a ticker and a heartbeat thread."""

    def __init__(self, *, workers: int, poll_seconds: float | None = None) -> None:
        self.size = workers
        self.poll_seconds = poll_seconds or settings.BUFFERS["TICK_SECONDS"]
        self.name = heartbeats.process_name()
        self.stats = PoolStats()
        self.outage = DatabaseOutage(self.name)
        self._wake = threading.Condition()
        self._pending_wakes = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # Ids of the jobs this pool's workers run now (under stats.lock): the heartbeat
        # releases this process's running jobs that are not among them.
        self._running: set[int] = set()

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
        heartbeat = threading.Thread(target=self._heartbeat, name="flush-heartbeat", daemon=True)
        heartbeat.start()
        self._threads += [ticker, heartbeat]
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
        failures = 0
        while not self._stopping.is_set():
            try:
                job = services.claim_next_job(worker=worker, process=self.name)
                self.outage.succeeded()
                failures = 0
                if job is None:
                    # Give the connection back before sleeping: otherwise each idle worker
                    # keeps a pool connection that requests could use.
                    close_old_connections()
                    self._sleep()
                    continue
                with self.stats.lock:
                    self.stats.busy += 1
                    self._running.add(job.pk)
                try:
                    services.run_job(job)
                finally:
                    with self.stats.lock:
                        self.stats.busy -= 1
                        self._running.discard(job.pk)
                # The job is gone if its user was deleted meanwhile.
                state = FlushJob.objects.filter(pk=job.pk).values_list("state", flat=True).first()
                with self.stats.lock:
                    if state == State.DONE:
                        self.stats.jobs_done += 1
                    elif state == State.FAILED:
                        self.stats.jobs_failed += 1
            except Exception as exc:
                failures += 1
                self._stopping.wait(self._failed(f"flush worker {worker}", exc, failures))
            finally:
                _close_connections()

    def _failed(self, where: str, exc: Exception, failures: int) -> float:
        """Log a thread's failure (the database's once per outage); returns how long to back off (s).

        A pool timeout counts as the database's: while it restarts, the pool cannot connect
        and its requests time out.
        """
        if is_database_unavailable(exc) or is_pool_exhausted(exc):
            self.outage.failed(exc)
            return backoff_delay(failures)
        logger.exception("%s: unexpected error", where)
        return self.poll_seconds

    def _tick(self) -> None:
        first = True
        failures = 0
        while not self._stopping.is_set():
            delay = self.poll_seconds
            try:
                if recovery.recover(all_pending=first):
                    self.wake()
                recovery.purge_finished_jobs()
                first = False
                failures = 0
                self.outage.succeeded()
            except Exception as exc:
                failures += 1
                delay = min(delay, self._failed("flush ticker", exc, failures))
            finally:
                _close_connections()
            self._stopping.wait(delay)

    def _heartbeat(self) -> None:
        """Beat for this process; release the work of dead processes and this one's orphaned jobs."""
        first = True
        failures = 0
        while not self._stopping.is_set():
            delay = self.poll_seconds
            try:
                if heartbeats.beat(name=self.name) and not first:
                    logger.warning("flush workers of %s were taken for dead (no heartbeat in time): their jobs were requeued", self.name)
                first = False
                failures = 0
                self.outage.succeeded()
                if heartbeats.release_dead_processes():
                    self.wake()
                with self.stats.lock:
                    running = set(self._running)
                if heartbeats.release_orphaned_jobs(name=self.name, running=running):
                    self.wake()
            except Exception as exc:
                failures += 1
                delay = min(delay, self._failed("flush heartbeat", exc, failures))
            finally:
                _close_connections()
            self._stopping.wait(delay)

    def drain(self, *, deadline_seconds: float) -> int:
        """Graceful stop: critical flushes for everything pending, run until done or deadline.

        Returns how many messages were still pending at the end (0 when fully drained).
        Pending work left over stays in the database for the next start.
        """
        recovery.request_shutdown_flushes()
        deadline = time.monotonic() + deadline_seconds
        remaining = 0
        while time.monotonic() < deadline:
            self.wake()
            remaining = pending.pending_total()
            if remaining == 0:
                break
            time.sleep(0.1)
        self.stop()
        for thread in self._threads:  # let running flushes finish before the interpreter exits
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if not any(thread.is_alive() for thread in self._threads):
            # Nothing of ours runs any more. With a flush still running, the row stays: once
            # this process is gone, another one's heartbeat releases that flush's claims.
            try:
                heartbeats.forget(name=self.name)
            except Exception as exc:
                self._failed("flush shutdown", exc, 1)
        close_old_connections()
        return remaining

    def stop(self) -> None:
        """Stop taking jobs; running jobs finish in their threads (daemon threads)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        events.set_local_pool(None)


def _close_connections() -> None:
    """``close_old_connections`` for a worker thread's loop; a connection the database already
    closed may fail to close cleanly, which must not end the thread."""
    try:
        close_old_connections()
    except Exception:
        pass


_pool: FlushWorkerPool | None = None
_pool_lock = threading.Lock()
_terminating = threading.Event()  # set by SIGTERM (_exit_on_sigterm)


def local_pool_status() -> dict | None:
    """This process's pool (``FlushWorkerPool.status``), or ``None`` when it runs no workers."""
    pool = _pool
    return pool.status() if pool is not None else None


def start_pool() -> FlushWorkerPool | None:
    """Start this process's pool (once) and drain it at exit within ``FLUSH_SHUTDOWN_SECONDS``;
    ``None`` once a SIGTERM began the process's stop (no pool starts again after the drain)."""
    global _pool
    with _pool_lock:
        if _pool is None and not _terminating.is_set():
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


def stop_pool(*, timeout_seconds: float = 5.0) -> None:
    """Stop this process's pool, if it runs, without draining: its running flushes finish
    (each joined within ``timeout_seconds``), pending work stays for whoever flushes next.
    For tests, whose consumers start the pool in the test process (``FlushConsumer``)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop()
        for thread in pool._threads:
            thread.join(timeout=timeout_seconds)


def _start_background_embedder() -> None:
    try:
        services.hooks().warm_up()
    except Exception:  # the first flush tries again, and its failure is retried with backoff
        logger.exception("could not start the background embedding model")


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM where the entry point has no graceful stop of its own (runworker, runserver):
    drain in a thread (``drain_at_shutdown``), stop the inference processes, exit 0; a second
    SIGTERM exits at once. Not ``sys.exit`` here: an exception raised at whatever point the
    main thread is at can be swallowed there (a finalizer, a library's ``except
    BaseException``), and the process would go on serving after it was told to stop."""
    if _terminating.is_set():
        os._exit(128 + signum)
    _terminating.set()
    threading.Thread(target=_drain_and_exit, name="sigterm-drain").start()


def _drain_and_exit() -> None:
    code = 0
    try:
        drain_at_shutdown()
        # What multiprocessing's exit handler does, which os._exit skips: stop the daemonic
        # children (the inference processes).
        for child in multiprocessing.active_children():
            if child.daemon:
                child.terminate()
    except BaseException:
        logger.exception("shutdown failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


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
