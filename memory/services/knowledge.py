"""Knowledge: user-level facts, embedded when written."""

from __future__ import annotations

import uuid

from django.db import connection, transaction
from django.utils import timezone

from memory import embedding_model
from memory.inference import registry
from memory.models import Knowledge, User
from memory.selectors import knowledge_by_ids
from memory.services.common import _bump_memory_version


def knowledge_add(*, user: User, contents: list[str]) -> list[Knowledge]:
    """Store user-level facts, embedded in one batch; returns them in input order."""
    while True:  # again when a reembed switched the model meanwhile (embedding_model.guard_write)
        generation = embedding_model.follow_active_model()
        embeddings = registry.embed_documents(contents)
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    embedding_model.guard_write(cursor, generation=generation)
                _bump_memory_version(user.pk)
                return Knowledge.objects.bulk_create(
                    [Knowledge(user=user, content=c, embedding=e) for c, e in zip(contents, embeddings)]
                )
        except embedding_model.ModelChanged:
            continue


def knowledge_update(*, user: User, knowledge_ids: list[uuid.UUID], new_contents: list[str]) -> list[Knowledge]:
    """Replace the content of the given items, re-embedding them. ``NotFound`` on unknown ids."""
    knowledge_by_ids(user=user, knowledge_ids=knowledge_ids)
    while True:  # again when a reembed switched the model meanwhile (embedding_model.guard_write)
        generation = embedding_model.follow_active_model()
        embeddings = registry.embed_documents(new_contents)
        try:
            return _knowledge_write(user=user, knowledge_ids=knowledge_ids, new_contents=new_contents, embeddings=embeddings, generation=generation)
        except embedding_model.ModelChanged:
            continue


def _knowledge_write(*, user: User, knowledge_ids, new_contents, embeddings, generation: int | None) -> list[Knowledge]:
    with transaction.atomic():
        with connection.cursor() as cursor:
            embedding_model.guard_write(cursor, generation=generation)
        _bump_memory_version(user.pk)
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
        _bump_memory_version(user.pk)
        knowledge_by_ids(user=user, knowledge_ids=knowledge_ids, for_update=True)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                WITH gone AS (DELETE FROM memory_knowledge WHERE user_id = %s AND id = ANY(%s) RETURNING user_id, id)
                INSERT INTO memory_tombstone (user_id, kind, doc_id) SELECT user_id, 'knowledge', id FROM gone
                """,
                [user.pk, list(knowledge_ids)],
            )
