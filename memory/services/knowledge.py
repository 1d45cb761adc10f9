"""Knowledge: user-level facts, embedded when written."""

from __future__ import annotations

import uuid

from django.db import connection, transaction
from django.utils import timezone
from pgvector import Vector

from memory import embedding_guard
from memory.inference import registry
from memory.models import Knowledge, User
from memory.pgvector_binary import VectorArray, use_binary_vectors
from memory.selectors import knowledge_by_ids
from memory.services.common import memory_version_bump


def knowledge_add(*, user: User, contents: list[str]) -> list[Knowledge]:
    """Store user-level facts, embedded in one batch; returns them in input order."""

    def write(embeddings, generation: int | None) -> list[Knowledge]:
        with transaction.atomic():
            with connection.cursor() as cursor:
                embedding_guard.guard_write(cursor, generation=generation)
            memory_version_bump(user.pk)
            return Knowledge.objects.bulk_create(
                [Knowledge(user=user, content=c, embedding=e) for c, e in zip(contents, embeddings)]
            )

    return embedding_guard.embed_guarded(lambda: registry.embed_documents(contents), write)


def knowledge_update(*, user: User, knowledge_ids: list[uuid.UUID], new_contents: list[str]) -> list[Knowledge]:
    """Replace the content of the given items, re-embedding them. ``NotFound`` on unknown ids."""
    knowledge_by_ids(user=user, knowledge_ids=knowledge_ids)
    return embedding_guard.embed_guarded(
        lambda: registry.embed_documents(new_contents),
        lambda embeddings, generation: _knowledge_write(
            user=user, knowledge_ids=knowledge_ids, new_contents=new_contents, embeddings=embeddings, generation=generation
        ),
    )


def _knowledge_write(*, user: User, knowledge_ids, new_contents, embeddings, generation: int | None) -> list[Knowledge]:
    with transaction.atomic():
        with connection.cursor() as cursor:
            embedding_guard.guard_write(cursor, generation=generation)
        memory_version_bump(user.pk)
        rows = knowledge_by_ids(user=user, knowledge_ids=knowledge_ids, for_update=True)
        now = timezone.now()  # bulk_update does not apply auto_now
        for row, content, embedding in zip(rows, new_contents, embeddings):
            row.content, row.embedding, row.updated_at = content, embedding, now
        Knowledge.objects.bulk_update(rows, ["content", "embedding", "updated_at"])
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE memory_knowledge SET seq = nextval('memory_change_seq') WHERE id = ANY(%s)", [knowledge_ids]
            )
    return rows


def knowledge_delete(*, user: User, knowledge_ids: list[uuid.UUID]) -> None:
    """Delete the given items. Raises ``NotFound`` when any id is not the user's."""
    with transaction.atomic():
        memory_version_bump(user.pk)
        knowledge_by_ids(user=user, knowledge_ids=knowledge_ids, for_update=True)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                WITH gone AS (DELETE FROM memory_knowledge WHERE user_id = %s AND id = ANY(%s) RETURNING user_id, id)
                INSERT INTO memory_tombstone (user_id, kind, doc_id) SELECT user_id, 'knowledge', id FROM gone
                """,
                [user.pk, list(knowledge_ids)],
            )


def knowledge_insert_bulk(cursor, *, user_id: uuid.UUID, rows: list[dict], embeddings: list[Vector | None]) -> set[uuid.UUID]:
    """Insert knowledge items as they are given, ids and ``created_at`` kept, in one statement:
    the bulk path of an import (``memory.portability``). Returns the ids inserted; an item
    whose id is taken is left out (``ON CONFLICT DO NOTHING``: the caller tells an existing
    item from a clash).

    ``rows``: dicts with ``id``, ``content``, ``metadata_json`` (the metadata's JSON) and
    ``created_at``; ``embeddings[i]``: item ``i``'s embedding. The caller's transaction holds
    the write guard (``embedding_guard.guard_write``) and the user's lock
    (``memory_version_bump``), in that order.
    """
    use_binary_vectors(cursor)
    cursor.execute(
        """
        INSERT INTO memory_knowledge (id, user_id, content, metadata, embedding, created_at, updated_at)
        SELECT k.id, %(user)s, k.content, k.metadata, k.embedding, k.created_at, now()
        FROM unnest(%(ids)s::uuid[], %(contents)s::text[], %(metadata)s::jsonb[], %(vectors)s::vector[],
                    %(created)s::timestamptz[]) AS k(id, content, metadata, embedding, created_at)
        ON CONFLICT DO NOTHING
        RETURNING id
        """,
        {
            "user": user_id,
            "ids": [v["id"] for v in rows],
            "contents": [v["content"] for v in rows],
            "metadata": [v["metadata_json"] for v in rows],
            "vectors": VectorArray(embeddings),
            "created": [v["created_at"] for v in rows],
        },
    )
    return {row[0] for row in cursor.fetchall()}
