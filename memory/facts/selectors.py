"""Reads of the facts layer: a user's live facts most similar to a text or an embedding.

A fact is live while it is current (not superseded, not deleted) and at least one of its
source messages still exists at the version it was read in (``memory.facts.models``): a
fact whose messages were deleted or edited is never returned, even before the sweep
removes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

import numpy as np
from django.db import connection
from pgvector import Vector

from memory.embedding_model import active_model
from memory.inference import llm, registry
from memory.pgvector_binary import use_binary_vectors

_LIVE = """
    f.user_id = %(user)s AND f.superseded_by_id IS NULL AND f.deleted_at IS NULL
    AND EXISTS (SELECT 1 FROM memory_factsource s JOIN memory_message m
                ON m.id = s.message_id AND m.seq = s.message_seq WHERE s.fact_id = f.id{sources})
"""


def _live(*, agent_id: uuid.UUID | None, since: datetime | None, until: datetime | None) -> tuple[str, dict]:
    """The condition of a live fact of ``%(user)s`` and its parameters: a current version, one
    of its sources still as it was read, and, when a bound is given, that source said in the
    window (its message's ``created_at``, both ends inclusive, as M0's ``since``/``until``) and
    in a session of ``agent_id``."""
    sources, params = "", {}
    if since is not None:
        sources += " AND m.created_at >= %(since)s"
        params["since"] = since
    if until is not None:
        sources += " AND m.created_at <= %(until)s"
        params["until"] = until
    if agent_id is not None:
        sources += " AND m.session_id IN (SELECT id FROM memory_session WHERE user_id = %(user)s AND agent_id = %(agent)s)"
        params["agent"] = agent_id
    return _LIVE.format(sources=sources), params

# Reciprocal rank fusion's constant (Cormack et al. 2009), as the message retrieval uses.
RRF_K = 60


def facts_similar(
    *,
    user_id: uuid.UUID,
    text: str,
    embedding: np.ndarray | None,
    limit: int,
    max_distance: float = 2.0,
    agent_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[tuple[uuid.UUID, float]]:
    """The user's live facts most similar to ``text``: ``[(fact_id, rrf_score)]``, best first,
    at most ``limit``. Hybrid, like the message retrieval: the ``limit`` nearest by cosine
    distance of ``embedding`` (``(dim,)`` float32; ``None``: lexical only) and the ``limit``
    best by ``ts_rank_cd`` of any of ``text``'s words, fused by RRF. ``max_distance``: the
    vector side keeps only facts within that cosine distance (2: all). ``agent_id``,
    ``since``, ``until`` (aware datetimes): only facts with a source said in that agent's
    sessions and window (``_live``). Only ``user_id``'s rows are read."""
    live, bounds = _live(agent_id=agent_id, since=since, until=until)
    ranked: list[list[uuid.UUID]] = []
    with connection.cursor() as cursor:
        if embedding is not None:
            use_binary_vectors(cursor)
            cursor.execute(
                f"SELECT f.id FROM memory_fact f WHERE {live} AND f.embedding IS NOT NULL "
                "AND f.embedding_generation IS NOT DISTINCT FROM %(generation)s "
                "AND f.embedding <=> %(q)s <= %(max)s ORDER BY f.embedding <=> %(q)s LIMIT %(limit)s",
                {
                    **bounds,
                    "user": user_id,
                    "q": Vector(np.asarray(embedding, dtype=np.float32)),
                    "limit": limit,
                    "max": max_distance,
                    # Only vectors of the model the query was embedded with: after a reembed's
                    # switch, facts of the old one wait to be embedded again (facts_reembed).
                    "generation": active_model().id,
                },
            )
            ranked.append([row[0] for row in cursor.fetchall()])
        # Any of the words (plainto_tsquery ANDs them; a fact rarely holds every word of a question).
        cursor.execute(
            f"""
            WITH q AS (SELECT nullif(replace(plainto_tsquery('english', %(text)s)::text, '&', '|'), '')::tsquery AS q)
            SELECT f.id FROM memory_fact f, q WHERE q.q IS NOT NULL AND {live} AND f.search_vector @@ q.q
            ORDER BY ts_rank_cd(f.search_vector, q.q) DESC, f.created_at DESC LIMIT %(limit)s
            """,
            {**bounds, "user": user_id, "text": text, "limit": limit},
        )
        ranked.append([row[0] for row in cursor.fetchall()])
    scores: dict[uuid.UUID, float] = {}
    for ids in ranked:
        for rank, fact_id in enumerate(ids, start=1):
            scores[fact_id] = scores.get(fact_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: -item[1])[:limit]


