"""The vector retriever: neighbour-smoothed cosine similarity, served from PostgreSQL.

**Score**: a turn's cosine similarity to the query averaged with its neighbours' in its
session, its own counted ``VECTOR_OWN_WEIGHT`` times, over the ``VECTOR_CONTEXT_TURNS``
turns either side that are embedded: score regularisation over the conversation's
adjacency (Diaz, "Regularizing Ad Hoc Retrieval Scores", CIKM 2005), the counterpart of
BM25's context documents (a fact is spread over a turn and its neighbours). Embeddings are
unit vectors, so for a unit query ``q`` that mean of cosines is ``q . c`` with ``c`` the same
weighted mean of the embeddings: the message's **context embedding**, computed once when
the message (or a neighbour) is flushed, edited or deleted (``context_refresh``), and searched
by inner product. A knowledge item scores its own cosine.

**Search** (``candidates``): the best ``limit`` context embeddings of one user, exactly (an
ordered scan of the user's rows) for most users, and through a partial HNSW index
(``memory_message_context_hnsw_<bucket>``, pgvector 0.8's iterative scan) for users whose
history passed ``ANN_MIN_MESSAGES``: each such user is given one of ``ANN_BUCKETS`` indexes
(``User.ann_bucket``, the least shared), so the search walks few other users' rows. Every
query stays a single-user query.

**Copies** of one context embedding (a history that repeats an exchange) are one row in the
index: pgvector's HNSW graph loses its links among many exact copies (a node holds ten rows,
and neighbour selection drops every other neighbour in favour of a copy at distance zero),
and then misses distinct vectors too. Rows of a user in a bucket carry the digest of their
context embedding rounded to half precision (``Message.context_digest``,
``memory_vector_digest``); of the rows sharing one, the first placed is in the index and the
others are marked ``ann_duplicate``. The search adds the copies of the rows it found, by
digest, with the found row's score (equal for exact copies; within 1e-3 for vectors equal at
half precision, whose components differ by one half-precision step at most), including those
inside a query's filters whose row in the index is outside them; when the row in the index
leaves it, a trigger puts a copy in its place (migration 0010).

**Pseudo-relevance feedback** (Rocchio, 1971; his beta is ``VECTOR_PRF_WEIGHT``): the query is
``q + beta * mean(e_d)`` over BM25's top documents, computed in the search's own statement (as
``q / beta + mean``: same direction).

**Pending messages** (not flushed yet) have no embedding in the database. The newest
``PENDING_EMBED_MAX`` of them are embedded on demand by the query model
(``memory.retrieval.cache.UserIndex.pending_embeddings``) and scored like flushed ones, with
their flushed (or also on-demand embedded) neighbours: a query finds what was just added,
and the work a query may wait for is bounded however large a burst was. Older pending
messages are found by BM25 until their flush.
"""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from datetime import datetime

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from pgvector import Vector

from memory.pgvector_binary import use_binary_vectors
from memory.retrieval.keys import DocKey

# --- context embeddings (writes) -------------------------------------------------------------

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


def ann_enable(*, user_id: uuid.UUID, batch: int = 500) -> int | None:
    """Give the user the least shared of the ``ANN_BUCKETS`` HNSW indexes and put their context
    embeddings in it, then set ``ann_bucket`` on the user (queries then search through it).
    In batches of ``batch`` rows, each its own transaction holding the user's context-write
    lock (``lock_context_writes``; an HNSW insert takes about a millisecond, so a flush of the
    user waits for one batch at most). Returns the user's bucket (``None``: the user is gone).
    Run by a flush once the user holds ``ANN_MIN_MESSAGES`` messages.

    Several flushes of one user may end at once and each run it: each batch reads what decides
    its bucket (the user's, else that of the rows already placed) holding the lock, so they
    all place the rows into one bucket, also after a move that stopped half-way.
    """
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [user_id])
            if cursor.rowcount != 1:
                return None
            # A flush's write locks the context rows around its turns in id order, these updates
            # in scan order: taking turns, they cannot deadlock.
            lock_context_writes(cursor, user_id=user_id)
            cursor.execute("SELECT ann_bucket FROM memory_user WHERE id = %s", [user_id])
            (placed,) = cursor.fetchone()
            if placed is not None:
                return placed
            bucket = _ann_bucket_choice(cursor, user_id=user_id)
            if ann_place(cursor, user_id=user_id, bucket=bucket, limit=batch):
                continue
            # Rows a concurrent writer held are caught by its own refresh once the user's
            # bucket is set (context_refresh writes it): set it under the user row lock.
            cursor.execute("UPDATE memory_user SET ann_bucket = %s WHERE id = %s", [bucket, user_id])
            ann_place(cursor, user_id=user_id, bucket=bucket)
            return bucket


