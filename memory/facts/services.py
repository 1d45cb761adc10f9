"""Writes of the facts layer: queueing extraction beside the flush, running a job (extract,
resolve times, embed, consolidate, write), the per-tenant budget, the sweep that follows
deleted and edited messages, and the admin's re-run.

Nothing here runs while the layer is off (``memory.inference.llm.enabled()``). M0 never
waits for any of it: the flush only queues a job (one statement, after its own write has
committed), and everything slow (the LLM, the embedding) happens in the extraction workers
(``memory.facts.worker``), outside any transaction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from pgvector import Vector

from memory import embedding_guard, embedding_model
from memory.facts import prompts, times
from memory.facts.models import FactJob, LlmCall
from memory.facts.selectors import facts_similar
from memory.inference import BACKGROUND, llm, registry
from memory.pgvector_binary import VectorArray, use_binary_vectors

logger = logging.getLogger(__name__)


# --- queue ---------------------------------------------------------------------------------------

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


# --- budget --------------------------------------------------------------------------------------


def tenants_over_budget() -> list[uuid.UUID]:
    """Tenants whose calls or tokens in the last minute, counted over every process
    (``LlmCall``), reached ``LLM_TENANT_CALLS_PER_MINUTE`` or ``LLM_TENANT_TOKENS_PER_MINUTE``
    (a bound of 0 is none). Their jobs are not claimed until the minute slides on."""
    calls, tokens = settings.LLM["TENANT_CALLS_PER_MINUTE"], settings.LLM["TENANT_TOKENS_PER_MINUTE"]
    if not calls and not tokens:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT tenant_id FROM memory_llmcall WHERE at > now() - interval '1 minute'
            GROUP BY tenant_id
            HAVING (%(calls)s > 0 AND count(*) >= %(calls)s)
                OR (%(tokens)s > 0 AND sum(prompt_tokens + completion_tokens) >= %(tokens)s)
            """,
            {"calls": calls, "tokens": tokens},
        )
        return [row[0] for row in cursor.fetchall()]


def _record_call(
    *, tenant_id: uuid.UUID, purpose: str, usage: llm.Usage | None, ok: bool, latency_ms: float = 0.0
) -> None:
    LlmCall.objects.create(
        tenant_id=tenant_id,
        purpose=purpose,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        latency_ms=usage.latency_ms if usage else latency_ms,
        ok=ok,
    )


# --- claim ---------------------------------------------------------------------------------------

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
    over = tenants_over_budget()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, {"lease": settings.LLM["TIMEOUT_SECONDS"] * 4 + 60, "over": [str(t) for t in over]})
        row = cursor.fetchone()
    return FactJob.objects.get(pk=row[0]) if row else None


# --- run -----------------------------------------------------------------------------------------


@dataclass
class _Turn:
    id: uuid.UUID
    seq: int
    position: int
    text: str
    created_at: datetime


def _window(job: FactJob) -> list[_Turn]:
    """The job's messages that still exist, in session order."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, seq, position, index_text, created_at FROM memory_message "
            "WHERE session_id = %s AND user_id = %s AND id = ANY(%s::uuid[]) ORDER BY position",
            [job.session_id, job.user_id, [str(i) for i in job.message_ids]],
        )
        return [_Turn(*row) for row in cursor.fetchall()]


def _context(*, session_id: uuid.UUID, before: int, count: int) -> list[str]:
    if count <= 0:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT index_text FROM memory_message WHERE session_id = %s AND position < %s AND position >= %s ORDER BY position",
            [session_id, before, before - count],
        )
        return [row[0] for row in cursor.fetchall()]


def _valid_from(fact: prompts.ExtractedFact, *, on: date) -> date | None:
    """The fact's date: its time words resolved here when they are a known form
    (``memory.facts.times``), else the LLM's ISO date when it gave a valid one."""
    if fact.time_expression:
        resolved = times.resolve(fact.time_expression, on=on)
        if resolved is not None:
            return resolved
    if fact.valid_from:
        try:
            return date.fromisoformat(fact.valid_from[:10])
        except ValueError:
            return None
    return None


@dataclass
class _NewFact:
    text: str
    kind: str
    entities: list[str]
    valid_from: date | None
    time_expression: str
    confidence: float
    sources: list[_Turn]
    embedding: object = None


