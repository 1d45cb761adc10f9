"""A user's lexical index and the database: built from the rows, loaded from a snapshot,
caught up with the changes numbered since, written back as a snapshot.

Every change of a user's documents is numbered by ``memory_change_seq`` (migration 0007):
a message or knowledge item carries the number of its last insert or edit in ``seq``, a
deletion leaves a ``Tombstone``. Every writer of a user's documents takes the user row's
lock before it takes numbers (``memory.services``), so one user's numbers are given in
commit order, and an index that has applied everything numbered up to ``seq`` needs only
what is numbered after it. That is one indexed read of the few rows since, whoever wrote
them and in whichever process.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from django.conf import settings
from django.db import connection

from memory.retrieval.bm25 import KNOWLEDGE, MESSAGE, BM25Index, Document
from memory.retrieval.lexemes import tsvector_counts

logger = logging.getLogger(__name__)

_CHANGES_SQL = """
SELECT 0, m.id, m.session_id, m.position, m.search_vector::text, m.metadata->>'speaker',
       CASE WHEN m.metadata->>'speaker' <> '' THEN to_tsvector('english', m.metadata->>'speaker')::text END,
       m.created_at, m.seq
FROM memory_message m WHERE m.user_id = %(user)s AND m.seq > %(seq)s
UNION ALL
SELECT 1, k.id, NULL, 0, k.search_vector::text, NULL, NULL, k.created_at, k.seq
FROM memory_knowledge k WHERE k.user_id = %(user)s AND k.seq > %(seq)s
UNION ALL
SELECT 2, t.doc_id, NULL, 0, NULL, NULL, NULL, NULL, t.seq
FROM memory_tombstone t WHERE t.user_id = %(user)s AND t.seq > %(seq)s
UNION ALL
-- the highest deletion a snapshot has absorbed (its tombstone is gone): see catch_up
SELECT 3, NULL, NULL, 0, NULL, NULL, NULL, NULL, s.pruned_seq
FROM memory_indexsnapshot s WHERE s.user_id = %(user)s AND s.pruned_seq > %(seq)s
ORDER BY 9
"""


def _epoch_us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def new_index() -> BM25Index:
    """An empty index shaped by the settings (``BM25_CONTEXT_TURNS``, ``BM25_OWN_WEIGHT``)."""
    config = settings.MEMFUSE
    return BM25Index(window=config["BM25_CONTEXT_TURNS"], own_weight=config["BM25_OWN_WEIGHT"])


def catch_up(index: BM25Index, user_id: uuid.UUID) -> bool:
    """Apply to ``index`` every change of the user numbered after ``index.seq``.

    Returns ``False`` when it cannot: a snapshot has absorbed deletions after ``index.seq``
    whose tombstones are gone, and the caller must reload (``load``). An empty index (seq 0)
    is built from the rows, which no longer hold what was deleted: it always can. One SQL
    statement; rows come in change order, so an edit replaces the version before it.
    """
    fresh = index.seq == 0
    with connection.cursor() as cursor:
        cursor.execute(_CHANGES_SQL, {"user": user_id, "seq": index.seq})
        rows = cursor.fetchall()
    for kind, doc_id, session_id, position, tsvector, speaker, speaker_tsvector, created_at, seq in rows:
        if kind == 3:
            if fresh:
                continue
            return False
        if kind == 2:
            index.remove(doc_id)
        else:
            index.add(
                Document(
                    kind=MESSAGE if kind == 0 else KNOWLEDGE,
                    id=doc_id,
                    lexemes=tsvector_counts(tsvector),
                    created_us=_epoch_us(created_at),
                    session=session_id,
                    position=position,
                    speaker=speaker or None,
                    speaker_lexemes=frozenset(tsvector_counts(speaker_tsvector)) if speaker else frozenset(),
                )
            )
        index.seq = max(index.seq, seq)
    if index.needs_compaction():
        index.compact()
    return True


def load(user_id: uuid.UUID) -> BM25Index:
    """The user's index as of now: their snapshot (if any, and of this format) caught up,
    else built from their rows (``catch_up`` from nothing)."""
    config = settings.MEMFUSE
    with snapshot_parts(user_id) as parts:
        index = BM25Index.from_parts(parts, window=config["BM25_CONTEXT_TURNS"], own_weight=config["BM25_OWN_WEIGHT"])
    if index is None or not catch_up(index, user_id):
        index = new_index()
        catch_up(index, user_id)  # from nothing: no pruned deletion can be missed
    return index


@contextmanager
def snapshot_parts(user_id: uuid.UUID) -> Iterator[Iterator[bytes]]:
    """The user's snapshot as its parts in order (``bytes``; none when there is no snapshot).

    Read in binary on a server-side-binding cursor: Django's cursors bind on the client,
    which gets results as text, and a megabyte of bytea as hex text took three times as long.
    Streamed a part at a time (libpq's single-row mode) for ``BM25Index.from_parts``: a load
    holds one part beyond the index it builds, not the snapshot again as libpq's result, as
    its parts and as their join. A load's peak sets the process's resident memory (the
    allocator keeps what it once held), and it grows with the user's history. The parts a
    reader leaves are read on exit: an unfinished stream would cancel the statement.
    """
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        rows = cursor.stream(
            "SELECT data FROM memory_indexsnapshotpart WHERE user_id = %s ORDER BY part", [user_id], binary=True
        )
        parts = (part for (part,) in rows)
        try:
            yield parts
        finally:
            for _ in parts:
                pass


def snapshot_lag(user_id: uuid.UUID) -> tuple[int | None, int, int]:
    """``(through_seq of the user's snapshot or None, documents in it, changes numbered after it)``."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH s AS (SELECT coalesce((SELECT through_seq FROM memory_indexsnapshot WHERE user_id = %(user)s), -1) AS seq)
            SELECT nullif((SELECT seq FROM s), -1),
                   coalesce((SELECT documents FROM memory_indexsnapshot WHERE user_id = %(user)s), 0),
                   (SELECT count(*) FROM memory_message WHERE user_id = %(user)s AND seq > (SELECT seq FROM s))
                   + (SELECT count(*) FROM memory_knowledge WHERE user_id = %(user)s AND seq > (SELECT seq FROM s))
                   + (SELECT count(*) FROM memory_tombstone WHERE user_id = %(user)s AND seq > (SELECT seq FROM s))
            """,
            {"user": user_id},
        )
        through, documents, changes = cursor.fetchone()
    return through, documents, changes
