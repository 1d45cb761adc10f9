"""The flush: embedding and indexing a user's pending messages, run by ``buffers``' workers.

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

The jobs that ask for a flush, their queue and the workers that run them are ``buffers``';
``memory.apps`` registers ``flush_pending`` with it (``buffers.services.FlushHooks``).
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from pgvector import Vector

from buffers import events
from memory import embedding_guard, metrics
from memory.facts.jobs import facts_queue
from memory.indexing import ann, snapshots
from memory.indexing.context import context_refresh, lock_context_writes
from memory.inference import registry
from memory.pgvector_binary import VectorArray, use_binary_vectors
from runtime.pool import is_database_unavailable

logger = logging.getLogger(__name__)


class FlushTimeout(Exception):
    """A flush ran past its deadline (``FLUSH_TIMEOUT_SECONDS``); it is retried."""


# A flush's own transactions commit without waiting for their WAL to reach the disk: what
# they write can be redone. Should PostgreSQL crash before the WAL writer flushes them (a
# fraction of a second), the messages are pending again and the next flush embeds them
# (a claim is a lease; an embedding is recomputed). Nothing acknowledged to a client is
# lost, and the adds' commits do not queue behind the flush's fsyncs.
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
                ORDER BY updated_at, seq
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, index_text, updated_at
            """,
            {"token": token, "lease": lease, "user": user_id, "session": session_id, "limit": limit},
        )
        return cursor.fetchall()


