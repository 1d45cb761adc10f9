"""The embedding model in a child process (``ProcessEmbedder``) and that child's main."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from memory.inference.encoders import Embedder, ModelStats, QueryEmbedder

logger = logging.getLogger(__name__)


def _serve_embeddings(path: str, batch_size: int, threads: int, nice: int, conns, int8: bool = False) -> None:
    """Main of an inference process (see ``ProcessEmbedder``).

    Loads the model (with ``int8``, the ``QueryEmbedder`` built from it, taking as many calls
    at once as there are ``conns``), answers ``("ready", dimension, load_seconds, traced)`` on
    the first connection, then serves each connection in a thread of its own: for each list
    of texts received it answers ``("ok", (n, dim) float32 array)`` or ``("error", message)``.
    Exits when the parent's end of the first pipe closes (the parent exited, even by SIGKILL).
    """
    import signal

    from runtime.heap import limit_malloc_arenas

    # Each connection's thread would otherwise keep a malloc arena of its own (see there).
    limit_malloc_arenas()
    # Ctrl-C reaches the whole process group: the parent's graceful drain still needs this
    # process, which ends with the parent (pipe closed) or by multiprocessing's exit handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    if nice and hasattr(os, "SCHED_IDLE"):
        # Linux's idle scheduling class, inherited by torch's threads: the model runs only on
        # CPU time nothing else wants, and a request waking up preempts it at once: niceness
        # alone still lets it delay the adds' tail latency (memfuse_bench ingest,
        # docs/benchmarks.md), while the model keeps the cores the requests leave.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # not permitted here: niceness still applies
    started = time.perf_counter()
    try:
        embedder = Embedder(Path(path), batch_size=batch_size, threads=threads)
        if int8:
            embedder = QueryEmbedder(embedder, keep_full_model=False, concurrency=len(conns))
    except Exception as exc:  # reported to the parent, which raises it
        conns[0].send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conns[0].send(("ready", embedder.dimension, time.perf_counter() - started, getattr(embedder, "traced", False)))
    for conn in conns[1:]:
        threading.Thread(target=_serve_connection, args=(embedder, conn), daemon=True).start()
    _serve_connection(embedder, conns[0])


def _serve_connection(embedder, conn) -> None:
    """Answer one connection's requests until its pipe closes (see ``_serve_embeddings``)."""
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", embedder.embed(texts)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EmbeddingProcessError(RuntimeError):
    """An inference process (``ProcessEmbedder``) failed or died. A flush that meets it is
    retried; a query answers 503."""


