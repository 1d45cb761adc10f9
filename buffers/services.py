"""Write-behind: pending messages, flush requests, and the flush itself.

A message is durable (a row, full-text indexed) before its add is acknowledged; what a flush
does later is the expensive part: embedding and the vector index. The flush is idempotent:

1. **claim** (short transaction): pending rows not under a live claim are locked with
   ``FOR UPDATE SKIP LOCKED`` (a concurrent flush skips them rather than waiting) and given
   this flush's token and a lease;
2. **embed** outside any transaction, through the registry's cross-user batcher;
3. **write** in one ``UPDATE ... FROM unnest(...)`` per batch, only where the token still
   stands. A second flush never sees rows under a live claim; a flush whose worker died
   leaves a claim that another process releases once the dead one stops beating
   (``buffers.heartbeats``), or that expires with its lease; a message changed meanwhile
   lost its token and is not overwritten. So each message is embedded and written once.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from buffers import events
from buffers.models import ACTIVE_STATES, FlushJob, Priority, Reason, State
from memory import metrics
from memory.inference import registry
from memory.pool import is_database_unavailable
from memory.retrieval import cache
from memory.retrieval.vector import context_refresh
from memory.vectors import vector_literals

logger = logging.getLogger(__name__)


class FlushTimeout(Exception):
    """A flush ran past its deadline (``FLUSH_TIMEOUT_SECONDS``); it is retried."""


@dataclass(frozen=True)
class PendingSummary:
    """A user's pending messages: how many, estimated tokens (chars / 4), oldest change age (s)."""

    messages: int
    tokens: int
    oldest_age_seconds: float


