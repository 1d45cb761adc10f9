"""The shadow columns of a ``reembed`` run (``memory.indexing.reembed`` fills them): swapped in
at the switch, the previous model's dropped later, an unfinished run's dropped on abort."""

from __future__ import annotations

from django.db import connection

from memory.models import ANN_BUCKETS, EmbeddingModel

HNSW_INDEX = "memory_message_context_hnsw_{bucket}"  # memory.models.Message.Meta.indexes


def swap_columns(cursor) -> None:
    """Rename the served columns and indexes to ``*_old`` and the shadow ones into their
    place. Runs under ``ACCESS EXCLUSIVE`` locks of both tables."""
    cursor.execute(
        "ALTER TABLE memory_message DROP COLUMN IF EXISTS embedding_old, DROP COLUMN IF EXISTS context_embedding_old"
    )
    cursor.execute("ALTER TABLE memory_knowledge DROP COLUMN IF EXISTS embedding_old")
    for table, columns in (
        ("memory_message", ("embedding", "context_embedding")),
        ("memory_knowledge", ("embedding",)),
    ):
        for column in columns:
            cursor.execute(f"ALTER TABLE {table} RENAME COLUMN {column} TO {column}_old")
            cursor.execute(f"ALTER TABLE {table} RENAME COLUMN {column}_next TO {column}")
        cursor.execute(f"ALTER TABLE {table} DROP COLUMN embedding_next_seq")
    for bucket in range(ANN_BUCKETS):
        name = HNSW_INDEX.format(bucket=bucket)
        cursor.execute(f"ALTER INDEX IF EXISTS {name} RENAME TO {name}_old")
        cursor.execute(f"ALTER INDEX {name}_next RENAME TO {name}")


def reembed_drop_old() -> bool:
    """Drop the previous model's columns (and with them their indexes), left by a switch so
    that an operator can still compare; returns whether there were any."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid IN ('memory_message'::regclass, 'memory_knowledge'::regclass) "
            "AND attname IN ('embedding_old', 'context_embedding_old') AND NOT attisdropped"
        )
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("SET lock_timeout = '5s'")
        try:
            cursor.execute(
                "ALTER TABLE memory_message DROP COLUMN IF EXISTS embedding_old, DROP COLUMN IF EXISTS context_embedding_old"
            )
            cursor.execute("ALTER TABLE memory_knowledge DROP COLUMN IF EXISTS embedding_old")
        finally:
            cursor.execute("RESET lock_timeout")
    return True


def reembed_abort() -> bool:
    """Drop an unfinished run: its shadow columns, their indexes and its ``building`` row.
    Returns whether there was one."""
    run = EmbeddingModel.objects.filter(state=EmbeddingModel.State.BUILDING).first()
    with connection.cursor() as cursor:
        for bucket in range(ANN_BUCKETS):
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX.format(bucket=bucket)}_next")
        cursor.execute(
            "ALTER TABLE memory_message DROP COLUMN IF EXISTS embedding_next, DROP COLUMN IF EXISTS context_embedding_next, "
            "DROP COLUMN IF EXISTS embedding_next_seq"
        )
        cursor.execute(
            "ALTER TABLE memory_knowledge DROP COLUMN IF EXISTS embedding_next, DROP COLUMN IF EXISTS embedding_next_seq"
        )
    if run is not None:
        run.delete()
    return run is not None