def _extract(job: FactJob, turns: list[_Turn]) -> list[_NewFact]:
    """One LLM call per chunk of ``FACTS_WINDOW_TURNS`` turns. Raises ``llm.LLMError``."""
    config = settings.LLM
    extracted: list[_NewFact] = []
    size = max(1, config["WINDOW_TURNS"])
    for start in range(0, len(turns), size):
        chunk = turns[start : start + size]
        on = chunk[0].created_at.date()
        prompt = prompts.extract_prompt(
            session_date=f"{on.isoformat()} ({on.strftime('%A')})",
            context=_context(session_id=job.session_id, before=chunk[0].position, count=config["CONTEXT_TURNS"]),
            turns=[turn.text for turn in chunk],
        )
        answer = _call(job, purpose="extract", system=prompts.EXTRACT_SYSTEM, user=prompt, schema=prompts.Extraction)
        for fact in answer.facts:
            sources = [chunk[n - 1] for n in dict.fromkeys(fact.sources) if 1 <= n <= len(chunk)]
            if not sources:
                continue  # a fact no turn of the window states has no provenance: dropped
            extracted.append(
                _NewFact(
                    text=fact.text.strip(),
                    kind=fact.kind,
                    entities=[e.strip()[:255] for e in fact.entities if e.strip()],
                    valid_from=_valid_from(fact, on=on),
                    time_expression=fact.time_expression.strip(),
                    confidence=fact.confidence,
                    sources=sources,
                )
            )
    return extracted


def _call(job: FactJob, *, purpose: str, system: str, user: str, schema):
    try:
        answer, usage = llm.chat_json(system=system, user=user, schema=schema, name=purpose)
    except llm.LLMError as exc:
        _record_call(tenant_id=job.tenant_id, purpose=purpose, usage=exc.usage, ok=False)
        raise
    _record_call(tenant_id=job.tenant_id, purpose=purpose, usage=usage, ok=True)
    return answer


def _consolidate(job: FactJob, new: list[_NewFact]) -> list[tuple[_NewFact, str, uuid.UUID | None, str | None]]:
    """Mem0's update step (Chhikara et al. 2025, arXiv 2504.19413): each new fact beside the
    user's most similar live facts (``facts_similar``, the same hybrid of vector and BM25
    as the messages', its vector side within ``FACTS_SIMILARITY_MIN`` cosine similarity);
    one LLM call for the whole window, none when the user has no similar fact (every new
    fact is then an ADD). Returns ``[(fact, event, existing_id, text)]``."""
    existing_ids: list[uuid.UUID] = []
    for fact in new:
        for fact_id, _ in facts_similar(
            user_id=job.user_id,
            text=fact.text,
            embedding=fact.embedding,
            limit=settings.LLM["SIMILAR_FACTS"],
            max_distance=1.0 - settings.LLM["SIMILARITY_MIN"],
        ):
            if fact_id not in existing_ids:
                existing_ids.append(fact_id)
    if not existing_ids:
        return [(fact, "ADD", None, None) for fact in new]
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM memory_fact WHERE id = ANY(%s)", [existing_ids])
        texts = dict(cursor.fetchall())
    existing_ids = [i for i in existing_ids if i in texts]
    answer = _call(
        job,
        purpose="consolidate",
        system=prompts.CONSOLIDATE_SYSTEM,
        user=prompts.consolidate_prompt(existing=[texts[i] for i in existing_ids], new=[f.text for f in new]),
        schema=prompts.Consolidation,
    )
    decided: dict[int, tuple[str, uuid.UUID | None, str | None]] = {}
    for decision in answer.decisions:
        if not 1 <= decision.new <= len(new) or decision.new in decided:
            continue
        target = (
            existing_ids[decision.existing - 1]
            if decision.existing and 1 <= decision.existing <= len(existing_ids)
            else None
        )
        if decision.event in ("UPDATE", "DELETE") and target is None:
            decided[decision.new] = ("ADD", None, None)  # an update of nothing is a new fact
        else:
            decided[decision.new] = (decision.event, target, decision.text)
    # A fact the answer left out is added: losing it would be worse than a duplicate.
    return [(fact, *decided.get(n, ("ADD", None, None))) for n, fact in enumerate(new, start=1)]


_INSERT_FACT_SQL = """
INSERT INTO memory_fact (id, user_id, text, kind, entities, valid_from, time_expression, confidence,
                         model, embedding, embedding_generation, version, created_at)
VALUES (%(id)s, %(user)s, %(text)s, %(kind)s, %(entities)s, %(valid_from)s, %(expression)s,
        %(confidence)s, %(model)s, %(embedding)s, %(generation)s, %(version)s, now())
"""