def pending_summary(*, user_id: uuid.UUID) -> PendingSummary:
    """The user's pending (not yet flushed) messages, from the partial index on them."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), coalesce(sum(length(index_text)), 0), "
            "greatest(extract(epoch FROM now() - min(updated_at)), 0) "
            "FROM memory_message WHERE user_id = %s AND flushed_at IS NULL",
            [user_id],
        )
        count, chars, age = cursor.fetchone()
    return PendingSummary(messages=count, tokens=int(chars) // 4, oldest_age_seconds=float(age))


def size_trigger_reached(summary: PendingSummary) -> bool:
    """Whether pending messages or tokens are over the size thresholds."""
    config = settings.BUFFERS
    return summary.messages >= config["SIZE_MESSAGES"] or summary.tokens >= config["SIZE_TOKENS"]


def request_flush(
    *, user_id: uuid.UUID, priority: int, reason: str, session_id: uuid.UUID | None = None
) -> int:
    """Queue a flush of the user's (or one session's) pending messages; returns the job id.

    Durable: the job is a row, written in the caller's transaction. At most one user-wide job
    waits per user: a new request raises that job's priority instead of adding another.
    Workers are notified when the transaction commits (``events.notify_flush``); a lost
    notification only delays the flush until the next poll.
    """
    with connection.cursor() as cursor:
        if session_id is None:
            cursor.execute(
                """
                INSERT INTO buffers_flushjob
                    (user_id, session_id, priority, reason, state, attempts, max_attempts, last_error,
                     messages_flushed, worker, created_at, next_attempt_at)
                VALUES (%(user)s, NULL, %(priority)s, %(reason)s, 'queued', 0, %(max)s, '', 0, '', now(), now())
                ON CONFLICT (user_id) WHERE state IN ('queued', 'retrying') AND session_id IS NULL
                DO UPDATE SET priority = LEAST(buffers_flushjob.priority, EXCLUDED.priority),
                              reason = CASE WHEN EXCLUDED.priority < buffers_flushjob.priority
                                            THEN EXCLUDED.reason ELSE buffers_flushjob.reason END,
                              next_attempt_at = CASE WHEN EXCLUDED.priority < buffers_flushjob.priority
                                                     THEN now() ELSE buffers_flushjob.next_attempt_at END
                RETURNING id
                """,
                {"user": user_id, "priority": priority, "reason": reason, "max": settings.BUFFERS["MAX_ATTEMPTS"]},
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


def note_pending(*, user_id: uuid.UUID) -> PendingSummary:
    """After a write of the user's messages (same transaction): apply the size trigger.

    Returns the user's pending summary, which the add's answer reports.
    """
    summary = pending_summary(user_id=user_id)
    apply_size_trigger(user_id=user_id, summary=summary)
    return summary


def apply_size_trigger(*, user_id: uuid.UUID, summary: PendingSummary) -> None:
    """Queue a size-triggered (normal priority) flush when ``summary`` is over a threshold.

    Called after a write, in its transaction or just after it commits: should the process die
    in between, the periodic time trigger still flushes the messages (they are rows).
    """
    if size_trigger_reached(summary):
        request_flush(user_id=user_id, priority=Priority.NORMAL, reason=Reason.SIZE)


# A flush's own transactions commit without waiting for their WAL to reach the disk: what
# they write can be redone. Should PostgreSQL crash before the WAL writer flushes them (a
# fraction of a second), the messages are pending again and the next flush embeds them
# (a claim is a lease; an embedding is recomputed). Nothing acknowledged to a client is
# lost, and the adds' commits no longer queue behind the flush's fsyncs.
_NO_FSYNC = "SET LOCAL synchronous_commit = off"


def _claim(*, user_id: uuid.UUID, session_id: uuid.UUID | None, token: uuid.UUID, limit: int) -> list[tuple]:
    """Claim up to ``limit`` pending messages: ``[(id, index_text, updated_at)]``, oldest change first."""
    lease = settings.BUFFERS["LEASE_SECONDS"]
    session_filter = "AND session_id = %(session)s" if session_id else ""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_NO_FSYNC)
        cursor.execute(
            f"""
            UPDATE memory_message SET flush_claim = %(token)s,
                                      claimed_until = now() + make_interval(secs => %(lease)s)
            WHERE id IN (
                SELECT id FROM memory_message
                WHERE user_id = %(user)s {session_filter} AND flushed_at IS NULL
                  AND (claimed_until IS NULL OR claimed_until < now())
                ORDER BY updated_at, id
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, index_text, updated_at
            """,
            {"token": token, "lease": lease, "user": user_id, "session": session_id, "limit": limit},
        )
        return cursor.fetchall()


def _write(*, user_id: uuid.UUID, token: uuid.UUID, ids: list[uuid.UUID], vectors) -> list[tuple]:
    """Write embeddings where ``token`` still holds the claim, and the context embeddings
    around them (``memory.retrieval.vector.context_refresh``); returns ``[(id, session_id)]``.

    Takes ``FOR KEY SHARE`` on the user's row first: the lock order of every writer of a
    user's messages (see ``memory.services._bump_memory_version``), so this ``UPDATE`` and an
    edit or a cascade delete never deadlock. Adds (``FOR NO KEY UPDATE``) do not conflict
    with it: an add never waits for this write. Two flushes of one user take turns (a
    transaction-level advisory lock on the user): each rewrites the context embeddings of
    the other's neighbouring rows.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_NO_FSYNC)
        cursor.execute("SELECT ann_bucket FROM memory_user WHERE id = %s FOR KEY SHARE", [user_id])
        row = cursor.fetchone()
        if row is None:
            return []  # the user was deleted meanwhile
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 0))", [user_id])
        cursor.execute(
            """
            UPDATE memory_message AS m
            SET embedding = v.embedding::vector, flushed_at = now(), flush_claim = NULL,
                claimed_until = NULL, flush_count = m.flush_count + 1
            FROM unnest(%(ids)s::uuid[], %(vectors)s::text[]) AS v(id, embedding)
            WHERE m.id = v.id AND m.flush_claim = %(token)s
            RETURNING m.id, m.session_id, m.position
            """,
            {"ids": ids, "vectors": vector_literals(vectors), "token": token},
        )
        written = cursor.fetchall()
        context_refresh(cursor, seeds=[(session, position) for _, session, position in written], bucket=row[0])
        return [(message_id, session) for message_id, session, _ in written]


def flush_pending(
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID | None = None,
    deadline: float | None = None,
    batch_size: int | None = None,
    token: uuid.UUID | None = None,
) -> int:
    """Embed and index the user's (or one session's) pending messages; returns how many.

    Batch by batch: claim (``SKIP LOCKED``), embed, write (see the module docstring).
    ``deadline`` is a ``time.monotonic()`` value; past it, ``FlushTimeout`` is raised between
    batches (claimed but unwritten rows are taken again when their lease expires). Publishes
    ``flush.completed`` to each session's group after each batch is written. ``token`` is the
    claim token (a job's ``claim_token``, so a dead worker's claims can be found; default new).
    """
    batch_size = batch_size or settings.BUFFERS["BATCH_SIZE"]
    token = token or uuid.uuid4()
    start = time.perf_counter()
    try:
        flushed = _flush_batches(user_id=user_id, session_id=session_id, deadline=deadline, batch_size=batch_size, token=token)
    except BaseException:
        metrics.FLUSHES.labels("error").inc()
        _release(token)
        raise
    metrics.FLUSH_SECONDS.observe(time.perf_counter() - start)
    metrics.FLUSHES.labels("ok").inc()
    metrics.MESSAGES_FLUSHED.inc(flushed)
    if flushed:
        maintain_indexes(user_id)
    return flushed


