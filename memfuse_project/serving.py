"""What this process serves, declared by its entry point, and the start-up step of a serving process.

A process serves only when its entry point says so with ``declare(role)`` before Django starts:

- ``WEB``: HTTP and WebSocket (``asgi.py``, ``wsgi.py``, ``manage.py runserver``): the query
  model; flush workers too when ``FLUSH_IN_PROCESS`` says this process runs them; the
  dashboard's sampler;
- ``WORKER``: ``manage.py runworker``: the flushes' model and the flush workers, no query model;
- ``TOOL``: a tool running retrieval in its own process (benchmarks, evaluations): the query
  model, nothing else.

Nothing is declared in every other process (``migrate``, ``check``, ``shell``, tests): it loads
a model on its first use and starts no thread. ``MemoryConfig.ready()`` fills the model registry
of a declared process (``memory.inference.registry.preload``); ``start()`` is the rest of the
start-up, run by each entry point once the process is about to serve: the embedded database
(started, migrated, with its development tenant), the flush workers and the sampler.

The role lives in this module, not in the environment, so that processes started by a
serving one (a benchmark's server, ``runserver``'s autoreloader child) declare their own.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

WEB, WORKER, TOOL = "web", "worker", "tool"
ROLES = (WEB, WORKER, TOOL)

_role: str | None = None
_started = False
_start_lock = threading.Lock()


def declare(role: str) -> None:
    """Declare that this process serves as ``role`` (``WEB``, ``WORKER`` or ``TOOL``).

    Call it before ``django.setup()``, so that ``MemoryConfig.ready()`` loads the models. A
    command declaring itself once Django runs (a tool's ``handle``) has the models loaded
    here instead. A ``WEB`` or ``WORKER`` process caps glibc's malloc arenas here
    (``limit_malloc_arenas``). Raises ``ValueError`` for an unknown role.
    """
    global _role
    if role not in ROLES:
        raise ValueError(f"unknown serving role {role!r}; one of {', '.join(ROLES)}")
    _role = role
    if role in (WEB, WORKER):
        # Before the model loading and the pool start threads: each thread's first allocation
        # gets it an arena of its own while there is no cap, and glibc never removes one.
        limit_malloc_arenas()
    from django.apps import apps

    if apps.ready:
        preload_models()


def role() -> str | None:
    """The role this process declared, or ``None`` when it does not serve."""
    return _role


def runs_flush_workers() -> bool:
    """Whether this process runs flush workers: a ``WORKER`` always; a ``WEB`` server when
    ``FLUSH_IN_PROCESS`` is ``on``, or ``auto`` with the in-memory channel layer (one process
    does everything); never with ``off``, nor a ``TOOL`` or an undeclared process."""
    from django.conf import settings

    mode = settings.BUFFERS["IN_PROCESS"].lower()
    if mode == "off" or _role not in (WEB, WORKER):
        return False
    if _role == WORKER or mode == "on":
        return True
    return "InMemory" in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def preload_models() -> None:
    """Load the models this process's role needs (``MemoryConfig.ready()`` calls it); nothing
    when no role is declared or ``PRELOAD_MODELS`` is off. A worker embeds no query, so it
    loads no query model. Raises ``EmbeddingProcessError`` or ``RerankerLoadError`` when a
    model fails to load."""
    from django.conf import settings

    if _role is None or not settings.MEMFUSE["PRELOAD_MODELS"]:
        return
    from memory.inference import registry

    registry.preload(queries=_role != WORKER, documents=runs_flush_workers())


# glibc's mallopt() parameter for the most arenas (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc at ``MALLOC_ARENAS`` arenas in this process (``mallopt(M_ARENA_MAX)``),
    unless ``MALLOC_ARENA_MAX`` is in the environment (glibc read it at start) or the C
    library is not glibc. Returns whether it set the cap.

    glibc gives threads that allocate at the same time arenas of their own, up to eight per
    core, and keeps what is freed in each; a server's request threads and flush workers (and an
    inference process's connection threads) then hold memory that no thread uses any more, and
    the process grows for hours under a steady load (docs/benchmarks.md, the soak). Python's
    own objects come from its allocator's pools, whatever the arenas; what the cap slows is C
    code's allocations (psycopg, numpy), which wait for a lock a little more often.
    """
    import os

    from memfuse_project.heap import glibc

    libc = glibc()
    if "MALLOC_ARENA_MAX" in os.environ or libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def start() -> None:
    """The start-up of a serving process, once (later calls return at once, concurrent ones
    wait for the first); nothing in a process that declared no role (tests).

    On the embedded default (no ``DATABASE_URL``): starts the database, migrates it and
    creates the development tenant (``memfuse_project.embedded_pg``). Then starts this
    process's flush workers (``runs_flush_workers``) and, for ``WEB``, the dashboard's
    sampler, and closes the connections the calling thread used. Must not run on an event
    loop's thread: it does database work.
    """
    global _started
    with _start_lock:
        if _started or _role is None:
            return
        from django.db import connections

        from buffers import workers
        from memfuse_project import embedded_pg
        from memory import metrics_history
        from memory.facts import worker as facts_worker

        embedded_pg.start_if_embedded()
        embedded_pg.migrate_if_embedded()
        embedded_pg.local_tenant_if_embedded()
        if runs_flush_workers():
            workers.start_pool()
            facts_worker.start()  # the facts layer's extraction, when LLM_BASE_URL is set
        if _role == WEB:
            metrics_history.start()  # the dashboard's charts of the last hour
        # The starting thread serves no request: give back the pool connections it used, or
        # it would hold one for ever.
        connections.close_all()
        _started = True
