"""Write-behind jobs: flush requests, their queue and their outcome.

A message is durable (a row) before its add is acknowledged; a flush job only says "flush
this user (or session) soon, at this priority" (``buffers.models``). Workers
(``buffers.workers``) claim jobs with ``SKIP LOCKED`` and run the flush that the ``memory``
app registers (``FlushHooks``; ``memory.flush`` describes the flush itself); a failed flush
is retried with exponential backoff, then left ``failed`` for an operator.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from buffers import events, jobs
from buffers.jobs import pending_summary, sql_states
from buffers.models import ACTIVE_STATES, WAITING_STATES, FlushJob, Priority, Reason, State
from memfuse_project.pool import is_database_unavailable

logger = logging.getLogger(__name__)


_REQUEST_FLUSH_SQL = jobs.job_upsert_sql()


def request_flush(
    *, user_id: uuid.UUID, priority: int, reason: str, session_id: uuid.UUID | None = None
) -> int:
    """Queue a flush of the user's (or one session's) pending messages; returns the job id.

    Durable: the job is a row, written in the caller's transaction. At most one user-wide job
    waits per user: a new request raises that job's priority instead of adding another
    (``jobs.job_upsert_sql``). Workers are notified when the transaction commits
    (``events.notify_flush``); a lost notification only delays the flush until the next poll.
    """
    if session_id is None:
        with connection.cursor() as cursor:
            cursor.execute(
                _REQUEST_FLUSH_SQL, {"user": user_id, **jobs.job_params(priority=priority, reason=reason, touch=True)}
            )
            job_id = cursor.fetchone()[0]
    else:
        job_id = FlushJob.objects.create(
            user_id=user_id,
            session_id=session_id,
            priority=priority,
            reason=reason,
            max_attempts=settings.BUFFERS["MAX_ATTEMPTS"],
        ).pk
    transaction.on_commit(lambda: events.notify_flush(user_id=user_id, priority=priority))
    return job_id


# --- the flush ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlushHooks:
    """What the write-behind tier needs from the app whose messages it buffers (``memory``,
    which registers them in its ``AppConfig.ready``): ``buffers`` never imports that app.

    - ``flush(*, user_id, session_id, deadline, batch_size, token) -> int``: embed and index
      the pending messages (``memory.flush.flush_pending``);
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


def flush_pending(
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID | None = None,
    deadline: float | None = None,
    batch_size: int | None = None,
    token: uuid.UUID | None = None,
) -> int:
    """Flush the user's (or one session's) pending messages now, in this thread; returns how many.

    The registered flush (``FlushHooks.flush``: ``memory.flush.flush_pending`` says what it
    does and raises). ``deadline`` is a ``time.monotonic()`` value; ``token`` the claim token
    of the messages (a job's ``claim_token``; default new).
    """
    return hooks().flush(user_id=user_id, session_id=session_id, deadline=deadline, batch_size=batch_size, token=token)


# --- jobs ---------------------------------------------------------------------------------------


