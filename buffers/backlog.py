"""Backpressure: how far behind the flush is, per tenant and over all, and the limits past which adds wait.

The backlog is the pending messages (``flushed_at IS NULL``). When a tenant adds (or imports)
faster than the model embeds, its backlog grows; past ``MAX_BACKLOG_MESSAGES`` of its own,
that tenant's adds get 503 with ``Retry-After`` (nothing already stored is dropped: the rows
are durable, the flush goes on), so the service stops taking more than it can ever embed from
it, and other tenants are not refused for it. ``MAX_BACKLOG_MESSAGES_TOTAL`` bounds the
backlog of all tenants together: past it, only the tenants holding at least an equal share
of it (the total limit over the tenants with pending messages) are refused. Health reports
``degraded`` once the oldest pending message is older than ``BACKLOG_DEGRADED_SECONDS`` (or
the total limit is reached).

The figures are read at most once per ``FLUSH_TICK_SECONDS`` per process (one grouped count
over the partial index of pending messages, by user, then by tenant through ``memory_user``)
and shared by every request of the process meanwhile, so an add pays no query for them; a
limit may be overshot by the adds of that interval.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

from buffers.pending import pending_by_tenant


@dataclass(frozen=True)
class Backlog:
    """Pending messages of all users, and how long (s) the oldest of them has waited."""

    messages: int
    oldest_age_seconds: float


@dataclass(frozen=True)
class _Reading:
    """One read of the backlog: the total, and each tenant's pending messages (tenants
    without any are absent)."""

    total: Backlog
    tenants: dict[uuid.UUID, int] = field(default_factory=dict)


_lock = threading.Lock()
_cached: tuple[float, _Reading] | None = None  # (time.monotonic() of the read, figures)


def clear_cache() -> None:
    """Forget the figures: the next read goes to the database."""
    global _cached
    _cached = None


def _read() -> _Reading:
    rows = pending_by_tenant()
    tenants = {tenant_id: messages for tenant_id, messages, _ in rows}
    oldest = max((float(age) for _, _, age in rows), default=0.0)
    return _Reading(total=Backlog(messages=sum(tenants.values()), oldest_age_seconds=oldest), tenants=tenants)


def _reading() -> tuple[float, _Reading]:
    """``(time.monotonic() of the read, figures)``, read at most ``FLUSH_TICK_SECONDS`` ago.

    One thread reads while the others use the previous figures: requests never queue behind
    the count. Raises what the database raises when there are no figures yet.
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
    return cached


def current() -> Backlog:
    """The backlog of all tenants, read at most ``FLUSH_TICK_SECONDS`` ago (the age advanced to now)."""
    read_at, reading = _reading()
    figure = reading.total
    if figure.messages == 0:
        return figure
    return Backlog(messages=figure.messages, oldest_age_seconds=figure.oldest_age_seconds + time.monotonic() - read_at)


class BacklogFull(Exception):
    """Adds are refused: a backlog limit is reached; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def check_accepting(*, tenant_id: uuid.UUID, adding: int = 0) -> None:
    """Raise ``BacklogFull`` (the add answers 503) when ``adding`` more messages would take the
    tenant's pending messages past ``MAX_BACKLOG_MESSAGES``, or when the backlog of all tenants
    is past ``MAX_BACKLOG_MESSAGES_TOTAL`` and this tenant holds at least its share of it.

    A tenant at its limit is refused even with ``adding`` 0. A limit of 0 is no limit; with
    both 0, nothing is read.
    """
    limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES"]
    total_limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES_TOTAL"]
    if limit <= 0 and total_limit <= 0:
        return
    _check(_reading()[1], tenant_id=tenant_id, adding=adding)


def known_refusal(*, tenant_id: uuid.UUID) -> BacklogFull | None:
    """The ``BacklogFull`` that ``check_accepting`` would raise for an add of ``tenant_id``, from
    figures this process read less than ``FLUSH_TICK_SECONDS`` ago; ``None`` when it would
    accept, or the figures are older (or none). Never queries: for the ASGI edge, which answers
    a tenant at its limit before reading the add's body."""
    cached = _cached
    if cached is None or time.monotonic() - cached[0] >= settings.BUFFERS["TICK_SECONDS"]:
        return None
    if settings.BUFFERS["MAX_BACKLOG_MESSAGES"] <= 0 and settings.BUFFERS["MAX_BACKLOG_MESSAGES_TOTAL"] <= 0:
        return None
    try:
        _check(cached[1], tenant_id=tenant_id, adding=1)
    except BacklogFull as exc:
        return exc
    return None


def accepting(*, tenant_id: uuid.UUID) -> Callable[[int], None]:
    """``check_accepting`` for ``tenant_id`` on the figures of now, as a function of ``adding``
    that never queries: for a caller whose connection is busy meanwhile (an import's ``COPY``).
    Reads the figures here when they are older than ``FLUSH_TICK_SECONDS`` (and both limits
    are not 0)."""
    if settings.BUFFERS["MAX_BACKLOG_MESSAGES"] <= 0 and settings.BUFFERS["MAX_BACKLOG_MESSAGES_TOTAL"] <= 0:
        return lambda adding: None
    reading = _reading()[1]
    return lambda adding: _check(reading, tenant_id=tenant_id, adding=adding)


def _check(reading: _Reading, *, tenant_id: uuid.UUID, adding: int) -> None:
    limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES"]
    total_limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES_TOTAL"]
    pending = reading.tenants.get(tenant_id, 0)
    after = pending + max(adding, 1)
    retry_after = settings.BUFFERS["BACKLOG_RETRY_AFTER_SECONDS"]
    if limit > 0 and after > limit:
        raise BacklogFull(
            f"The flush of this tenant is {pending} messages behind (MAX_BACKLOG_MESSAGES {limit}): "
            f"nothing was stored, retry in {retry_after} s",
            retry_after=retry_after,
        )
    if total_limit > 0 and reading.total.messages + max(adding, 1) > total_limit:
        share = total_limit / (len(reading.tenants) + (tenant_id not in reading.tenants))
        if after > share:
            # The other tenants' figures stay out of the message.
            raise BacklogFull(
                f"The flush of all tenants is at MAX_BACKLOG_MESSAGES_TOTAL and this tenant's {pending} pending "
                f"messages are at least its share: nothing was stored, retry in {retry_after} s",
                retry_after=retry_after,
            )


def status() -> str:
    """``"ok"``, or ``"degraded"`` when the oldest pending message is older than
    ``BACKLOG_DEGRADED_SECONDS`` or the backlog of all tenants is at ``MAX_BACKLOG_MESSAGES_TOTAL``."""
    figure = current()
    total_limit = settings.BUFFERS["MAX_BACKLOG_MESSAGES_TOTAL"]
    degraded = figure.oldest_age_seconds > settings.BUFFERS["BACKLOG_DEGRADED_SECONDS"] or (
        total_limit > 0 and figure.messages >= total_limit
    )
    return "degraded" if degraded else "ok"
