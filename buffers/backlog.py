"""Backpressure: how far behind the flush is, over all users, and the limit past which adds wait.

The backlog is the pending messages (``flushed_at IS NULL``) of every user. When adds come
faster than the model embeds, it grows; past ``MAX_BACKLOG_MESSAGES`` new adds get 503 with
``Retry-After`` (nothing already stored is dropped: the rows are durable, the flush goes on),
so the service stops taking more than it can ever embed. Health reports ``degraded`` once the
oldest pending message is older than ``BACKLOG_DEGRADED_SECONDS`` (or the limit is reached).

The figure is read at most once per ``FLUSH_TICK_SECONDS`` per process (one count over the
partial index of pending messages) and shared by every request of the process meanwhile, so
an add pays no query for it; the limit may be overshot by the adds of that interval.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import connection


@dataclass(frozen=True)
class Backlog:
    """Pending messages of all users, and how long (s) the oldest of them has waited."""

    messages: int
    oldest_age_seconds: float


_lock = threading.Lock()
_cached: tuple[float, Backlog] | None = None  # (time.monotonic() of the read, figure)


def clear_cache() -> None:
    """Forget the figure: the next ``current()`` reads the database."""
    global _cached
    _cached = None


def _read() -> Backlog:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), greatest(extract(epoch FROM now() - min(updated_at)), 0) "
            "FROM memory_message WHERE flushed_at IS NULL"
        )
        count, age = cursor.fetchone()
    return Backlog(messages=count, oldest_age_seconds=float(age))


def current() -> Backlog:
    """The backlog, read at most ``FLUSH_TICK_SECONDS`` ago (the age advanced to now).

    One thread reads while the others use the previous figure: requests never queue behind
    the count. Raises what the database raises when there is no figure yet.
    """
    global _cached
    cached = _cached
    now = time.monotonic()
    if cached is None or now - cached[0] >= settings.BUFFERS["TICK_SECONDS"]:
        if _lock.acquire(blocking=cached is None):
            try:
                if _cached is cached:  # no other thread refreshed it meanwhile
                    _cached = (time.monotonic(), _read())
            finally:
                _lock.release()
        cached = _cached or cached
    read_at, figure = cached
    if figure.messages == 0:
        return figure
    return Backlog(messages=figure.messages, oldest_age_seconds=figure.oldest_age_seconds + time.monotonic() - read_at)


class BacklogFull(Exception):
    """Adds are refused: the backlog is at ``MAX_BACKLOG_MESSAGES``; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def check_accepting(*, tenant_id: uuid.UUID | None = None, adding: int = 0) -> None:
    """Raise ``BacklogFull`` when the backlog is at ``MAX_BACKLOG_MESSAGES`` (the add answers 503).

    ``MAX_BACKLOG_MESSAGES`` 0: no limit (and no read). ``tenant_id`` and ``adding`` (the
    pending messages the caller is about to add) are accepted for the per-tenant backlog's
    callers and not used yet: the limit counts every tenant's pending messages.
    """
    limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES"]
    if limit <= 0:
        return
    figure = current()
    if figure.messages >= limit:
        retry_after = settings.BUFFERS["BACKLOG_RETRY_AFTER_SECONDS"]
        raise BacklogFull(
            f"The flush is {figure.messages} messages behind (MAX_BACKLOG_MESSAGES {limit}): "
            f"nothing was stored, retry in {retry_after} s",
            retry_after=retry_after,
        )


def health() -> dict:
    """``{"status": "ok"|"degraded", "pending_messages", "oldest_pending_age_s", "max_pending_messages",
    "degraded_after_s"}``: degraded when the oldest pending message is older than
    ``BACKLOG_DEGRADED_SECONDS``, or adds are refused (``MAX_BACKLOG_MESSAGES``)."""
    figure = current()
    limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES"]
    threshold = settings.BUFFERS["BACKLOG_DEGRADED_SECONDS"]
    degraded = figure.oldest_age_seconds > threshold or (limit > 0 and figure.messages >= limit)
    return {
        "status": "degraded" if degraded else "ok",
        "pending_messages": figure.messages,
        "oldest_pending_age_s": round(figure.oldest_age_seconds, 3),
        "max_pending_messages": limit,
        "degraded_after_s": threshold,
    }