def _write(job: FactJob, decisions, *, generation: int | None) -> int:
    """Write the decisions in one transaction; returns the facts written (added or new versions).

    Takes ``FOR KEY SHARE`` on the user row first, the lock order of every writer of a user's
    data (docs/architecture.md): a cascade delete of the user waits for this, or this finds
    the user gone and writes nothing. Sources whose message was deleted or edited since the
    window was read are not written, and a fact left with none is dropped."""
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        embedding_guard.guard_write(cursor, generation=generation)
        cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [job.user_id])
        if cursor.rowcount != 1:
            return 0
        # Only while this run's claim stands: a run whose lease expired (its calls outlasted
        # it) and whose job another worker claimed since writes nothing, so no fact is doubled.
        cursor.execute(
            "SELECT FROM memory_factjob WHERE id = %s AND state = 'running' AND attempts = %s FOR UPDATE",
            [job.pk, job.attempts],
        )
        if cursor.rowcount != 1:
            return 0
        message_ids = {str(t.id) for fact, *_ in decisions for t in fact.sources}
        cursor.execute(
            "SELECT id, seq FROM memory_message WHERE id = ANY(%s::uuid[]) FOR KEY SHARE", [list(message_ids)]
        )
        current = dict(cursor.fetchall())
        use_binary_vectors(cursor)
        for fact, event, existing, text in decisions:
            sources = [(t.id, t.seq) for t in fact.sources if current.get(t.id) == t.seq]
            if not sources:
                continue
            if event == "NONE" and existing is not None:
                _add_sources(cursor, existing, sources)
                continue
            if event == "DELETE":
                cursor.execute(
                    "UPDATE memory_fact SET deleted_at = now() WHERE id = %s AND user_id = %s AND superseded_by_id IS NULL",
                    [existing, job.user_id],
                )
                continue
            version, inherited = 1, []
            if event == "UPDATE":
                cursor.execute(
                    "SELECT version FROM memory_fact WHERE id = %s AND user_id = %s AND superseded_by_id IS NULL "
                    "AND deleted_at IS NULL FOR UPDATE",
                    [existing, job.user_id],
                )
                row = cursor.fetchone()
                if row is None:
                    existing = None  # replaced or deleted meanwhile: this one is new
                else:
                    version = row[0] + 1
                    cursor.execute(
                        "SELECT message_id, message_seq FROM memory_factsource WHERE fact_id = %s", [existing]
                    )
                    inherited = cursor.fetchall()
            fact_id = uuid.uuid4()
            cursor.execute(
                _INSERT_FACT_SQL,
                {
                    "id": fact_id,
                    "user": job.user_id,
                    "text": (text or fact.text) if event == "UPDATE" else fact.text,
                    "kind": fact.kind,
                    "entities": fact.entities,
                    "valid_from": fact.valid_from,
                    "expression": fact.time_expression,
                    "confidence": fact.confidence,
                    "model": llm.model_name(),
                    "embedding": Vector(fact.embedding) if fact.embedding is not None else None,
                    "generation": generation,
                    "version": version,
                },
            )
            _add_sources(cursor, fact_id, [*inherited, *sources])
            if event == "UPDATE" and existing is not None:
                cursor.execute("UPDATE memory_fact SET superseded_by_id = %s WHERE id = %s", [fact_id, existing])
            written += 1
    return written


def _add_sources(cursor, fact_id: uuid.UUID, sources: list[tuple]) -> None:
    cursor.execute(
        "INSERT INTO memory_factsource (fact_id, message_id, message_seq) "
        "SELECT %s, s.id, s.seq FROM unnest(%s::uuid[], %s::bigint[]) AS s(id, seq) "
        "ON CONFLICT (fact_id, message_id) DO UPDATE SET message_seq = EXCLUDED.message_seq",
        [fact_id, [str(s[0]) for s in sources], [s[1] for s in sources]],
    )


def facts_run_job(job: FactJob) -> int:
    """Run a claimed job: read its window, extract (one LLM call per ``FACTS_WINDOW_TURNS``
    turns), resolve times against the session's date, embed the facts with the active
    embedding model, consolidate (``_consolidate``) and write. Returns the facts written.

    A failure (``llm.LLMError``, the embedding model, the database) queues the job again
    after a backoff (``FACTS_BACKOFF_SECONDS`` doubling per attempt, at most
    ``FACTS_BACKOFF_MAX_SECONDS``, at least the endpoint's ``Retry-After``), or marks it
    ``dead`` after ``FACTS_MAX_ATTEMPTS`` attempts; nothing is written by a failed run.
    """
    try:
        turns = _window(job)
        new = _extract(job, turns) if turns else []
        written = 0
        if new:
            while True:
                generation = embedding_model.follow_active_model()
                vectors = registry.embed([fact.text for fact in new], priority=BACKGROUND)
                for fact, vector in zip(new, vectors, strict=True):
                    fact.embedding = vector
                decisions = _consolidate(job, new)
                try:
                    written = _write(job, decisions, generation=generation)
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