def _write(
    *, user_id: uuid.UUID, token: uuid.UUID, ids: list[uuid.UUID], vectors, generation: int | None = None
) -> list[tuple]:
    """Write embeddings where ``token`` still holds the claim, and the context embeddings
    around them (``memory.indexing.context.context_refresh``); returns ``[(id, session_id)]``.

    Takes ``FOR KEY SHARE`` on the user's row first: the lock order of every writer of a
    user's messages (see ``memory.services.common.memory_version_bump``), so this ``UPDATE`` and an
    edit or a cascade delete never deadlock. Adds (``FOR NO KEY UPDATE``) do not conflict
    with it: an add never waits for this write. Two flushes of one user, and a flush and the
    user's move to the HNSW index (``ann.ann_enable``), take turns (``lock_context_writes``):
    each rewrites rows the other locks.

    ``generation``: the active embedding model the vectors come from (what
    ``embedding_model.follow_active_model`` returned before embedding); raises
    ``embedding_guard.ModelChanged``, writing nothing, when a ``reembed`` switched since.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_NO_FSYNC)
        embedding_guard.guard_write(cursor, generation=generation)
        cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [user_id])
        if cursor.rowcount != 1:
            return []  # the user was deleted meanwhile
        lock_context_writes(cursor, user_id=user_id)
        # Read holding the lock: a move to the HNSW index that set the bucket while this
        # waited for it is seen, and the rows written here go into that index too.
        cursor.execute("SELECT ann_bucket FROM memory_user WHERE id = %s", [user_id])
        row = cursor.fetchone()
        use_binary_vectors(cursor)
        cursor.execute(
            """
            UPDATE memory_message AS m
            SET embedding = v.embedding, flushed_at = now(), flush_claim = NULL,
                claimed_until = NULL, flush_count = m.flush_count + 1
            FROM unnest(%(ids)s::uuid[], %(vectors)s::vector[]) AS v(id, embedding)
            WHERE m.id = v.id AND m.flush_claim = %(token)s
            RETURNING m.id, m.session_id, m.position
            """,
            {"ids": ids, "vectors": VectorArray(Vector(vector) for vector in vectors), "token": token},
        )
        written = cursor.fetchall()
        context_refresh(cursor, seeds=[(session, position) for _, session, position in written], bucket=row[0])
        return [(message_id, session) for message_id, session, _ in written]


def flush_pending(
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID | None = None,
    deadline: float | None = None,
    slice_end: float | None = None,
    batch_size: int | None = None,
    token: uuid.UUID | None = None,
) -> int:
    """Embed and index the user's (or one session's) pending messages; returns how many.

    Batch by batch: claim (``SKIP LOCKED``), embed, write (see the module docstring).
    ``deadline`` is a ``time.monotonic()`` value; past it, ``FlushTimeout`` is raised between
    batches (claimed but unwritten rows are taken again when their lease expires).
    ``slice_end``, another: past it, the flush returns between batches, once it has written
    one (the rest stays pending: its job is queued again, ``buffers.services.run_job``). Publishes
    ``flush.completed`` to each session's group after each batch is written. ``token`` is the
    claim token (a job's ``claim_token``, so a dead worker's claims can be found; default new).
    """
    batch_size = batch_size or settings.BUFFERS["BATCH_SIZE"]
    token = token or uuid.uuid4()
    start = time.perf_counter()
    try:
        flushed = _flush_batches(
            user_id=user_id, session_id=session_id, deadline=deadline, slice_end=slice_end, batch_size=batch_size, token=token
        )
    except BaseException:
        metrics.FLUSHES.labels("error").inc()
        _release(token)
        raise
    metrics.FLUSH_SECONDS.observe(time.perf_counter() - start)
    metrics.FLUSHES.labels("ok").inc()
    metrics.MESSAGES_FLUSHED.inc(flushed)
    if flushed:
        maintain_indexes(user_id, current=flushed > batch_size)
    return flushed


def maintain_indexes(user_id: uuid.UUID, *, current: bool = False) -> None:
    """After a flush, and between the batches of a backlog's: move a user whose history
    passed ``ANN_MIN_MESSAGES`` to the HNSW index (``ann.ann_enable``) and rewrite their
    lexical index's snapshot when it lags (``snapshots.refresh_snapshot``). ``current``: at
    the end of a backlog or an import, the snapshot within ``SNAPSHOT_MIN_CHANGES`` of the
    rows and the planner's statistics of the messages current (``refresh_statistics``).
    Derived data only: a failure is logged, and the next flush tries again."""
    try:
        with connection.cursor() as cursor:
            # The positions the user's sessions have handed out bound their messages from
            # above (deleted ones included) and cost a read of a few session rows: only a user
            # past that bound has their messages counted, which reads every one of their rows.
            cursor.execute(
                "SELECT CASE WHEN ann_bucket IS NOT NULL THEN false "
                "WHEN (SELECT coalesce(sum(next_position), 0) FROM memory_session WHERE user_id = %(user)s) < %(min)s "
                "THEN false ELSE (SELECT count(*) FROM memory_message WHERE user_id = %(user)s) >= %(min)s END "
                "FROM memory_user WHERE id = %(user)s",
                {"user": user_id, "min": settings.MEMFUSE["ANN_MIN_MESSAGES"]},
            )
            row = cursor.fetchone()
        if row and row[0]:
            ann.ann_enable(user_id=user_id)
        snapshots.refresh_snapshot(user_id, current=current)
        if current:
            refresh_statistics()
    except Exception:
        logger.warning("index maintenance of user %s failed; the next flush retries", user_id, exc_info=True)


# Autovacuum's own rule for when a table's statistics are stale (never analyzed, or more rows
# changed since its last ANALYZE than autovacuum_analyze_threshold + scale factor x rows).
_STATISTICS_STALE_SQL = """
SELECT c.reltuples < 0 OR pg_stat_get_mod_since_analyze(c.oid)
       > current_setting('autovacuum_analyze_threshold')::float8
         + current_setting('autovacuum_analyze_scale_factor')::float8 * c.reltuples
FROM pg_class c WHERE c.oid = 'memory_message'::regclass
"""


def refresh_statistics() -> bool:
    """``ANALYZE memory_message`` when its planner statistics are stale by autovacuum's rule,
    at once rather than within ``autovacuum_naptime`` (a minute by default): run by the flush
    of a backlog and by an import (``maintain_indexes`` with ``current``), whose user queries
    next. A table the planner has never analyzed, or has seen a tenth of, gets plans that
    read every row of a user where a few were wanted. Returns whether it ran ANALYZE.

    Bounded like autovacuum's own ANALYZE: only past that rule (so at most once per tenth of
    the table changed), one process at a time (a tried transaction-level advisory lock: the
    other workers skip), never waiting for autovacuum's lock on the table (``SKIP_LOCKED``),
    and ANALYZE reads a fixed sample of rows, whatever the table's size.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_STATISTICS_STALE_SQL)
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("SELECT pg_try_advisory_xact_lock(hashtextextended('memory_message statistics', 0))")
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("ANALYZE (SKIP_LOCKED) memory_message")
    return True


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


