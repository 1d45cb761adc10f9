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
``PENDING_EMBED_MAX`` of them are embedded by the query model (``pending_embeddings``: the
add started them, ``registry.read_ahead``, and the model's recent calls of the user hold
them) and scored like flushed ones, with
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

from memory.inference import registry
from memory.pgvector_binary import use_binary_vectors
from memory.retrieval.keys import DocKey


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
        # pgvector's binary format in hex (dimension and a spare int16, then big-endian float32s):
        # the float32 values as computed, read in C; a text literal of them costs a parse.
        raw = bytes.fromhex(next(row[4] for row in rows if row[0] == "query"))
        query = np.frombuffer(raw, dtype=">f4", offset=4).astype(np.float32)
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
        SELECT 'query', NULL, NULL, NULL, encode(vector_send(q), 'hex'), NULL, NULL FROM query WHERE EXISTS (SELECT FROM pending)
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


def pending_embeddings(*, user_id: uuid.UUID, texts: list[str]) -> np.ndarray:
    """Embeddings ``(len(texts), dim)`` float32 of pending messages' ``index_text`` of
    ``user_id``, by the query model: read your writes.

    One call per distinct text, scoped by the user (``registry.submit_query``): the call an
    add started (``registry.read_ahead``) or an earlier query made is taken from the model's
    recent calls (``RecentEmbeddings``, the one holder of pending embeddings) and waited for
    at query priority; one cancelled past the read-ahead's bound, failed or forgotten is
    asked again. Raises ``memory.inference.EmbeddingProcessError`` when the query process
    fails (the failed call is forgotten: the next query asks again).
    """
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    futures = {text: registry.submit_query([text], scope=user_id) for text in dict.fromkeys(texts)}
    rows = {text: future.result()[0] for text, future in futures.items()}
    return np.stack([rows[text] for text in texts])


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