def facts_results(*, user_id: uuid.UUID, scored: list[tuple[uuid.UUID, float]]) -> list[dict]:
    """Result dicts of ``scored`` facts (``facts_similar``'s), in that order, shaped like the
    message results of ``memory.selectors.memory_query``: ``{"id", "type": "fact", "layer":
    "m1", "content", "role": None, "score", "created_at", "metadata": {"kind", "entities",
    "valid_from", "time_expression", "confidence", "version", "model", "source_message_ids",
    "scope": None}}``; only the sources that still support the fact are listed."""
    if not scored:
        return []
    ids = [fact_id for fact_id, _ in scored]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT f.id, f.text, f.kind, f.entities, f.valid_from, f.time_expression, f.confidence,
                   f.version, f.model, f.created_at,
                   array(SELECT s.message_id FROM memory_factsource s JOIN memory_message m
                         ON m.id = s.message_id AND m.seq = s.message_seq
                         WHERE s.fact_id = f.id ORDER BY m.session_id, m.position)
            FROM memory_fact f WHERE f.user_id = %s AND f.id = ANY(%s)
            """,
            [user_id, ids],
        )
        rows = {row[0]: row for row in cursor.fetchall()}
    results = []
    for fact_id, score in scored:
        row = rows.get(fact_id)
        if row is None:
            continue
        _, text, kind, entities, valid_from, expression, confidence, version, model, created_at, sources = row
        results.append(
            {
                "id": str(fact_id),
                "type": "fact",
                "layer": "m1",
                "content": text,
                "role": None,
                "score": round(score, 6),
                "created_at": created_at.isoformat(),
                "metadata": {
                    "kind": kind,
                    "entities": list(entities),
                    "valid_from": valid_from.isoformat() if valid_from else None,
                    "time_expression": expression,
                    "confidence": confidence,
                    "version": version,
                    "model": model,
                    "source_message_ids": [str(source) for source in sources],
                    "scope": None,
                },
            }
        )
    return results


def fact_history(*, user_id: uuid.UUID, fact_id: uuid.UUID) -> list[dict]:
    """The versions of a fact, oldest first, ending with ``fact_id``: ``[{"id", "text",
    "version", "created_at", "deleted_at"}]`` (empty when the user has no such fact)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH RECURSIVE chain AS (
                SELECT id, text, version, created_at, deleted_at FROM memory_fact WHERE id = %(fact)s AND user_id = %(user)s
                UNION ALL
                SELECT f.id, f.text, f.version, f.created_at, f.deleted_at
                FROM memory_fact f JOIN chain c ON f.superseded_by_id = c.id WHERE f.user_id = %(user)s
            )
            SELECT id, text, version, created_at, deleted_at FROM chain ORDER BY version
            """,
            {"fact": fact_id, "user": user_id},
        )
        return [
            {
                "id": str(r[0]),
                "text": r[1],
                "version": r[2],
                "created_at": r[3].isoformat(),
                "deleted_at": r[4] and r[4].isoformat(),
            }
            for r in cursor.fetchall()
        ]


def default_layers() -> list[str]:
    """``["m0", "m1"]`` while the facts layer is on, else ``["m0"]``."""
    return ["m0", "m1"] if llm.enabled() else ["m0"]


def with_facts(
    *,
    user_id: uuid.UUID,
    query: str,
    top_k: int,
    messages: list[dict],
    layers: Collection[str],
    agent_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict]:
    """The query's results across ``layers``: ``messages`` (M0's results, each tagged
    ``"layer": "m0"``) and the user's live facts most similar to ``query`` (``facts_results``),
    merged by reciprocal rank (the i-th of either list scores ``1 / (60 + i)``: M0's fused
    scores and M1's are not on one scale) and cut to ``top_k``; ties keep M0 first. The query's
    embedding is the one M0's search asked for (``registry.submit_query`` with the user's
    scope returns that call). ``agent_id``, ``since``, ``until`` bound the facts by their
    sources as M0's messages are bound (``facts_similar``). Raises
    ``memory.inference.EmbeddingProcessError`` like M0."""
    for result in messages:
        result["layer"] = "m0"
    if "m1" not in layers:
        return messages
    embedding = registry.submit_query([query], scope=user_id).result()[0]
    facts = facts_results(
        user_id=user_id,
        scored=facts_similar(
            user_id=user_id, text=query, embedding=embedding, limit=top_k, agent_id=agent_id, since=since, until=until
        ),
    )
    if "m0" not in layers:
        return facts[:top_k]
    ranked = [(1.0 / (RRF_K + rank), 0, rank, result) for rank, result in enumerate(messages, start=1)]
    ranked += [(1.0 / (RRF_K + rank), 1, rank, result) for rank, result in enumerate(facts, start=1)]
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [result for *_, result in ranked[:top_k]]


def facts_stats() -> list[dict]:
    """The facts layer's figures per tenant, over every process (from the rows):
    ``[{"tenant_id", "tenant", "calls", "failures", "prompt_tokens", "completion_tokens",
    "latency_ms_p50", "latency_ms_p95", "backlog_jobs", "backlog_messages", "dead_jobs"}]``;
    calls, tokens and latencies over the last hour (``LlmCall`` rows are kept that long),
    the backlog (queued and running jobs, and their messages) and dead jobs now. One
    statement; tenants with neither calls nor jobs are left out."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH calls AS (
                SELECT tenant_id, count(*) AS calls, count(*) FILTER (WHERE NOT ok) AS failures,
                       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
                FROM memory_llmcall WHERE at > now() - interval '1 hour' GROUP BY tenant_id
            ), jobs AS (
                SELECT tenant_id,
                       count(*) FILTER (WHERE state IN ('queued', 'running')) AS backlog_jobs,
                       coalesce(sum(cardinality(message_ids)) FILTER (WHERE state IN ('queued', 'running')), 0) AS backlog_messages,
                       count(*) FILTER (WHERE state = 'dead') AS dead_jobs
                FROM memory_factjob WHERE state IN ('queued', 'running', 'dead') GROUP BY tenant_id
            )
            SELECT t.id, t.name, coalesce(c.calls, 0), coalesce(c.failures, 0), coalesce(c.prompt_tokens, 0),
                   coalesce(c.completion_tokens, 0), coalesce(c.p50, 0), coalesce(c.p95, 0),
                   coalesce(j.backlog_jobs, 0), coalesce(j.backlog_messages, 0), coalesce(j.dead_jobs, 0)
            FROM memory_tenant t LEFT JOIN calls c ON c.tenant_id = t.id LEFT JOIN jobs j ON j.tenant_id = t.id
            WHERE c.tenant_id IS NOT NULL OR j.tenant_id IS NOT NULL
            ORDER BY t.name
            """
        )
        names = [
            "tenant_id", "tenant", "calls", "failures", "prompt_tokens", "completion_tokens",
            "latency_ms_p50", "latency_ms_p95", "backlog_jobs", "backlog_messages", "dead_jobs",
        ]  # fmt: skip
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