def _ann_bucket_choice(cursor, *, user_id: uuid.UUID) -> int:
    """The bucket of the user's rows already in an HNSW index (a move under way, or one that
    stopped half-way), else the bucket with the fewest users, a random one among equals.
    Caller holds the user's context-write lock."""
    from memory.models import ANN_BUCKETS

    cursor.execute(
        """
        SELECT coalesce(
            (SELECT ann_bucket FROM memory_message
             WHERE user_id = %(user)s AND ann_bucket IS NOT NULL AND NOT ann_duplicate LIMIT 1),
            (SELECT b FROM generate_series(0, %(buckets)s - 1) b
             ORDER BY (SELECT count(*) FROM memory_user WHERE ann_bucket = b), random() LIMIT 1)
        )
        """,
        {"user": user_id, "buckets": ANN_BUCKETS},
    )
    return cursor.fetchone()[0]


def ann_place(cursor, *, user_id: uuid.UUID, bucket: int, limit: int | None = None) -> int:
    """Put the user's rows that have a context embedding and no bucket into HNSW index
    ``bucket``; a row whose context embedding is already there, or earlier in this batch, goes
    in as a copy (``Message.ann_duplicate``). With ``limit``: at most that many rows, skipping
    rows another transaction holds; without: all of them, waiting for such rows. Returns how
    many rows were placed."""
    batch = "LIMIT %(limit)s FOR UPDATE SKIP LOCKED" if limit is not None else "FOR UPDATE"
    cursor.execute(
        f"""
        WITH batch AS MATERIALIZED (
            SELECT id, memory_vector_digest(context_embedding) AS digest FROM memory_message
            WHERE user_id = %(user)s AND ann_bucket IS NULL AND context_embedding IS NOT NULL {batch}
        ), placed AS (
            SELECT b.id, b.digest,
                   row_number() OVER (PARTITION BY b.digest ORDER BY b.id) > 1
                   OR EXISTS (SELECT FROM memory_message o WHERE o.user_id = %(user)s AND o.context_digest = b.digest
                              AND o.ann_bucket IS NOT NULL AND NOT o.ann_duplicate) AS duplicate
            FROM batch b
        )
        UPDATE memory_message m SET ann_bucket = %(bucket)s, context_digest = p.digest, ann_duplicate = p.duplicate
        FROM placed p WHERE m.id = p.id
        """,
        {"user": user_id, "bucket": bucket, "limit": limit},
    )
    return cursor.rowcount


# --- search (reads) --------------------------------------------------------------------------


def candidates(**search) -> tuple[list[tuple[DocKey, float]], list[tuple], np.ndarray | None]:
    """Run ``search_statement(**search)``: the user's best flushed documents for the query,
    and their newest pending messages.

    Returns ``(flushed, pending, query)``: ``flushed`` is ``[(key, score)]`` best first, score
    the neighbour-smoothed cosine (a knowledge item's own); ``pending`` is ``[(id, updated_at,
    text, neighbour ids, neighbour cosines)]`` of at most ``pending_limit``
    (``PENDING_EMBED_MAX``) pending messages, newest first, a cosine ``None`` for a neighbour
    not embedded; ``query`` the unit query the scores are for (moved by the feedback), only
    when there are pending messages.
    """
    sql, params, local_settings = search_statement(**search)
    # SET LOCAL lasts for the transaction: the approximate search needs one of its own.
    with transaction.atomic() if local_settings else nullcontext(), connection.cursor() as cursor:
        for setting in local_settings:
            cursor.execute(setting)
        use_binary_vectors(cursor)
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    flushed = [(DocKey(kind, doc_id), float(score)) for kind, doc_id, score, *_ in rows if kind in ("message", "knowledge")]
    flushed.sort(key=lambda item: -item[1])  # two lists, and the iterative scan's relaxed order
    pending = [(doc_id, updated_at, text, ids or [], cosines or []) for kind, doc_id, _, updated_at, text, ids, cosines in rows if kind == "pending"]
    query = None
    if pending:  # the statement returns the moved query with them
        query = Vector._from_db(next(row[4] for row in rows if row[0] == "query"))
        query = (query / np.linalg.norm(query)).astype(np.float32)
    return flushed, pending, query


