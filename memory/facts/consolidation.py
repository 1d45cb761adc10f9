"""Consolidation: Mem0's update step, each new fact beside the user's most similar live facts
(ADD, UPDATE, DELETE or NONE; Chhikara et al. 2025, arXiv 2504.19413), and the write of
those decisions with their provenance (``FactSource``: the messages, at their ``seq``).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import connection, transaction
from pgvector import Vector

from memory import embedding_guard
from memory.facts import budget, prompts
from memory.facts.extraction import NewFact
from memory.facts.models import FactJob
from memory.facts.selectors import facts_similar
from memory.inference import llm
from memory.pgvector_binary import use_binary_vectors


def consolidate(job: FactJob, new: list[NewFact]) -> list[tuple[NewFact, str, uuid.UUID | None, str | None]]:
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
    answer = budget.call(
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


def write(job: FactJob, decisions, *, generation: int | None) -> int:
    """Write ``decisions`` (``consolidate``'s) in one transaction; returns the facts written
    (added or new versions).

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
