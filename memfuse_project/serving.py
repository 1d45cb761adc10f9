"""The start-up of a serving process, run by its entry point once it is about to serve.

Each entry point declares the process's role (``runtime.roles``) and then runs ``start()``:

- the ASGI application (``memfuse_project.lifespan``): at the lifespan's startup (uvicorn),
  or before the first connection under a server that does not speak lifespan (daphne);
- ``wsgi.py``: before the first request;
- ``manage.py runserver`` and ``runworker`` (the flush workers): before the command runs;
- a tool (``memfuse_bench``, ``locomo_eval``): in its ``handle``, as a ``TOOL``.

Importing any of them starts nothing: ``MemoryConfig.ready()`` loads no model, so that
``migrate`` or ``check`` never pay for one.
"""

from __future__ import annotations

import logging
import threading

from django.db import connections

from buffers import workers
from memory import startup
from memory.facts import worker as facts_worker
from memory.operator import history
from runtime import embedded_pg, roles

logger = logging.getLogger(__name__)

_started = False
_start_lock = threading.Lock()


def serve(role: str) -> None:
    """Declare ``role`` (``runtime.roles.declare``) unless the entry point declared one
    already, then ``start()``. Raises ``ValueError`` for an unknown role."""
    if roles.role() is None:
        roles.declare(role)
    start()


def start() -> None:
    """The start-up of a serving process, once (later calls return at once, concurrent ones
    wait for the first); nothing in a process that declared no role (tests).

    On the embedded default (no ``DATABASE_URL``): starts the database, migrates it and
    creates the development tenant. Then loads the role's models
    (``memory.startup.load_models``), starts this process's flush workers
    (``runtime.roles.runs_flush_workers``) and, for ``WEB``, the dashboard's sampler, and
    closes the connections the calling thread used. Must not run on an event loop's thread:
    it does database work. Raises ``EmbeddingProcessError`` or ``RerankerLoadError`` when a
    model fails to load.
    """
    global _started
    with _start_lock:
        role = roles.role()
        if _started or role is None:
            return
        embedded_pg.start_if_embedded()
        embedded_pg.migrate_if_embedded()
        startup.local_tenant_if_embedded()
        startup.load_models()
        if roles.runs_flush_workers():
            workers.start_pool()
            facts_worker.start()  # the facts layer's extraction, when LLM_BASE_URL is set
        if role == roles.WEB:
            history.start()  # the dashboard's charts of the last hour
        # The starting thread serves no request: give back the pool connections it used, or
        # it would hold one for ever.
        connections.close_all()
        _started = True
