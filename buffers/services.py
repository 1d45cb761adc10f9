"""Write-behind jobs: flush requests, their queue and their outcome.

A message is durable (a row) before its add is acknowledged; a flush job only says "flush
this user (or session) soon, at this priority" (``buffers.models``). Workers
(``buffers.workers``) claim jobs with ``SKIP LOCKED`` and run the flush that the ``memory``
app registers (``FlushHooks``; ``memory.indexing.flush`` describes the flush itself); a failed flush
is retried with exponential backoff, then left ``failed`` for an operator.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Least
from django.utils import timezone

from buffers import events, jobs, pending
from buffers.models import ACTIVE_STATES, WAITING_STATES, FlushJob, Priority, State, sql_states
from buffers.pending import pending_summary
from runtime.pool import is_database_unavailable

logger = logging.getLogger(__name__)


# (the waiting job, queue or raise one): user-wide, and of one session
_REQUEST_FLUSH_SQL = (jobs.waiting_job_sql(), jobs.job_upsert_sql())
_REQUEST_SESSION_FLUSH_SQL = (jobs.waiting_job_sql(session=True), jobs.job_upsert_sql(session=True))


def request_flush(
    *, user_id: uuid.UUID, priority: int, reason: str, session_id: uuid.UUID | None = None
) -> int:
    """Queue a flush of the user's (or one session's) pending messages; returns the job id.

    Durable: the job is a row, written in the caller's transaction. At most one job waits per
    user and scope (user-wide, or one session): a new request raises that job's priority
    instead of adding another (``jobs.job_upsert_sql``). A request that asks no more than the
    waiting job gets its id and writes nothing (no lock, no commit to flush): repeated requests
    cost a read. Workers are notified when the transaction commits, if a job was queued or
    raised (``events.notify_flush``); a lost notification only delays the flush until the
    next poll.
    """
    waiting, upsert = _REQUEST_FLUSH_SQL if session_id is None else _REQUEST_SESSION_FLUSH_SQL
    params = {"user": user_id, "session": session_id, **jobs.job_params(priority=priority, reason=reason)}
    with connection.cursor() as cursor:
        while True:  # a concurrent request may insert or raise the job first: read it again then
            cursor.execute(waiting, params)
            row = cursor.fetchone()
            if row is not None and row[1] <= priority:
                return row[0]
            cursor.execute(upsert, params)
            row = cursor.fetchone()
            if row is not None:
                transaction.on_commit(lambda: events.notify_flush(user_id=user_id, priority=priority))
                return row[0]


# --- the flush ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlushHooks:
    """What the write-behind tier needs from the app whose messages it buffers (``memory``,
    which registers them in its ``AppConfig.ready``): ``buffers`` never imports that app.

    - ``flush(*, user_id, session_id, deadline, slice_end, batch_size, token) -> int``: embed
      and index the pending messages (``memory.indexing.flush.flush_pending``);
    - ``warm_up()``: load what a flush needs (the background embedding model) before the first.
    """

    flush: Callable[..., int]
    warm_up: Callable[[], None]


_hooks: FlushHooks | None = None


def use_hooks(hooks: FlushHooks) -> None:
    """Register the flush and its companions (``FlushHooks``); called once, at app start."""
    global _hooks
    _hooks = hooks


def hooks() -> FlushHooks:
    """The registered ``FlushHooks``. Raises ``RuntimeError`` before ``use_hooks``."""
    if _hooks is None:
        raise RuntimeError("no flush registered: buffers.services.use_hooks runs in memory's AppConfig.ready")
    return _hooks


# --- jobs ---------------------------------------------------------------------------------------


# Claims of one process are taken one at a time: each counts the tenant's jobs that the
# process runs (FLUSH_MAX_RUNNING_PER_TENANT), which a concurrent claim would not see yet.
_claim_lock = threading.Lock()

_CLAIM_SQL = f"""
WITH busy AS (
    -- Tenants at their bound of running jobs in this process.
    SELECT tenant_id FROM buffers_flushjob
    WHERE state = '{State.RUNNING.value}' AND process = %(process)s AND tenant_id IS NOT NULL
    GROUP BY tenant_id HAVING %(max_running)s > 0 AND count(*) >= %(max_running)s
), claimed AS (
    UPDATE buffers_flushjob SET state = '{State.RUNNING.value}', worker = %(worker)s, started_at = now(),
                                attempts = attempts + 1, process = %(process)s,
                                claim_token = gen_random_uuid(),
                                lease_until = now() + make_interval(secs => %(lease)s)
    WHERE id = (
        SELECT j.id FROM buffers_flushjob j LEFT JOIN buffers_flushturn t ON t.tenant_id = j.tenant_id
        WHERE j.state IN ({sql_states(WAITING_STATES)}) AND j.next_attempt_at <= clock_timestamp()
          AND (j.priority = {Priority.CRITICAL.value} OR j.tenant_id IS NULL
               OR j.tenant_id NOT IN (SELECT tenant_id FROM busy))
        ORDER BY j.priority <> {Priority.CRITICAL.value}, t.claimed_at NULLS FIRST, j.priority, j.created_at, j.id
        LIMIT 1
        FOR UPDATE OF j SKIP LOCKED
    )
    RETURNING id, tenant_id
), turn AS (
    INSERT INTO buffers_flushturn (tenant_id, claimed_at)
    SELECT tenant_id, clock_timestamp() FROM claimed WHERE tenant_id IS NOT NULL
    ON CONFLICT (tenant_id) DO UPDATE SET claimed_at = EXCLUDED.claimed_at
)
SELECT id FROM claimed
"""


def claim_next_job(*, worker: str, process: str = "") -> FlushJob | None:
    """Take the next runnable job, or ``None``; the order is fair across tenants:

    1. critical jobs (the drain at shutdown) first;
    2. then the jobs of the tenant whose last claim is the oldest (``FlushTurn``: round-robin
       over the tenants with runnable jobs), skipping tenants of which this ``process``
       already runs ``FLUSH_MAX_RUNNING_PER_TENANT`` jobs;
    3. within a tenant, by priority, then age (FIFO).

    A priority orders one tenant's jobs, not one tenant's against another's: otherwise one
    tenant's stream of size-triggered (normal) or manual (high) jobs would keep another's
    time-triggered (low) ones waiting for as long as it lasts. ``SKIP LOCKED``: workers in any
    number of processes never take the same job. The job records the worker's ``process``
    (``WorkerProcess.name``) and a new ``claim_token`` for its flush, so that the job and its
    claims are released as soon as that process is dead.
    """
    config = settings.BUFFERS
    params = {
        "worker": worker,
        "process": process,
        "lease": config["TIMEOUT_SECONDS"] + config["LEASE_SECONDS"],
        "max_running": config["MAX_RUNNING_PER_TENANT"],
    }
    with _claim_lock, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, params)
        row = cursor.fetchone()
    return FlushJob.objects.get(pk=row[0]) if row else None


def backoff_seconds(attempts: int) -> float:
    """Delay before retry number ``attempts`` (1, 2, ...): exponential, capped."""
    config = settings.BUFFERS
    return min(config["BACKOFF_MAX_SECONDS"], config["BACKOFF_SECONDS"] * 2 ** (attempts - 1))


def run_job(job: FlushJob) -> None:
    """Run a claimed job: flush, then mark it done, or queued again, or retrying with backoff,
    or failed.

    The flush stops between batches once ``FLUSH_SLICE_SECONDS`` have passed; if pending
    messages are left, the job goes back to the queue with its attempt given back, behind
    the other tenants' turns (``claim_next_job``): one user's long flush never holds a worker
    for long. Errors of the flush are recorded on the job, never raised, except an
    unreachable database (``runtime.pool.is_database_unavailable``), which cannot be
    recorded: it is raised, and the job stays running until its process releases it
    (``buffers.heartbeats``) once the database is back.

    Every outcome is written only while the job is still this run's (``_claimed``): released
    meanwhile (its process was taken for dead), it is another run's now.
    """
    config = settings.BUFFERS
    started = time.monotonic()
    deadline = started + config["TIMEOUT_SECONDS"]
    slice_end = started + config["SLICE_SECONDS"] if config["SLICE_SECONDS"] > 0 else None
    try:
        flushed = hooks().flush(
            user_id=job.user_id,
            session_id=job.session_id,
            deadline=deadline,
            slice_end=slice_end,
            batch_size=None,
            token=job.claim_token,
        )
    except Exception as exc:  # any failure of the store or the model: retry, then fail
        if is_database_unavailable(exc):
            raise
        _job_failed(job, exc)
        return
    if (
        slice_end is not None
        and time.monotonic() >= slice_end
        and pending.unclaimed_pending(user_id=job.user_id, session_id=job.session_id)
    ):
        _requeue(job, state=State.QUEUED, error="", flushed=flushed, attempt_used=False)
        return
    _claimed(job).update(
        state=State.DONE,
        messages_flushed=F("messages_flushed") + flushed,
        finished_at=timezone.now(),
        lease_until=None,
        last_error="",
    )


def _claimed(job: FlushJob) -> QuerySet[FlushJob]:
    """The job, while the claim ``job`` was loaded with still stands: running, same token.

    Every change a run makes to its job goes through this: a flush that fails after its job
    was released (its process taken for dead) and claimed again must not touch the new run.
    """
    return FlushJob.objects.filter(pk=job.pk, state=State.RUNNING, claim_token=job.claim_token)


def _job_failed(job: FlushJob, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"
    if job.attempts >= job.max_attempts:
        if _claimed(job).update(state=State.FAILED, last_error=error, finished_at=timezone.now(), lease_until=None):
            logger.error("flush job %s of user %s failed for good: %s", job.pk, job.user_id, error)
        return
    delay = backoff_seconds(job.attempts)
    if _requeue(job, state=State.RETRYING, error=error, delay=delay):
        logger.warning(
            "flush job %s of user %s failed (attempt %d), retry in %.1f s: %s", job.pk, job.user_id, job.attempts, delay, error
        )


def _requeue(
    job: FlushJob, *, state: str, error: str, delay: float = 0.0, flushed: int = 0, attempt_used: bool = True
) -> bool:
    """Put a running job back in the queue while its claim stands (``_claimed``); returns
    whether it changed. ``flushed`` messages are added to its count; ``attempt_used=False``
    gives its attempt back (a time slice ended, nothing failed)."""
    return _back_to_queue(
        job,
        _claimed(job),
        state=state,
        error=error,
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
        messages_flushed=F("messages_flushed") + flushed,
        lease_until=None,
        **({} if attempt_used else {"attempts": F("attempts") - 1}),
    )


def _back_to_queue(job: FlushJob, where: QuerySet[FlushJob], *, state: str, error: str, next_attempt_at, **changes) -> bool:
    """Make the job of ``where`` (``job``, filtered by what must still hold) wait again in
    ``state``; returns whether it changed.

    When another job of the same user and scope waits already (the unique indexes allow one),
    this one is folded into it: that job takes the higher of the two priorities and the
    earlier of the two attempt times, and this one is done, ``superseded_by`` it, for a
    waiter to follow. A few tries: the waiting job may be claimed in between.
    """
    for _ in range(3):
        try:
            with transaction.atomic():
                return bool(where.update(state=state, last_error=error, next_attempt_at=next_attempt_at, **changes))
        except IntegrityError:
            pass
        with transaction.atomic():
            waiting = (
                FlushJob.objects.select_for_update()
                .filter(user_id=job.user_id, session_id=job.session_id, state__in=WAITING_STATES)
                .exclude(pk=job.pk)
                .first()
            )
            if waiting is None:
                continue  # claimed meanwhile: this one may wait again now
            folded = where.update(
                state=State.DONE,
                superseded_by=waiting.pk,
                finished_at=timezone.now(),
                last_error=f"{error} (superseded by a waiting flush)" if error else "superseded by a waiting flush",
                **{name: value for name, value in changes.items() if name in ("messages_flushed", "lease_until")},
            )
            if folded:
                FlushJob.objects.filter(pk=waiting.pk).update(
                    priority=Least(F("priority"), job.priority), next_attempt_at=Least(F("next_attempt_at"), next_attempt_at)
                )
            return bool(folded)
    return False


def job_lost(job: FlushJob, *, error: str) -> None:
    """A running job whose worker is gone: back to the queue (retrying), or failed when its
    attempts are used up (a flush that kills its worker every time must not loop for ever).
    Only while the claim ``job`` was loaded with still stands."""
    if job.attempts >= job.max_attempts:
        _claimed(job).update(state=State.FAILED, last_error=error, finished_at=timezone.now(), lease_until=None)
    else:
        _requeue(job, state=State.RETRYING, error=error)


def job_retry(*, job: FlushJob) -> FlushJob:
    """Operator action: put a failed job back in the queue with fresh attempts (or fold it into
    the flush of the same scope that waits already)."""
    if job.state != State.FAILED:
        return job
    failed = FlushJob.objects.filter(pk=job.pk, state=State.FAILED)
    if _back_to_queue(job, failed, state=State.QUEUED, error=job.last_error, next_attempt_at=timezone.now(), attempts=0):
        transaction.on_commit(lambda: events.notify_flush(user_id=job.user_id, priority=job.priority))
    job.refresh_from_db()
    return job


def failed_jobs_retry(*, job_ids: list[int] | None = None) -> int:
    """Queue failed flushes again (all of them, or those of ``job_ids``); returns how many."""
    jobs = FlushJob.objects.filter(state=State.FAILED)
    if job_ids is not None:
        jobs = jobs.filter(pk__in=job_ids)
    retried = 0
    for job in jobs:
        job_retry(job=job)
        retried += 1
    return retried


# Waits for a flush in progress in this process, by tenant (FLUSH_WAIT_MAX_PER_TENANT).
_waits: Counter[uuid.UUID | None] = Counter()
_waits_lock = threading.RLock()  # wait_place holds it around waits_full

# Polls of a waiting flush: the first soon (a small flush takes a fraction of a second), then
# further apart: each poll borrows a pooled connection.
_WAIT_FIRST_POLL_SECONDS = 0.05
_WAIT_MAX_POLL_SECONDS = 0.5


class WaitsFull(Exception):
    """``FLUSH_WAIT_MAX_PER_TENANT`` waits of the tenant are in progress in this process."""


def waits_full(*, tenant_id: uuid.UUID | None) -> WaitsFull | None:
    """The ``WaitsFull`` that ``wait_place`` would raise for ``tenant_id`` now, or ``None``."""
    bound = settings.BUFFERS["WAIT_MAX_PER_TENANT"]
    with _waits_lock:
        if bound > 0 and _waits[tenant_id] >= bound:
            return WaitsFull(f"{bound} flushes of this tenant are waited for already (FLUSH_WAIT_MAX_PER_TENANT)")
    return None


@contextmanager
def wait_place(*, tenant_id: uuid.UUID | None) -> Iterator[None]:
    """Hold one of the ``FLUSH_WAIT_MAX_PER_TENANT`` places of ``tenant_id``'s waits in this
    process (0: no bound) for the block: take it before queueing the flush to wait for.
    Raises ``WaitsFull`` when every place is taken (nothing is held then)."""
    with _waits_lock:
        full = waits_full(tenant_id=tenant_id)
        if full is not None:
            raise full
        _waits[tenant_id] += 1
    try:
        yield
    finally:
        with _waits_lock:
            _waits[tenant_id] -= 1
            if _waits[tenant_id] <= 0:
                del _waits[tenant_id]


def wait_for_job(*, job_id: int, timeout: float) -> FlushJob:
    """Poll the job until it is no longer active or ``timeout`` (s) passes; returns it. Call it
    holding a ``wait_place``.

    A job folded into another (``superseded_by``: a retry, or the rest of a flush whose time
    slice ended) is followed to that one: the answer is the job that finished the flush.
    Between polls the wait holds no database connection: each poll borrows one from the pool
    and gives it back (outside a transaction; inside one, the connection is the
    transaction's). A job deleted meanwhile (its user was) ends the wait with the job as last read.
    """
    try:
        job = FlushJob.objects.get(pk=job_id)
        deadline = time.monotonic() + timeout
        poll = _WAIT_FIRST_POLL_SECONDS
        while True:
            if job.state in ACTIVE_STATES:
                watched = job.pk
            elif job.superseded_by is not None:
                watched = job.superseded_by
            else:
                return job
            if time.monotonic() >= deadline:
                return job
            if watched == job.pk:
                _release_connection()
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
                poll = min(poll * 2, _WAIT_MAX_POLL_SECONDS)
            fresh = FlushJob.objects.filter(pk=watched).first()
            if fresh is None:  # deleted meanwhile, with its user
                return job
            job = fresh
    finally:
        _release_connection()


def _release_connection() -> None:
    """Give this thread's database connection back to the pool, unless a transaction holds it."""
    if not connection.in_atomic_block:
        connection.close()


def buffer_status(*, user_id: uuid.UUID) -> dict:
    """The user's buffer for the API: pending messages, tokens, oldest age, active jobs."""
    summary = pending_summary(user_id=user_id)
    jobs = FlushJob.objects.filter(user_id=user_id, state__in=[*ACTIVE_STATES, State.FAILED]).order_by("-id")[:20]
    return {
        "pending_messages": summary.messages,
        "pending_tokens": summary.tokens,
        "oldest_pending_age_s": round(summary.oldest_age_seconds, 3),
        "jobs": [job_dict(job) for job in jobs],
    }


def job_dict(job: FlushJob) -> dict:
    """A job as JSON for the API and the admin's figures."""
    return {
        "id": job.pk,
        "user_id": str(job.user_id),
        "session_id": str(job.session_id) if job.session_id else None,
        "priority": Priority(job.priority).label.lower(),
        "reason": job.reason,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "messages_flushed": job.messages_flushed,
        "last_error": job.last_error,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
