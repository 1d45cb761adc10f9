"""Context embeddings (the vector retriever's documents, ``memory.retrieval.vector``): recomputed
around the turns a flush embedded or an edit or delete changed, or for whole users."""

from __future__ import annotations

import uuid

from django.conf import settings

_CONTEXT_SQL = """
WITH seeds AS (
    SELECT DISTINCT session_id, position FROM unnest(%(sessions)s::uuid[], %(positions)s::bigint[]) AS s(session_id, position)
), affected AS (
    -- the seeds' rows and the turns whose window reaches them: `window` either side
    SELECT DISTINCT n.id FROM seeds s CROSS JOIN LATERAL (
        (SELECT m.id FROM memory_message m WHERE m.session_id = s.session_id AND m.position <= s.position
         ORDER BY m.position DESC LIMIT %(window)s + 1)
        UNION ALL
        (SELECT m.id FROM memory_message m WHERE m.session_id = s.session_id AND m.position > s.position
         ORDER BY m.position LIMIT %(window)s)
    ) n
), locked AS MATERIALIZED (
    -- row locks in one order, whoever else refreshes neighbouring rows
    SELECT m.id, m.user_id, m.session_id, m.position, m.embedding,
           m.ann_bucket IS NOT NULL AND NOT m.ann_duplicate AND m.context_digest IS NOT NULL AS in_index, m.context_digest
    FROM memory_message m
    WHERE m.id IN (SELECT id FROM affected) ORDER BY m.id FOR UPDATE
), context AS MATERIALIZED (
    -- computed once per row: inlined, each reference below would average the window again
    SELECT l.id, l.user_id, l.in_index, l.context_digest AS old_digest, CASE WHEN l.embedding IS NULL THEN NULL ELSE (
        SELECT avg(e) FROM (
            SELECT l.embedding AS e FROM generate_series(1, %(own)s)
            UNION ALL
            (SELECT b.embedding FROM memory_message b WHERE b.session_id = l.session_id AND b.position < l.position
             ORDER BY b.position DESC LIMIT %(window)s)
            UNION ALL
            (SELECT b.embedding FROM memory_message b WHERE b.session_id = l.session_id AND b.position > l.position
             ORDER BY b.position LIMIT %(window)s)
        ) x WHERE e IS NOT NULL) END AS c
    FROM locked l
), digested AS MATERIALIZED (
    -- in an HNSW index, copies of one context embedding are one row (Message.context_digest)
    SELECT x.*, CASE WHEN x.c IS NOT NULL AND %(bucket)s::smallint IS NOT NULL THEN memory_vector_digest(x.c) END AS digest
    FROM context x
), placed AS MATERIALIZED (
    SELECT d.id, d.c, d.digest, CASE WHEN d.c IS NOT NULL THEN %(bucket)s::smallint END AS bucket,
           d.digest IS NOT NULL AND (
               -- among these rows, the one already in the index keeps its place
               row_number() OVER (PARTITION BY d.user_id, d.digest ORDER BY d.in_index AND d.old_digest = d.digest DESC, d.id) > 1
               OR EXISTS (SELECT FROM memory_message o WHERE o.user_id = d.user_id AND o.context_digest = d.digest
                          AND o.ann_bucket IS NOT NULL AND NOT o.ann_duplicate AND o.id NOT IN (SELECT id FROM locked))
           ) AS duplicate
    FROM digested d
)
UPDATE memory_message m SET context_embedding = p.c, context_digest = p.digest, ann_bucket = p.bucket, ann_duplicate = p.duplicate
FROM placed p
WHERE m.id = p.id
  AND (m.context_embedding IS DISTINCT FROM p.c OR m.ann_bucket IS DISTINCT FROM p.bucket
       OR m.context_digest IS DISTINCT FROM p.digest OR m.ann_duplicate IS DISTINCT FROM p.duplicate)
"""