def maintain_indexes(user_id: uuid.UUID) -> None:
    """After a flush: move a user whose history passed ``ANN_MIN_MESSAGES`` to the HNSW
    index (``vector.ann_enable``) and rewrite their lexical index's snapshot when it lags
    (``retrieval.cache.refresh_snapshot``). Derived data only: a failure is logged, and the
    next flush tries again."""
    from memory.retrieval import vector

    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT CASE WHEN ann_bucket IS NOT NULL THEN false ELSE "
                "(SELECT count(*) FROM memory_message WHERE user_id = %(user)s) >= %(min)s END "
                "FROM memory_user WHERE id = %(user)s",
                {"user": user_id, "min": settings.MEMFUSE["ANN_MIN_MESSAGES"]},
            )
            row = cursor.fetchone()
        if row and row[0]:
            vector.ann_enable(user_id=user_id)
        cache.refresh_snapshot(user_id)
    except Exception:
        logger.warning("index maintenance of user %s failed; the next flush retries", user_id, exc_info=True)


def _release(token: uuid.UUID) -> None:
    """Give up the claims of a failed flush so its retry can take the rows at once.

    Best effort: when the store itself is failing, the claims' leases expire instead.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE memory_message SET flush_claim = NULL, claimed_until = NULL WHERE flush_claim = %s", [token]
            )
    except Exception as exc:
        if is_database_unavailable(exc):  # the worker logs the outage once; the job is released later
            return
        logger.warning("could not release the claims of a failed flush; their leases will expire", exc_info=True)


def _embed_claimed(user_id: uuid.UUID, claimed: list[tuple]) -> np.ndarray:
    """Embeddings ``(len(claimed), dim)`` of claimed rows ``[(id, index_text, updated_at)]``.

    In the chat pattern a query embeds the round just added before its flush does (read
    your writes): when that embedding is exactly the flush's (``registry.
    queries_embed_documents``) and still in this process's cache of the user, it is written
    as it is; the rest are embedded in the background. Raises ``EmbeddingProcessError``.
    """
    reused = {}
    if registry.queries_embed_documents():
        reused = cache.embedded_pending(user_id, [(row[0], row[2]) for row in claimed])
    missing = [row[1] for row in claimed if (row[0], row[2]) not in reused]
    embedded = iter(registry.embed(missing, priority=registry.BACKGROUND) if missing else ())
    return np.stack([reused[(row[0], row[2])] if (row[0], row[2]) in reused else next(embedded) for row in claimed])


def _flush_batches(
    *, user_id: uuid.UUID, session_id: uuid.UUID | None, deadline: float | None, batch_size: int, token: uuid.UUID
) -> int:
    flushed = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise FlushTimeout(f"flush of user {user_id} passed its deadline after {flushed} messages")
        claimed = _claim(user_id=user_id, session_id=session_id, token=token, limit=batch_size)
        if not claimed:
            return flushed
        ids = [row[0] for row in claimed]
        if not connection.in_atomic_block:
            # Give the connection back to the pool while the model works (seconds): flush
            # workers would otherwise hold one each and starve requests of connections.
            connection.close()
        vectors = _embed_claimed(user_id, claimed)
        written = _write(user_id=user_id, token=token, ids=ids, vectors=vectors)
        flushed += len(written)
        by_session: dict[uuid.UUID, list[str]] = {}
        for message_id, message_session in written:
            by_session.setdefault(message_session, []).append(str(message_id))
        for message_session, message_ids in by_session.items():
            events.flush_completed(session_id=message_session, message_ids=message_ids)


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
            """
            UPDATE buffers_flushjob SET state = 'running', worker = %(worker)s, started_at = now(),
                                        attempts = attempts + 1, process = %(process)s,
                                        claim_token = gen_random_uuid(),
                                        lease_until = now() + make_interval(secs => %(lease)s)
            WHERE id = (
                SELECT id FROM buffers_flushjob
                WHERE state IN ('queued', 'retrying') AND next_attempt_at <= clock_timestamp()
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
    (``memory.pool.is_database_unavailable``), which cannot be recorded: it is raised, and the
    job stays running until its process releases it (``buffers.heartbeats``) once the
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
            """
            SELECT m.user_id FROM memory_message m
            WHERE m.flushed_at IS NULL AND (m.claimed_until IS NULL OR m.claimed_until < now())
            GROUP BY m.user_id
            HAVING min(m.updated_at) <= now() - make_interval(secs => %s)
               AND NOT EXISTS (SELECT 1 FROM buffers_flushjob j
                               WHERE j.user_id = m.user_id AND j.session_id IS NULL
                                 AND j.state IN ('queued', 'retrying', 'running'))
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