def search_statement(
    *,
    user_id: uuid.UUID,
    embedding: np.ndarray,
    limit: int,
    ann_bucket: int | None = None,
    sessions: list[uuid.UUID] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    feedback: list[DocKey] = (),
    feedback_weight: float = 0.0,
    pending_limit: int | None = None,
) -> tuple[str, dict, list[str]]:
    """The vector search's one statement, as ``(sql, params, settings)``: ``settings`` are the
    ``SET LOCAL`` statements to run before it in its transaction (the approximate search's).

    ``embedding``: the query, ``(dim,)`` float32, unit. ``limit``: flushed documents wanted.
    ``ann_bucket``: the user's (``User.ann_bucket``): search through that HNSW index; ``None``:
    an exact scan of the user's rows. ``sessions``: only
    messages of these sessions (knowledge always). ``since`` / ``until``: only documents
    created in that window (inclusive). ``feedback``: Rocchio's documents (not embedded ones
    are skipped; with none the query stays). ``pending_limit``: pending messages to return
    (default ``PENDING_EMBED_MAX``).
    """
    # Long because most of it is the statement's SQL text, kept whole so it reads as one query.
    config = settings.MEMFUSE
    pending_limit = config["PENDING_EMBED_MAX"] if pending_limit is None else pending_limit
    moving = bool(feedback) and feedback_weight > 0
    # The filters' conditions on a row of alias {a}: a window of time for every document,
    # sessions for messages.
    window = ([] if since is None else ["{a}.created_at >= %(since)s"]) + ([] if until is None else ["{a}.created_at <= %(until)s"])
    conditions = ([] if sessions is None else ["{a}.session_id = ANY(%(sessions)s)"]) + window

    def where(conditions: list[str], alias: str) -> str:
        return "".join(" AND " + condition.format(a=alias) for condition in conditions)

    filters, knowledge_filters = where(conditions, "m"), where(window, "k")
    # The bucket as a literal, not a parameter (psycopg binds on the client anyway): the
    # planner matches it to its partial index's predicate.
    scan = f"m.ann_bucket = {int(ann_bucket)} AND NOT m.ann_duplicate" if ann_bucket is not None else "m.context_embedding IS NOT NULL"
    scan_filters, passes, copies, copies_scored = filters, "", "", ""
    if ann_bucket is not None:
        if conditions:
            # A row of the index outside the filters still carries its copies inside them.
            scan_filters = (
                f" AND (TRUE{filters} OR EXISTS (SELECT FROM memory_message c WHERE c.user_id = m.user_id"
                f" AND c.context_digest = m.context_digest AND c.ann_bucket IS NOT NULL AND c.ann_duplicate{where(conditions, 'c')}))"
            )
            passes = f" WHERE TRUE{where(conditions, 'messages')}"
        # The rows left out of the index as copies of the rows it gave (Message.context_digest),
        # those of the best rows first, with the score of the row found: they share its
        # half-precision rounding, so their own scores differ from it by 1e-3 at most, and
        # their ids come from the copies' index without a read of their rows.
        copies = f""", copies AS MATERIALIZED (
            SELECT c.id, p.distance FROM (SELECT context_digest, distance FROM messages ORDER BY distance) p
            CROSS JOIN LATERAL (
                SELECT c.id FROM memory_message c
                WHERE c.user_id = %(user)s AND c.context_digest = p.context_digest
                  AND c.ann_bucket IS NOT NULL AND c.ann_duplicate{where(conditions, 'c')}
                LIMIT %(limit)s
            ) c
            ORDER BY p.distance LIMIT %(limit)s
        )"""
        copies_scored = """
        UNION ALL
        SELECT 'message', id, -distance / (SELECT norm FROM query), NULL, NULL, NULL, NULL FROM copies"""
    sql = f"""
        WITH feedback AS (
            SELECT avg(e) AS mean FROM (
                SELECT embedding AS e FROM memory_message
                WHERE user_id = %(user)s AND id = ANY(%(fm)s) AND embedding IS NOT NULL
                UNION ALL
                SELECT embedding FROM memory_knowledge
                WHERE user_id = %(user)s AND id = ANY(%(fk)s) AND embedding IS NOT NULL
            ) f
        ), query AS MATERIALIZED (
            SELECT q, vector_norm(q) AS norm FROM (
                SELECT coalesce(%(q_scaled)s::vector + mean, %(q)s::vector) AS q FROM feedback) moved
        ), messages AS MATERIALIZED (
            SELECT m.id, m.session_id, m.created_at, m.context_digest, m.context_embedding <#> (SELECT q FROM query) AS distance
            FROM memory_message m
            WHERE m.user_id = %(user)s AND {scan}{scan_filters}
            ORDER BY m.context_embedding <#> (SELECT q FROM query) LIMIT %(limit)s
        ){copies}, knowledge AS MATERIALIZED (
            SELECT k.id, k.embedding <#> (SELECT q FROM query) AS distance FROM memory_knowledge k
            WHERE k.user_id = %(user)s AND k.embedding IS NOT NULL{knowledge_filters}
            ORDER BY k.embedding <#> (SELECT q FROM query) LIMIT %(limit)s
        ), pending AS MATERIALIZED (
            SELECT m.id, m.session_id, m.position, m.updated_at, m.index_text FROM memory_message m
            WHERE m.user_id = %(user)s AND m.flushed_at IS NULL{filters}
            ORDER BY m.updated_at DESC, m.seq DESC LIMIT %(pending_limit)s
        )
        SELECT 'message', id, -distance / (SELECT norm FROM query), NULL::timestamptz, NULL::text, NULL::uuid[], NULL::float8[]
        FROM messages{passes}{copies_scored}
        UNION ALL
        SELECT 'knowledge', id, -distance / (SELECT norm FROM query), NULL, NULL, NULL, NULL FROM knowledge
        UNION ALL
        SELECT 'pending', p.id, NULL, p.updated_at, p.index_text, around.ids, around.cosines
        FROM pending p LEFT JOIN LATERAL (
            SELECT array_agg(n.id) AS ids,
                   array_agg(-(n.embedding <#> (SELECT q FROM query)) / (SELECT norm FROM query)) AS cosines
            FROM (
                (SELECT b.id, b.embedding FROM memory_message b WHERE b.session_id = p.session_id
                 AND b.position < p.position ORDER BY b.position DESC LIMIT %(window)s)
                UNION ALL
                (SELECT b.id, b.embedding FROM memory_message b WHERE b.session_id = p.session_id
                 AND b.position > p.position ORDER BY b.position LIMIT %(window)s)
            ) n
        ) around ON true
        UNION ALL
        -- the (moved) query, to score pending messages with, only when there are some
        SELECT 'query', NULL, NULL, NULL, q::text, NULL, NULL FROM query WHERE EXISTS (SELECT FROM pending)
    """
    params = {
        "user": user_id,
        "q": Vector(embedding),
        "q_scaled": Vector(embedding / feedback_weight) if moving else None,
        "fm": [key.id for key in feedback if key.kind == "message"] if moving else [],
        "fk": [key.id for key in feedback if key.kind == "knowledge"] if moving else [],
        "limit": limit,
        "sessions": sessions,
        "since": since,
        "until": until,
        "pending_limit": pending_limit,
        "window": config["VECTOR_CONTEXT_TURNS"],
    }
    local_settings = []
    if ann_bucket is not None:
        local_settings = [
            # Enough candidates for the list, and pgvector 0.8's iterative scan: the index
            # holds other users' rows too, which the user filter drops after the scan.
            f"SET LOCAL hnsw.ef_search = {max(limit, int(config['ANN_EF_SEARCH']))}",
            "SET LOCAL hnsw.iterative_scan = relaxed_order",
            # The user's rows through the index, not the user_id btree and a sort of all of
            # them: that would be exact, but linear in the history, which is what the index
            # is for (the planner picks it for small tables).
            "SET LOCAL enable_sort = off",
            # That setting prices every sort beyond the JIT threshold, and compiling the
            # statement would take a third of a second.
            "SET LOCAL jit = off",
        ]
    return sql, params, local_settings


def pending_scores(pending: list[tuple], embeddings: np.ndarray, query: np.ndarray) -> list[tuple[DocKey, float]]:
    """Scores of pending messages (``candidates``' ``pending``, embedded as ``embeddings``,
    ``(len(pending), dim)``) for the unit ``query``: the same smoothed cosine as a flushed
    turn's, over its neighbours that are flushed or among ``pending``."""
    own = settings.MEMFUSE["VECTOR_OWN_WEIGHT"]
    cosines = embeddings @ query if len(pending) else np.zeros(0)
    by_id = {doc_id: float(cosine) for (doc_id, *_), cosine in zip(pending, cosines)}
    scored = []
    for (doc_id, _, _, neighbour_ids, neighbour_cosines), cosine in zip(pending, cosines):
        total, count = own * float(cosine), own
        for neighbour, neighbour_cosine in zip(neighbour_ids, neighbour_cosines):
            value = neighbour_cosine if neighbour_cosine is not None else by_id.get(neighbour)
            if value is not None:
                total += value
                count += 1
        scored.append((DocKey("message", doc_id), total / count))
    return scored
