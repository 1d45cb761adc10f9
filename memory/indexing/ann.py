"""The move of a user's context embeddings into one of the ``ANN_BUCKETS`` HNSW indexes
(``memory.retrieval.vector`` describes the search through them)."""

from __future__ import annotations

import uuid

from django.db import connection, transaction

from memory.indexing.context import lock_context_writes
from memory.models import ANN_BUCKETS


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
