"""The facts layer's jobs: queueing extraction beside the flush, claiming a job fairly across
tenants, running it (extract, embed, consolidate, write), its retries and dead letters, the
admin's re-run, and the purge of finished jobs and old ``LlmCall`` rows.

Nothing here runs while the layer is off (``memory.inference.llm.enabled()``). M0 never
waits for any of it: the flush only queues a job (one statement, after its own write has
committed), and everything slow (the LLM, the embedding) happens in the extraction workers
(``memory.facts.worker``), outside any transaction.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memory import embedding_guard, embedding_model
from memory.facts import budget, consolidation, extraction
from memory.facts.models import FactJob
from memory.inference import BACKGROUND, llm, registry

logger = logging.getLogger(__name__)


_QUEUE_SQL = """
INSERT INTO memory_factjob (tenant_id, user_id, session_id, message_ids, state, attempts,
                            next_attempt_at, last_error, facts_written, created_at)
SELECT u.tenant_id, u.id, %(session)s, %(ids)s::uuid[], 'queued', 0, now(), '', 0, now()
FROM memory_user u WHERE u.id = %(user)s
ON CONFLICT (session_id) WHERE state = 'queued'
DO UPDATE SET message_ids = ARRAY(SELECT DISTINCT unnest(memory_factjob.message_ids || EXCLUDED.message_ids))
"""


def facts_queue(*, user_id: uuid.UUID, by_session: dict[uuid.UUID, list]) -> None:
    """Queue the extraction of messages just flushed: one ``FactJob`` per session, or the
    messages appended to the session's queued one. ``by_session``: ``{session_id: [message_id]}``.

    Called by the flush after each batch is written (``memory.indexing.flush``); does nothing while
    the layer is off. Never raises: a failure is logged, and costs the facts of those
    messages, never the flush.
    """
    if not llm.enabled() or not by_session:
        return
    try:
        with connection.cursor() as cursor:
            for session_id, message_ids in by_session.items():
                cursor.execute(
                    _QUEUE_SQL, {"session": session_id, "ids": [str(i) for i in message_ids], "user": user_id}
                )
    except Exception:
        logger.warning("could not queue the facts of user %s's flushed messages", user_id, exc_info=True)


def facts_rerun(*, job_ids: list[int]) -> int:
    """Queue dead (or done) jobs again, attempts reset: the admin's re-run. Returns how many.

    A job whose session already has a queued job is folded into it (its messages appended)."""
    count = 0
    for job in FactJob.objects.filter(pk__in=job_ids).exclude(state__in=[FactJob.State.QUEUED, FactJob.State.RUNNING]):
        with connection.cursor() as cursor:
            cursor.execute(
                _QUEUE_SQL, {"session": job.session_id, "ids": [str(i) for i in job.message_ids], "user": job.user_id}
            )
        count += 1
    return count


# Fair across tenants: the runnable job of the tenant whose last LLM call is the oldest (or
# who never called), oldest job first within it. A running job whose claim expired (a dead
# worker) is runnable again.
_CLAIM_SQL = """
UPDATE memory_factjob SET state = 'running', attempts = attempts + 1,
                          claimed_until = now() + make_interval(secs => %(lease)s)
WHERE id = (
    SELECT j.id FROM memory_factjob j
    WHERE ((j.state = 'queued' AND j.next_attempt_at <= now())
           OR (j.state = 'running' AND j.claimed_until < now()))
      AND NOT (j.tenant_id = ANY(%(over)s::uuid[]))
    ORDER BY (SELECT max(c.at) FROM memory_llmcall c WHERE c.tenant_id = j.tenant_id) NULLS FIRST,
             j.next_attempt_at, j.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""


def facts_claim() -> FactJob | None:
    """Claim the next runnable job (``FOR UPDATE SKIP LOCKED``: concurrent workers never wait
    for each other), or ``None``; tenants over their budget are skipped."""
    over = budget.tenants_over_budget()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, {"lease": settings.LLM["TIMEOUT_SECONDS"] * 4 + 60, "over": [str(t) for t in over]})
        row = cursor.fetchone()
    return FactJob.objects.get(pk=row[0]) if row else None