def context_refresh(cursor, *, seeds: list[tuple[uuid.UUID, int]], bucket: int | None) -> None:
    """Recompute the context embeddings around ``seeds`` (``(session_id, position)`` of turns
    just embedded, edited or deleted): every turn at most ``VECTOR_CONTEXT_TURNS`` from a
    seed in its session. ``bucket``: the user's ``ann_bucket`` (their rows go into that HNSW
    index), or ``None``. Runs in the caller's transaction, which must hold the user row's lock
    (``memory.services`` writers) or be the flush's write (``buffers.services``).
    """
    if not seeds:
        return
    config = settings.MEMFUSE
    cursor.execute(
        _CONTEXT_SQL,
        {
            "sessions": [session for session, _ in seeds],
            "positions": [position for _, position in seeds],
            "window": config["VECTOR_CONTEXT_TURNS"],
            "own": config["VECTOR_OWN_WEIGHT"],
            "bucket": bucket,
        },
    )


def context_refresh_all(
    cursor,
    *,
    user_id: uuid.UUID | None = None,
    user_ids: list[uuid.UUID] | None = None,
    columns: tuple[str, str] = ("embedding", "context_embedding"),
) -> int:
    """Recompute every context embedding (of one user, of ``user_ids``, or of all): after the
    window settings change, and for messages written by a bulk load. Returns how many rows
    were written. ``columns``: the ``(embedding, context embedding)`` columns to read and
    write; other than the served pair (a ``reembed``'s shadow columns), ``ann_bucket`` is
    left as it is."""
    config = settings.MEMFUSE
    window, own = config["VECTOR_CONTEXT_TURNS"], config["VECTOR_OWN_WEIGHT"]
    source, target = columns
    lags = ", ".join(f"lag({source}, {d}) OVER w AS p{d}, lead({source}, {d}) OVER w AS n{d}" for d in range(1, window + 1))
    values = ", ".join(["(e)"] * own + [f"(p{d}), (n{d})" for d in range(1, window + 1)])
    where = "WHERE user_id = %(user)s" if user_id else "WHERE user_id = ANY(%(users)s)" if user_ids is not None else ""
    served = columns == ("embedding", "context_embedding")
    # The served column also places each row in its user's HNSW index, copies as one row
    # (Message.context_digest): every row of these users is here, so the first of each
    # digest is the one.
    placed = ", ann_bucket = p.bucket, context_digest = p.digest, ann_duplicate = p.digest IS NOT NULL AND p.copy > 1"
    cursor.execute(
        f"""
        WITH ordered AS (
            SELECT id, user_id, {source} AS e{", " + lags if lags else ""} FROM memory_message {where}
            WINDOW w AS (PARTITION BY session_id ORDER BY position)
        ), context AS (
            SELECT o.id, o.user_id, CASE WHEN e IS NULL THEN NULL ELSE
                (SELECT avg(x) FROM (VALUES {values}) v(x) WHERE x IS NOT NULL) END AS c
            FROM ordered o
        ), digested AS (
            SELECT x.id, x.user_id, x.c, CASE WHEN x.c IS NOT NULL THEN u.ann_bucket END AS bucket,
                   CASE WHEN {"x.c IS NOT NULL AND u.ann_bucket IS NOT NULL" if served else "false"}
                        THEN memory_vector_digest(x.c) END AS digest
            FROM context x JOIN memory_user u ON u.id = x.user_id
        ), p AS (
            SELECT d.*, row_number() OVER (PARTITION BY d.user_id, d.digest ORDER BY d.id) AS copy FROM digested d
        )
        UPDATE memory_message m SET {target} = p.c{placed if served else ""}
        FROM p
        WHERE m.id = p.id
        """,
        {"user": user_id, "users": user_ids},
    )
    return cursor.rowcount


def lock_context_writes(cursor, *, user_id: uuid.UUID) -> None:
    """Take the user's context-write lock until the caller's transaction ends (a
    transaction-level advisory lock on the user). A flush's write and ``ann_enable`` take it:
    each rewrites rows of the user that the other locks, in another order."""
    cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 0))", [user_id])
