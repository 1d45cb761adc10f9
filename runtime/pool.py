"""Django's psycopg connection pool: its figures for operators, and recognising its timeout.

Every database connection of a process comes from one ``psycopg_pool.ConnectionPool`` per
database alias (``DATABASES[...]["OPTIONS"]["pool"]``, settings ``DB_POOL_*``). A request that
waits longer than ``DB_POOL_TIMEOUT`` for a connection gets ``psycopg_pool.PoolTimeout``, which
Django's error wrapper re-raises as ``django.db.OperationalError`` with the ``PoolTimeout`` as
``__cause__`` (``tests/test_pool.py`` pins this down). Every interface answers it with a 503
(``memory.errors.error_for``: ``Retry-After`` over HTTP); so is a database that cannot be reached (``is_database_unavailable``: restarting, down, a connection
it closed). With ``CONN_HEALTH_CHECKS`` (settings) the pool checks a connection before lending
it, so the connections a restart closed are dropped rather than handed to requests.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from django.db import InterfaceError, connections
from psycopg_pool import PoolTimeout, TooManyRequests

# Seconds a client should wait before retrying when the pool is exhausted: a pool timeout
# means every connection was busy for DB_POOL_TIMEOUT; a second usually frees one.
RETRY_AFTER_SECONDS = 1

_exhausted_lock = threading.Lock()
_exhausted = 0
_unavailable = 0

# SQLSTATEs of a server going away or not back yet: class 57's admin shutdown (a restart or a
# stop), crash shutdown, "the database system is starting up"; and all of class 08 (connection).
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03"}


def is_pool_exhausted(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it wraps, through ``__cause__``) is the pool's refusal.

    ``PoolTimeout`` (no connection within ``DB_POOL_TIMEOUT``) or ``TooManyRequests`` (the
    pool's waiting queue is full).
    """
    seen = 0
    while exc is not None and seen < 5:  # Django wraps once; a short walk covers re-raises
        if isinstance(exc, PoolTimeout | TooManyRequests):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def is_database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it wraps) says the database cannot be reached now.

    A connection the server closed (a restart's "terminating connection due to administrator
    command", a crash), a server starting up, a connection that failed or was lost: psycopg's
    ``OperationalError`` without a SQLSTATE or with one of class 08 or 57P01-57P03, psycopg's
    ``InterfaceError`` (the connection is closed) and Django's own "connection already closed".
    Retrying later can succeed; the API answers it with 503 and ``Retry-After``. Errors of a
    statement (deadlock, timeout, bad data) are not this.
    """
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, PoolTimeout | TooManyRequests):  # the pool's own refusal (OperationalErrors too)
            return False
        if isinstance(exc, psycopg.InterfaceError):
            return True
        if isinstance(exc, psycopg.OperationalError):
            state = exc.sqlstate
            return state is None or state.startswith("08") or state in _UNAVAILABLE_SQLSTATES
        if isinstance(exc, InterfaceError) and exc.__cause__ is None:
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class OneLineRefusals(logging.Filter):
    """A ``logging`` filter for ``django.request``: a request refused because the database is
    unreachable or the pool exhausted is logged as one line naming the cause, without a traceback.

    Outside DRF (the admin, the dashboard) such a request goes through Django's uncaught-exception
    path: ``handler500`` answers it with 503 and ``Retry-After``, and Django logs the response with
    the exception's traceback. During a database restart that is a traceback per request for a
    condition the operator already sees once in the flush workers' log. Other errors keep theirs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (is_database_unavailable(exc) or is_pool_exhausted(exc)):
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            record.msg = f"{record.msg} (%s)"
            record.args = (*(record.args or ()), cause)
            record.exc_info = record.exc_text = None
        return True


def note_database_unavailable() -> None:
    """Count one request refused because the database was unreachable (shown in ``pool_stats``)."""
    global _unavailable
    with _exhausted_lock:
        _unavailable += 1


def note_pool_exhausted() -> None:
    """Count one request refused because the pool was exhausted (shown in ``pool_stats``)."""
    global _exhausted
    with _exhausted_lock:
        _exhausted += 1


# A pool that lost connections or failed to open them this recently is still refilling.
SHORT_FOR_SECONDS = 5.0
_losses_seen = 0
_losses_changed_at = float("-inf")


def is_short(alias: str = "default") -> bool:
    """Whether this process lacks connections now, whatever any one tenant does: a request waits
    for one of ``alias``'s pool, or within ``SHORT_FOR_SECONDS`` the pool lost connections (a
    database restart), failed to open one, or a request found the database unreachable."""
    global _losses_seen, _losses_changed_at
    pool = connections[alias].pool
    if pool is None:
        return False
    stats = pool.get_stats()
    if stats.get("requests_waiting", 0):
        return True
    losses = stats.get("connections_lost", 0) + stats.get("connections_errors", 0) + _unavailable
    now = time.monotonic()
    with _exhausted_lock:
        if losses != _losses_seen:
            _losses_seen, _losses_changed_at = losses, now
        return now - _losses_changed_at < SHORT_FOR_SECONDS


def pool_stats(alias: str = "default") -> dict:
    """The pool of ``alias`` in this process, from ``ConnectionPool.get_stats()``.

    ``{"enabled", "min_size", "max_size", "timeout_s", "size", "in_use", "idle",
    "requests_waiting", "requests_total", "requests_wait_ms", "requests_errors",
    "connection_errors", "connections_lost", "refused_503", "unavailable_503"}``: ``size`` connections are open,
    ``in_use`` of them lent out, ``idle`` ready; ``requests_waiting`` requests wait for one now.
    Totals are since the pool opened: ``requests_errors`` counts pool timeouts and queue-full
    refusals, ``refused_503`` the requests this process answered with 503 for that reason,
    ``unavailable_503`` those it answered with 503 because the database could not be reached.
    ``{"enabled": False}`` when the alias has no pool.
    """
    pool = connections[alias].pool
    if pool is None:
        return {"enabled": False, "refused_503": _exhausted, "unavailable_503": _unavailable}
    stats = pool.get_stats()
    size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
    return {
        "enabled": True,
        "min_size": pool.min_size,
        "max_size": pool.max_size,
        "timeout_s": pool.timeout,
        "size": size,
        "in_use": size - idle,
        "idle": idle,
        "requests_waiting": stats.get("requests_waiting", 0),
        "requests_total": stats.get("requests_num", 0),
        "requests_wait_ms": stats.get("requests_wait_ms", 0),
        "requests_errors": stats.get("requests_errors", 0),
        "connection_errors": stats.get("connections_errors", 0),
        "connections_lost": stats.get("connections_lost", 0),
        "refused_503": _exhausted,
        "unavailable_503": _unavailable,
    }
