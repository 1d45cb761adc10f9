"""Passes 2 and 3 of an import (``memory.portability.importer``): the messages, one transaction
per run of one session's lines, and the knowledge items, a transaction per batch, each
written through the services' bulk inserts (``messages_insert_bulk``,
``knowledge_insert_bulk``) and checked for clashes in its transaction."""

from __future__ import annotations

from collections.abc import Iterator

from django.conf import settings
from django.db import connection, transaction
from pgvector import Vector

from memory import embedding_guard
from memory.errors import NotFound
from memory.inference import registry
from memory.pgvector_binary import use_binary_vectors
from memory.portability import staging
from memory.portability.records import Source, checked_records
from memory.services.common import memory_version_bump
from memory.services.knowledge import knowledge_insert_bulk
from memory.services.messages import messages_insert_bulk

WRITE_BATCH = 1000  # rows per INSERT statement, at most
WRITE_BATCH_BYTES = 8 * 1024 * 1024  # and about this many bytes of their lines' JSON
RUN_ROWS = 10 * WRITE_BATCH  # messages of one session per transaction, at most


def write_messages(
    source: Source, *, target_id, use_embeddings: bool, generation: int | None, progress
) -> tuple[int, bool]:
    """The messages, a transaction per run of one session's lines. Returns how many were new
    and whether the file's embeddings were still used at the end (not after a model switch)."""
    messages = (values for _, values in checked_records(source, ("message",)))
    written = 0
    first = next(messages, None)
    while first is not None:
        count, first, use_embeddings = _write_run(
            first, messages, target_id=target_id, use_embeddings=use_embeddings, generation=generation, progress=progress
        )
        written += count
    return written, use_embeddings


def _write_run(
    first: dict, messages: Iterator[dict], *, target_id, use_embeddings: bool, generation: int | None, progress
) -> tuple[int, dict | None, bool]:
    """One transaction: ``first`` and the messages after it of the same session (``RUN_ROWS``
    at most), inserted a batch at a time. Returns ``(how many were new, the first message of
    the next run or None, whether the file's embeddings are still used)``.

    The session is checked to be the user's in the transaction, under the user row's lock
    (a delete of the session takes it first). When the model switched since the import
    read it, ``guard_write`` refuses before anything is read past ``first``: the run is
    written again, pending."""
    session_id = first["session_id"]

    def write(_, generation: int | None) -> tuple[int, dict | None]:
        with transaction.atomic(), connection.cursor() as cursor:
            if use_embeddings:
                embedding_guard.guard_write(cursor, generation=generation)
            bucket = memory_version_bump(target_id)
            cursor.execute("SELECT 1 FROM memory_session WHERE id = %s AND user_id = %s", [session_id, target_id])
            if cursor.fetchone() is None:
                raise NotFound(f"Session '{session_id}' not found", field=f"lines[{first['_line']}].session_id")
            use_binary_vectors(cursor)
            written, rows, top = 0, 0, -1
            batch, size, following = [first], first["_size"], None
            for values in messages:
                if values["session_id"] != session_id or rows + len(batch) >= RUN_ROWS:
                    following = values
                    break
                if len(batch) >= WRITE_BATCH or size >= WRITE_BATCH_BYTES:
                    written += _insert_messages(cursor, batch, target_id=target_id, use_embeddings=use_embeddings, bucket=bucket)
                    rows, top = rows + len(batch), max(top, *(v["position"] for v in batch))
                    if progress:
                        progress(len(batch))
                    batch, size = [], 0
                batch.append(values)
                size += values["_size"]
            written += _insert_messages(cursor, batch, target_id=target_id, use_embeddings=use_embeddings, bucket=bucket)
            top = max(top, *(v["position"] for v in batch))
            # An add continues after the highest position (memory.services.messages.messages_add).
            cursor.execute(
                "UPDATE memory_session SET next_position = GREATEST(next_position, %s) WHERE id = %s",
                [top + 1, session_id],
            )
        if progress:
            progress(len(batch))
        return written, following

    def written_pending() -> None:  # nothing was written nor read: pending, like the rest
        nonlocal use_embeddings
        use_embeddings = False

    # The file's vectors, read in the transaction: nothing to embed before it.
    written, following = embedding_guard.embed_guarded(lambda: None, write, generation=generation, on_change=written_pending)
    return written, following, use_embeddings