def claim_next_job(*, worker: str, process: str = "") -> FlushJob | None:
    """Take the runnable job first by priority, then age (FIFO), or ``None``.

    ``SKIP LOCKED``: workers in any number of processes never take the same job. The job
    records the worker's ``process`` (``WorkerProcess.name``) and a new ``claim_token`` for
    its flush, so that the job and its claims are released as soon as that process is dead.
    """
    lease = settings.BUFFERS["TIMEOUT_SECONDS"] + settings.BUFFERS["LEASE_SECONDS"]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE buffers_flushjob SET state = '{State.RUNNING.value}', worker = %(worker)s, started_at = now(),
                                        attempts = attempts + 1, process = %(process)s,
                                        claim_token = gen_random_uuid(),
                                        lease_until = now() + make_interval(secs => %(lease)s)
            WHERE id = (
                SELECT id FROM buffers_flushjob
                WHERE state IN ({sql_states(WAITING_STATES)}) AND next_attempt_at <= clock_timestamp()
                ORDER BY priority, created_at, id
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id
            """,
            {"worker": worker, "process": process, "lease": lease},
        )
        row = cursor.fetchone()
    return FlushJob.objects.get(pk=row[0]) if row else None


def backoff_seconds(attempts: int) -> float:
    """Delay before retry number ``attempts`` (1, 2, ...): exponential, capped."""
    config = settings.BUFFERS
    return min(config["BACKOFF_MAX_SECONDS"], config["BACKOFF_SECONDS"] * 2 ** (attempts - 1))


def run_job(job: FlushJob) -> None:
    """Run a claimed job: flush, then mark it done, or retrying with backoff, or failed.

    Errors of the flush are recorded on the job, never raised, except an unreachable database
    (``memfuse_project.pool.is_database_unavailable``), which cannot be recorded: it is
    raised, and the job stays running until its process releases it (``buffers.heartbeats``) once the
    database is back.
    """
    deadline = time.monotonic() + settings.BUFFERS["TIMEOUT_SECONDS"]
    try:
        flushed = flush_pending(user_id=job.user_id, session_id=job.session_id, deadline=deadline, token=job.claim_token)
    except Exception as exc:  # any failure of the store or the model: retry, then fail
        if is_database_unavailable(exc):
            raise
        _job_failed(job, exc)
        return
    # Only while the job is still this run's: released meanwhile (its process was taken for
    # dead), it is another run's now.
    FlushJob.objects.filter(pk=job.pk, worker=job.worker, state=State.RUNNING, claim_token=job.claim_token).update(
        state=State.DONE, messages_flushed=flushed, finished_at=timezone.now(), lease_until=None, last_error=""
    )


def _job_failed(job: FlushJob, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"
    if job.attempts >= job.max_attempts:
        logger.error("flush job %s of user %s failed for good: %s", job.pk, job.user_id, error)
        FlushJob.objects.filter(pk=job.pk).update(
            state=State.FAILED, last_error=error, finished_at=timezone.now(), lease_until=None
        )
        return
    delay = backoff_seconds(job.attempts)
    logger.warning("flush job %s of user %s failed (attempt %d), retry in %.1f s: %s", job.pk, job.user_id, job.attempts, delay, error)
    _requeue(job, state=State.RETRYING, error=error, delay=delay)


def _requeue(job: FlushJob, *, state: str, error: str, delay: float = 0.0) -> None:
    """Put a job back in the queue; if another user-wide job already waits, fold into it."""
    try:
        with transaction.atomic():
            FlushJob.objects.filter(pk=job.pk).update(
                state=state,
                last_error=error,
                lease_until=None,
                next_attempt_at=timezone.now() + timedelta(seconds=delay),
            )
    except IntegrityError:
        # A newer request for the same user waits already and will flush these messages.
        FlushJob.objects.filter(pk=job.pk).update(
            state=State.DONE, last_error=f"{error} (superseded by a waiting flush)", finished_at=timezone.now()
        )


def job_lost(job: FlushJob, *, error: str) -> None:
    """A running job whose worker is gone: back to the queue (retrying), or failed when its
    attempts are used up (a flush that kills its worker every time must not loop for ever)."""
    if job.attempts >= job.max_attempts:
        FlushJob.objects.filter(pk=job.pk).update(state=State.FAILED, last_error=error, finished_at=timezone.now(), lease_until=None)
    else:
        _requeue(job, state=State.RETRYING, error=error)


def job_retry(*, job: FlushJob) -> FlushJob:
    """Operator action: put a failed job back in the queue with fresh attempts."""
    if job.state != State.FAILED:
        return job
    job.attempts = 0
    job.save(update_fields=["attempts"])
    _requeue(job, state=State.QUEUED, error=job.last_error)
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


def recover(*, all_pending: bool = False) -> int:
    """Requeue work no live worker holds; returns how many flushes were requested.

    - running jobs whose lease expired (their worker died) go back to the queue;
    - users with pending messages not under a live claim get a flush: at low priority for the
      time trigger (oldest pending change older than ``FLUSH_INTERVAL_SECONDS``), or for every
      such user with ``all_pending`` (at start: reason ``recovery``).
    """
    for job in FlushJob.objects.filter(state=State.RUNNING, lease_until__lt=timezone.now()):
        logger.warning("flush job %s lost its worker %s; requeued", job.pk, job.worker)
        job_lost(job, error="worker lost (lease expired)")
    interval = 0.0 if all_pending else settings.BUFFERS["INTERVAL_SECONDS"]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT m.user_id FROM memory_message m
            WHERE m.flushed_at IS NULL AND (m.claimed_until IS NULL OR m.claimed_until < now())
            GROUP BY m.user_id
            HAVING min(m.updated_at) <= now() - make_interval(secs => %s)
               AND NOT EXISTS (SELECT 1 FROM buffers_flushjob j
                               WHERE j.user_id = m.user_id AND j.session_id IS NULL
                                 AND j.state IN ({sql_states(ACTIVE_STATES)}))
            """,
            [interval],
        )
        user_ids = [row[0] for row in cursor.fetchall()]
    reason = Reason.RECOVERY if all_pending else Reason.TIME
    for user_id in user_ids:
        with transaction.atomic():
            request_flush(user_id=user_id, priority=Priority.LOW, reason=reason)
    return len(user_ids)


def request_shutdown_flushes() -> int:
    """At a graceful stop: a critical flush for every user with pending messages."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT user_id FROM memory_message WHERE flushed_at IS NULL")
        user_ids = [row[0] for row in cursor.fetchall()]
    for user_id in user_ids:
        with transaction.atomic():
            request_flush(user_id=user_id, priority=Priority.CRITICAL, reason=Reason.SHUTDOWN)
    return len(user_ids)


def job_active(*, job_id: int) -> bool:
    """Whether the job is still queued, running or retrying."""
    return FlushJob.objects.filter(pk=job_id, state__in=ACTIVE_STATES).exists()


def pending_total() -> int:
    """Pending messages of all users."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_message WHERE flushed_at IS NULL")
        return cursor.fetchone()[0]


def wait_for_job(*, job_id: int, timeout: float) -> FlushJob:
    """Poll the job until it is no longer active or ``timeout`` (s) passes; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job_active(job_id=job_id):
        time.sleep(0.05)
    return FlushJob.objects.get(pk=job_id)


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