# --- reembed -------------------------------------------------------------------------------------


def facts_reembed(*, embed=None, generation: int | None = None, batch_size: int = 256) -> int:
    """Embed again, without the LLM, the facts whose embedding is not the active embedding
    model's (``Fact.embedding_generation``); returns how many. Run by ``reembed`` after its
    switch, and by the extraction workers when idle (so a switch made while the layer was off
    is caught up too).

    ``embed(texts) -> (n, dim)`` float32 (default: this process's background model, after
    ``follow_active_model``); ``generation``: the active ``EmbeddingModel`` id (default: read).
    When the active model's dimension is not the column's, the column is retyped first
    (``ALTER TABLE ... TYPE vector(dim) USING NULL``: every fact is then found by its words
    only until it is embedded again). A fact's text never changes, so a batch is written
    without a claim; the write takes the switch's shared lock (``guard_write``) and stops
    when another switch happened meanwhile."""

    if embed is None:
        generation = embedding_model.follow_active_model(force=True)
        embed = lambda texts: registry.embed(texts, priority=BACKGROUND)  # noqa: E731
    model = embedding_model.active_model(max_age=0.0)
    if generation is None:
        generation = model.id
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'memory_fact'::regclass AND attname = 'embedding'"
        )
        column_dimension = cursor.fetchone()[0]
        if model.dimension and model.dimension != column_dimension:
            cursor.execute(
                f"ALTER TABLE memory_fact ALTER COLUMN embedding TYPE vector({int(model.dimension)}) USING NULL"
            )
    done = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id, text FROM memory_fact WHERE embedding_generation IS DISTINCT FROM %s "
                "OR embedding IS NULL ORDER BY id LIMIT %s",
                [generation, batch_size],
            )
            rows = cursor.fetchall()
        if not rows:
            return done
        vectors = embed([text for _, text in rows])
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                embedding_guard.guard_write(cursor, generation=generation)
                use_binary_vectors(cursor)
                cursor.execute(
                    "UPDATE memory_fact f SET embedding = v.embedding, embedding_generation = %(generation)s "
                    "FROM unnest(%(ids)s::uuid[], %(vectors)s::vector[]) AS v(id, embedding) WHERE f.id = v.id",
                    {
                        "generation": generation,
                        "ids": [str(row[0]) for row in rows],
                        "vectors": VectorArray(Vector(vector) for vector in vectors),
                    },
                )
        except embedding_guard.ModelChanged:
            return done
        done += len(rows)


# --- provenance ----------------------------------------------------------------------------------


def facts_sweep() -> int:
    """Delete the facts none of whose sources still exists at the version it was read in
    (their messages deleted or edited; an edited message is flushed again and its new text
    extracted again), and the sources that no longer hold. Returns the facts deleted.

    Reads already skip such facts (``memory.facts.selectors``); this reclaims their rows.
    A fact's older versions go with it: they share its sources."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """
            DELETE FROM memory_factsource s WHERE NOT EXISTS (
                SELECT 1 FROM memory_message m WHERE m.id = s.message_id AND m.seq = s.message_seq)
            """
        )
        cursor.execute(
            "DELETE FROM memory_fact f WHERE NOT EXISTS (SELECT 1 FROM memory_factsource s WHERE s.fact_id = f.id)"
        )
        return cursor.rowcount


def facts_purge() -> None:
    """Delete ``LlmCall`` rows older than an hour and finished jobs older than a day (dead
    ones after a week: an operator may re-run them)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM memory_llmcall WHERE at < now() - interval '1 hour'")
        cursor.execute(
            "DELETE FROM memory_factjob WHERE (state = 'done' AND finished_at < now() - interval '1 day') "
            "OR (state = 'dead' AND finished_at < now() - interval '7 days')"
        )


__all__ = [
    "facts_claim",
    "facts_purge",
    "facts_queue",
    "facts_rerun",
    "facts_run_job",
    "facts_sweep",
    "tenants_over_budget",
]