def _insert_messages(cursor, rows: list[dict], *, target_id, use_embeddings: bool, bucket) -> int:
    """One ``INSERT`` of ``rows`` (one session's) in the caller's transaction; returns how many
    were new. A row not inserted must be there as the file has it (the same user, session and
    position), else ``Conflict`` naming its line, and the caller's transaction rolls back."""
    inserted = messages_insert_bulk(
        cursor, user_id=target_id, rows=rows, embeddings=[_vector(v) if use_embeddings else None for v in rows], bucket=bucket
    )
    if len(inserted) < len(rows):
        new = {row[0] for row in inserted}
        others = [v for v in rows if v["id"] not in new]
        # Each join on its own unique index, as in staging.check_stored.
        cursor.execute(
            """
            WITH f AS (SELECT * FROM unnest(%s::uuid[], %s::int[], %s::int[]) AS f(id, position, line))
            SELECT f.line, 'id', f.id, NULL::integer FROM f JOIN memory_message m ON m.id = f.id
            WHERE (m.user_id, m.session_id, m.position) IS DISTINCT FROM (%s, %s, f.position)
            UNION ALL
            SELECT f.line, 'position', %s, f.position FROM f LEFT JOIN memory_message m ON m.id = f.id
            WHERE m.id IS NULL
            ORDER BY 1 LIMIT 1
            """,
            [
                [v["id"] for v in others],
                [v["position"] for v in others],
                [v["_line"] for v in others],
                target_id,
                rows[0]["session_id"],
                rows[0]["session_id"],
            ],
        )
        clash = cursor.fetchone()
        if clash is not None:
            line, field_name, value, position = clash
            raise staging.conflict(line, field_name, "message", value, position)
    return len(inserted)


def _vector(values: dict) -> Vector | None:
    """A record's embedding as a query parameter (``None``: the record has none)."""
    return None if values["embedding"] is None else Vector(values["embedding"])


def write_knowledge(source: Source, *, target_id, use_embeddings: bool, generation: int | None, progress) -> int:
    """The knowledge items, a transaction per batch of ``FLUSH_BATCH_SIZE``; returns how many were new."""
    size = max(1, settings.BUFFERS["BATCH_SIZE"])
    written = 0
    batch: list[dict] = []
    for _, values in checked_records(source, ("knowledge",)):
        batch.append(values)
        if len(batch) >= size:
            count, use_embeddings, generation = _write_knowledge_batch(
                batch, target_id=target_id, use_embeddings=use_embeddings, generation=generation
            )
            written += count
            if progress:
                progress(len(batch))
            batch = []
    if batch:
        count, use_embeddings, generation = _write_knowledge_batch(
            batch, target_id=target_id, use_embeddings=use_embeddings, generation=generation
        )
        written += count
        if progress:
            progress(len(batch))
    return written


def _write_knowledge_batch(
    items: list[dict], *, target_id, use_embeddings: bool, generation: int | None
) -> tuple[int, bool, int | None]:
    """One batch of knowledge items: those not stored yet are embedded (outside the
    transaction, at background priority: an import waits for it, no query does), then
    inserted in one transaction. Returns ``(how many were new, use_embeddings, generation)``,
    the last two changed when a reembed switched the model (the batch is embedded again)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM memory_knowledge WHERE id = ANY(%s)", [[v["id"] for v in items]])
        present = {row[0] for row in cursor.fetchall()}
    new = [v for v in items if v["id"] not in present]

    def embed() -> dict:
        vectors = {v["id"]: v["embedding"] for v in new if use_embeddings and v["embedding"] is not None}
        missing = [v for v in new if v["id"] not in vectors]
        if missing:
            embedded = registry.embed([v["content"] for v in missing], priority=registry.BACKGROUND)
            vectors.update(zip((v["id"] for v in missing), embedded))
        return vectors

    def write(vectors: dict, generation_now: int | None) -> int:
        nonlocal generation
        generation = generation_now
        return _insert_knowledge(new, vectors, checked=items, target_id=target_id, generation=generation_now)

    def embed_all() -> None:  # the file's vectors are the old model's: all embedded again
        nonlocal use_embeddings
        use_embeddings = False

    written = embedding_guard.embed_guarded(embed, write, generation=generation, on_change=embed_all)
    return written, use_embeddings, generation


def _insert_knowledge(new: list[dict], vectors: dict, *, checked: list[dict], target_id, generation: int | None) -> int:
    """One transaction: ``new`` inserted with their ``vectors`` (by id); then every item of
    ``checked`` not inserted must be the user's, else ``Conflict`` (rolled back)."""
    with transaction.atomic(), connection.cursor() as cursor:
        embedding_guard.guard_write(cursor, generation=generation)
        memory_version_bump(target_id)
        inserted = knowledge_insert_bulk(
            cursor, user_id=target_id, rows=new, embeddings=[_as_vector(vectors.get(v["id"])) for v in new]
        )
        others = [v for v in checked if v["id"] not in inserted]
        if others:
            cursor.execute(
                "SELECT f.line, f.id FROM unnest(%s::uuid[], %s::int[]) AS f(id, line) "
                "LEFT JOIN memory_knowledge k ON k.id = f.id WHERE k.user_id IS DISTINCT FROM %s ORDER BY f.line LIMIT 1",
                [[v["id"] for v in others], [v["_line"] for v in others], target_id],
            )
            clash = cursor.fetchone()
            if clash is not None:
                raise staging.conflict(clash[0], "id", "knowledge", clash[1])
    return len(inserted)


def _as_vector(value) -> Vector | None:
    return None if value is None else Vector(value)