def facts_run_job(job: FactJob) -> int:
    """Run a claimed job: read its window, extract (one LLM call per ``FACTS_WINDOW_TURNS``
    turns), resolve times against the session's date, embed the facts with the active
    embedding model, consolidate and write (``memory.facts.consolidation``). Returns the facts
    written.

    A failure (``llm.LLMError``, the embedding model, the database) queues the job again
    after a backoff (``FACTS_BACKOFF_SECONDS`` doubling per attempt, at most
    ``FACTS_BACKOFF_MAX_SECONDS``, at least the endpoint's ``Retry-After``), or marks it
    ``dead`` after ``FACTS_MAX_ATTEMPTS`` attempts; nothing is written by a failed run.
    """
    try:
        turns = extraction.window(job)
        new = extraction.extract(job, turns) if turns else []
        written = 0
        if new:
            while True:
                generation = embedding_model.follow_active_model()
                vectors = registry.embed([fact.text for fact in new], priority=BACKGROUND)
                for fact, vector in zip(new, vectors, strict=True):
                    fact.embedding = vector
                decisions = consolidation.consolidate(job, new)
                try:
                    written = consolidation.write(job, decisions, generation=generation)
                    break
                except embedding_guard.ModelChanged:
                    embedding_model.follow_active_model(force=True)
    except Exception as exc:
        _fail(job, exc)
        return 0
    FactJob.objects.filter(pk=job.pk, state=FactJob.State.RUNNING, attempts=job.attempts).update(
        state=FactJob.State.DONE, finished_at=timezone.now(), claimed_until=None, facts_written=written, last_error=""
    )
    return written


def _fail(job: FactJob, exc: Exception) -> None:
    config = settings.LLM
    error = f"{type(exc).__name__}: {exc}"[:2000]
    if job.attempts >= config["MAX_ATTEMPTS"]:
        logger.warning("facts job %s is dead after %s attempts: %s", job.pk, job.attempts, error)
        FactJob.objects.filter(pk=job.pk, state=FactJob.State.RUNNING, attempts=job.attempts).update(
            state=FactJob.State.DEAD, finished_at=timezone.now(), claimed_until=None, last_error=error
        )
        return
    delay = min(config["BACKOFF_SECONDS"] * 2 ** (job.attempts - 1), config["BACKOFF_MAX_SECONDS"])
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, retry_after)
    logger.info("facts job %s failed (attempt %s), retried in %.0f s: %s", job.pk, job.attempts, delay, error)
    # Back to queued, unless the session already has a queued job: then folded into it.
    with transaction.atomic():
        folded = (
            FactJob.objects.filter(session_id=job.session_id, state=FactJob.State.QUEUED).exclude(pk=job.pk).first()
        )
        if folded is not None:
            with connection.cursor() as cursor:
                cursor.execute(
                    _QUEUE_SQL,
                    {"session": job.session_id, "ids": [str(i) for i in job.message_ids], "user": job.user_id},
                )
            FactJob.objects.filter(pk=job.pk, state=FactJob.State.RUNNING, attempts=job.attempts).update(
                state=FactJob.State.DONE, finished_at=timezone.now(), last_error=error
            )
        else:
            FactJob.objects.filter(pk=job.pk, state=FactJob.State.RUNNING, attempts=job.attempts).update(
                state=FactJob.State.QUEUED,
                next_attempt_at=timezone.now() + timedelta(seconds=delay),
                claimed_until=None,
                last_error=error,
            )


def facts_purge() -> None:
    """Delete ``LlmCall`` rows older than an hour and finished jobs older than a day (dead
    ones after a week: an operator may re-run them)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM memory_llmcall WHERE at < now() - interval '1 hour'")
        cursor.execute(
            "DELETE FROM memory_factjob WHERE (state = 'done' AND finished_at < now() - interval '1 day') "
            "OR (state = 'dead' AND finished_at < now() - interval '7 days')"
        )