# How long a flush waits for the query model's calls already under way on its messages (an
# add starts them) rather than embedding the same texts again. They queue behind queries, so
# under a flood of queries the flush gives up on them and embeds in the background.
_REUSE_WAIT_SECONDS = 2.0


def _embed_claimed(user_id: uuid.UUID, claimed: list[tuple]) -> np.ndarray:
    """Embeddings ``(len(claimed), dim)`` of claimed rows ``[(id, index_text, updated_at)]``.

    In the chat pattern a query embeds the turn just added before its flush does (read
    your writes), and the user's message of a turn has the words of that turn's query: when
    the query model's embedding is exactly the flush's (``registry.queries_embed_documents``)
    and among the query model's recent calls of the user (``registry.recent_query_embeddings``:
    an add starts them on its newest messages, a query on those it scores), it is written as
    it is; the rest are embedded in the background. Raises ``EmbeddingProcessError``.
    """
    reused = {}
    if registry.queries_embed_documents():
        reused = registry.recent_query_embeddings(
            [row[1] for row in claimed], scope=user_id, wait_seconds=_REUSE_WAIT_SECONDS
        )
    missing = [row[1] for row in claimed if row[1] not in reused]
    embedded = iter(registry.embed(missing, priority=registry.BACKGROUND) if missing else ())
    return np.stack([reused[row[1]] if row[1] in reused else next(embedded) for row in claimed])


def _flush_batches(
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID | None,
    deadline: float | None,
    slice_end: float | None,
    batch_size: int,
    token: uuid.UUID,
) -> int:
    flushed = 0
    batches = 0
    while True:
        # The slice first: a flush that has written batches stops gracefully, even late.
        if slice_end is not None and batches and time.monotonic() >= slice_end:
            return flushed
        if deadline is not None and time.monotonic() > deadline:
            raise FlushTimeout(f"flush of user {user_id} passed its deadline after {flushed} messages")
        claimed = _claim(user_id=user_id, session_id=session_id, token=token, limit=batch_size)
        if not claimed:
            return flushed
        batches += 1
        if flushed and len(claimed) < batch_size:
            # The last batch of a backlog: the user's first query once nothing is pending
            # loads the snapshot, so it is brought up to date before that batch is written.
            maintain_indexes(user_id, current=True)
        ids = [row[0] for row in claimed]

        def embed(claimed=claimed) -> np.ndarray:
            if not connection.in_atomic_block:
                # Give the connection back to the pool while the model works (seconds): flush
                # workers would otherwise hold one each and starve requests of connections.
                connection.close()
            return _embed_claimed(user_id, claimed)

        # A reembed that switches the columns while a batch is embedded leaves the rows ours
        # (claimed): embed_guarded embeds them again with the new model.
        written = embedding_guard.embed_guarded(
            embed,
            lambda vectors, generation, ids=ids: _write(
                user_id=user_id, token=token, ids=ids, vectors=vectors, generation=generation
            ),
        )
        flushed += len(written)
        by_session: dict[uuid.UUID, list[str]] = {}
        for message_id, message_session in written:
            by_session.setdefault(message_session, []).append(str(message_id))
        for message_session, message_ids in by_session.items():
            events.flush_completed(session_id=message_session, message_ids=message_ids)
        # The facts layer (M1) extracts from what was just written, in its own workers.
        facts_queue(user_id=user_id, by_session=by_session)
        if len(claimed) == batch_size:
            # More may be pending: the move to the HNSW index and the snapshot follow the
            # backlog as it is flushed, not only once it is all written (queries meanwhile
            # would scan the user's rows, or build their index from the rows).
            maintain_indexes(user_id)
