"""What this process serves: its role, declared by its entry point once it is about to serve.

- ``WEB``: HTTP and WebSocket (the ASGI lifespan's startup, ``wsgi.py``'s first request,
  ``manage.py runserver``): the query model; flush workers too when ``FLUSH_IN_PROCESS`` says
  this process runs them; the dashboard's sampler;
- ``WORKER``: ``manage.py runworker``: the flushes' model and the flush workers, no query model;
- ``TOOL``: a tool running retrieval in its own process (benchmarks, evaluations): the query
  model, nothing else.

Nothing is declared in every other process (``migrate``, ``check``, ``shell``, tests): it
loads a model on its first use and starts no thread. What a declared process starts is
``memfuse_project.serving.start``'s concern; this module only records the role.

The role lives in this module, not in the environment, so that processes started by a
serving one (a benchmark's server, ``runserver``'s autoreloader child) declare their own.
"""

from __future__ import annotations

from django.conf import settings

from runtime.heap import limit_malloc_arenas

WEB, WORKER, TOOL = "web", "worker", "tool"
ROLES = (WEB, WORKER, TOOL)

_role: str | None = None


def declare(role: str) -> None:
    """Declare that this process serves as ``role`` (``WEB``, ``WORKER`` or ``TOOL``).

    A ``WEB`` or ``WORKER`` process caps glibc's malloc arenas here (``limit_malloc_arenas``),
    so its entry point declares it before the models load and the pool starts threads: each
    thread's first allocation gets it an arena of its own while there is no cap, and glibc
    never removes one. Raises ``ValueError`` for an unknown role.
    """
    global _role
    if role not in ROLES:
        raise ValueError(f"unknown serving role {role!r}; one of {', '.join(ROLES)}")
    _role = role
    if role in (WEB, WORKER):
        limit_malloc_arenas()


def role() -> str | None:
    """The role this process declared, or ``None`` when it does not serve."""
    return _role


def runs_flush_workers() -> bool:
    """Whether this process runs flush workers: a ``WORKER`` always; a ``WEB`` server when
    ``FLUSH_IN_PROCESS`` is ``on``, or ``auto`` with the in-memory channel layer (one process
    does everything); never with ``off``, nor a ``TOOL`` or an undeclared process."""
    mode = settings.BUFFERS["IN_PROCESS"].lower()
    if mode == "off" or _role not in (WEB, WORKER):
        return False
    if _role == WORKER or mode == "on":
        return True
    return "InMemory" in settings.CHANNEL_LAYERS["default"]["BACKEND"]