class ProcessEmbedder:
    """The embedding model in a child process: for flushes (``role="background"``) and, by
    default, for queries (``role="query"``, ``QUERY_EMBEDDING="process"``).

    Same interface as ``Embedder``. A flush embeds hundreds of texts per call; in the serving
    process that inference holds the GIL for its Python parts and, lowered in priority, keeps
    it while descheduled, so request threads wait behind it (add p99 in seconds at 100 adds/s).
    In its own process, niced (``EMBEDDING_NICE``) and in the idle scheduling class (Linux's
    ``SCHED_IDLE``), it takes only the CPU that requests leave.

    A query's embedding is one short text, but in the serving process its few hundred tensor
    operations each give the GIL up and wait to take it back from the request threads; the
    web process, whose one GIL bounds its throughput, also pays the model's Python time. In a
    child (at normal priority, ``int8``: the ``QueryEmbedder``) it runs on the other core.

    ``concurrency`` (int8 only): calls the child runs at once, each over a pipe of its own and
    on a thread of its own, sharing the one model: a query need not wait for the pending
    messages another caller is having embedded, and a burst's pending messages are embedded
    on every core.

    The child is spawned at construction (``wait_ready`` or the first ``embed`` waits for its
    model) and again after it dies: texts go over a pipe, vectors come back (``(n, dim)``
    float32, 1.5 KB per text). One model per process, as everywhere.
    """

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int,
        threads: int,
        nice: int,
        role: str = "background",
        int8: bool = False,
        concurrency: int = 1,
    ) -> None:
        self.path = path
        self.role = role
        self.int8 = int8
        self.concurrency = max(1, concurrency) if int8 else 1
        self.traced = False
        self._args = (str(path), batch_size, threads, nice)
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue | None = None  # the parent's ends of the pipes, when free
        self._conns: list = []
        self._process = None
        self._starting = None
        self.dimension = 0
        self.stats = ModelStats()
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        import multiprocessing

        # Not fork: a child forked from this process would inherit its threads' locks and torch
        # state. The forkserver is a clean process that imported torch and sentence-transformers
        # once (memory.inference.preload): its children only load their model, where a spawned
        # one would import them again first (docs/benchmarks.md, "soak_bench respawn").
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["memory.inference.preload"])
        pipes = [context.Pipe() for _ in range(self.concurrency)]
        process = context.Process(
            target=_serve_embeddings,
            args=(*self._args, [child for _, child in pipes], self.int8),
            name=f"memfuse-{self.role}-embedder",
            daemon=True,
        )
        process.start()
        for _, child in pipes:
            child.close()
        self._starting = ([parent for parent, _ in pipes], process)

    def _start(self) -> None:
        """Wait for the spawned child's model (spawning one first if none is on its way).
        Caller holds ``_lock``."""
        if self._starting is None:
            self._spawn()
        (conns, process), self._starting = self._starting, None
        try:
            reply = conns[0].recv()
        except EOFError:
            reply = ("error", f"exited with code {process.exitcode} before loading the model")
        if reply[0] != "ready":
            process.join(timeout=5)
            for conn in conns:
                conn.close()
            raise EmbeddingProcessError(f"{self.role} embedding process: {reply[1]}")
        self._conns, self._process = conns, process
        self._idle = queue.SimpleQueue()
        for conn in conns:
            self._idle.put(conn)
        self.dimension = reply[1]
        self.stats.load_seconds = reply[2]
        self.traced = reply[3]
        logger.info("%s embedding process %d ready (model loaded in %.2f s)", self.role, process.pid, reply[2])

    def wait_ready(self) -> None:
        """Block until the child has loaded its model. Raises ``EmbeddingProcessError``."""
        with self._lock:
            if self._idle is None:
                self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in the child: ``(len(texts), dim)`` float32, L2-normalised rows.

        Up to ``concurrency`` callers are served at once; more wait for a free pipe. Raises
        ``EmbeddingProcessError`` when the child fails or dies (a new one is started for the
        next call).
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            if self._idle is None:
                self._start()
            idle = self._idle
        conn = idle.get()
        started = time.perf_counter()
        try:
            conn.send(list(texts))
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:
            self._lost(idle)
            raise EmbeddingProcessError(f"{self.role} embedding process died: {exc!r}") from exc
        idle.put(conn)
        elapsed = time.perf_counter() - started
        if status != "ok":
            raise EmbeddingProcessError(f"{self.role} embedding failed: {payload}")
        self.stats.record(texts=len(texts), seconds=elapsed)
        return payload

    def _lost(self, idle: queue.SimpleQueue) -> None:
        """The child of ``idle``'s pipes died: forget it (once), and release its other callers."""
        with self._lock:
            if self._idle is not idle:
                return  # another caller saw it first
            conns, process = self._conns, self._process
            self._idle, self._conns, self._process = None, [], None
        # A caller blocked in recv() on another pipe gets EOF from the dead child; one waiting
        # for a free pipe gets one of these, and fails on it the same way.
        for conn in conns:
            idle.put(conn)
        if process is not None:
            process.join(timeout=0)

    def close(self) -> None:
        with self._lock:
            if self._starting is not None:
                self._conns, self._process = self._starting
                self._starting = None
            conns, process = self._conns, self._process
            self._idle, self._conns, self._process = None, [], None
        for conn in conns:
            conn.close()
        if process is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
