"""Writes of a user's lexical index snapshot (``memory.retrieval.store`` loads and catches it up)."""

from __future__ import annotations

import uuid

import psycopg
from django.conf import settings
from django.db import connection, transaction

from memory.retrieval import store
from memory.retrieval.bm25 import BM25Index
from memory.retrieval.cache import cached_user_index, resized

# The size of a snapshot's parts (IndexSnapshotPart), in bytes: what one row or bound
# parameter moves, and so what a pooled connection's libpq buffers grow to for snapshots.
SNAPSHOT_PART_BYTES = 256 * 1024


def snapshot_save(index: BM25Index, user_id: uuid.UUID) -> bool:
    """Write ``index`` as the user's snapshot (unless a newer one is there) and delete the
    tombstones it has absorbed. Returns whether it was written. Compacts ``index``.

    The bytes go in parts of ``SNAPSHOT_PART_BYTES``, each its own bound parameter (in binary,
    not as hex in the statement's text; see ``IndexSnapshotPart``), made as they are sent
    (``BM25Index.to_parts``): the snapshot is never held whole.
    """
    parts = index.to_parts(SNAPSHOT_PART_BYTES)  # compacts the index before anything is read from it
    with transaction.atomic():
        with connection.cursor() as cursor:
            # The user row first, as every writer of a user's rows (docs/architecture.md, "Lock
            # order"): a delete of the user under way is waited for, and then nothing is written.
            # Locked later, the snapshot row could be this write's while the delete holds the
            # parts it deleted first, each waiting for the other.
            cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [user_id])
            if cursor.rowcount != 1:
                return False
            cursor.execute(
                """
                INSERT INTO memory_indexsnapshot (user_id, through_seq, pruned_seq, documents, updated_at)
                SELECT %(user)s, %(seq)s, 0, %(documents)s, now()
                WHERE EXISTS (SELECT FROM memory_user WHERE id = %(user)s)
                ON CONFLICT (user_id) DO UPDATE SET
                    through_seq = EXCLUDED.through_seq, documents = EXCLUDED.documents, updated_at = now()
                WHERE memory_indexsnapshot.through_seq < EXCLUDED.through_seq
                """,
                {"user": user_id, "seq": index.seq, "documents": len(index)},
            )
            if cursor.rowcount != 1:
                return False
            cursor.execute("DELETE FROM memory_indexsnapshotpart WHERE user_id = %s", [user_id])
        with psycopg.Cursor(connection.connection) as cursor:
            # executemany pipelines the inserts; libpq sends its buffer on as it fills.
            cursor.executemany(
                "INSERT INTO memory_indexsnapshotpart (user_id, part, data) VALUES (%s, %s, %b)",
                ((user_id, number, part) for number, part in enumerate(parts)),
            )
        with connection.cursor() as cursor:
            # The deletions the snapshot holds need no tombstone any more; a cache that has not
            # seen them reloads (catch_up), told by pruned_seq.
            cursor.execute(
                """
                WITH pruned AS (DELETE FROM memory_tombstone WHERE user_id = %(user)s AND seq <= %(seq)s RETURNING seq)
                UPDATE memory_indexsnapshot SET pruned_seq = greatest(pruned_seq, (SELECT max(seq) FROM pruned))
                WHERE user_id = %(user)s AND EXISTS (SELECT FROM pruned)
                """,
                {"user": user_id, "seq": index.seq},
            )
        return True


def snapshot_writer_lock(user_id: uuid.UUID) -> bool:
    """Try to become the one writer of the user's snapshot until the caller's transaction
    ends (a transaction-level advisory lock, tried, not waited for); whether it was taken."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s::text, 1))", [user_id])
        return cursor.fetchone()[0]


# The share of a user's documents their snapshot may lag by: after a flush, a tenth (a long
# history is not written again every few turns); at the end of a backlog or an import, a
# hundredth (the user's next query, in a process that has not cached them, catches up with
# few rows, while a backlog that keeps coming back does not rewrite a long history each time).
LAG_SHARE = 10
CURRENT_LAG_SHARE = 100


def refresh_snapshot(user_id: uuid.UUID, *, current: bool = False) -> bool:
    """Rewrite the user's index snapshot if it lags: none yet, or as many changes not in it
    as ``SNAPSHOT_MIN_CHANGES`` and as a tenth (``LAG_SHARE``) of the user's documents (in
    the snapshot, or in this process's cached index if more), whichever is more: a flush
    worker seldom has its users cached, and a rewrite at every ``SNAPSHOT_MIN_CHANGES`` would
    load and save a long history that often. ``current``: a hundredth (``CURRENT_LAG_SHARE``)
    of them, at the end of a backlog or an import.
    Uses this process's cached index when it has one (caught up first), else loads one
    without caching it (a flush worker should not fill the cache). Returns whether it wrote.

    One writer of a user's snapshot at a time (``snapshot_writer_lock``): the flushes
    of one user that end together, in any process, leave it to the first.
    """
    through, documents, changes = store.snapshot_lag(user_id)
    entry = cached_user_index(user_id)
    if entry is not None and entry.index is not None:
        documents = max(documents, len(entry.index))
    share = CURRENT_LAG_SHARE if current else LAG_SHARE
    if not changes or (through is not None and changes < max(settings.MEMFUSE["SNAPSHOT_MIN_CHANGES"], documents // share)):
        return False
    with transaction.atomic():
        if not snapshot_writer_lock(user_id):
            return False
        if entry is not None and entry.index is not None:
            with entry.lock:
                if not store.catch_up(entry.index, user_id):
                    entry.index = store.load(user_id)
                written = snapshot_save(entry.index, user_id)
            resized(entry)
            return written
        return snapshot_save(store.load(user_id), user_id)
