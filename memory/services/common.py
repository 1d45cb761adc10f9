"""Helpers every writer of the services shares: the user row lock, message deletes with their
tombstones, and unique-name creates and updates that map a violation to ``Conflict``."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from django.db import IntegrityError, connection, transaction
from django.db.models import Model, QuerySet

from memory.errors import Conflict


def memory_version_bump(user_id: uuid.UUID) -> int | None:
    """Mark the user's memory as changed: caches keyed by ``memory_version`` go stale.

    Called FIRST in every transaction that changes or deletes a user's existing messages or
    knowledge. It takes the user row's ``FOR UPDATE`` lock, which orders those writers and a
    flush's write (which takes ``FOR KEY SHARE`` on the same row) one behind the other, so a
    cascade delete or an edit and a flush never deadlock on message rows locked in different
    orders. An add (``_ADD_SQL``) takes only the weaker lock of a plain ``UPDATE``, which a
    flush's ``FOR KEY SHARE`` does not block: adds never wait for a flush's write.

    Holding that lock is also what makes the user's change numbers (``memory_change_seq``,
    taken after it) follow the order of commits (``memory.retrieval.store``). Returns the
    user's ``ann_bucket`` (``None`` also for a user that no longer exists).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE memory_user SET memory_version = memory_version + 1 "
            "WHERE id = (SELECT id FROM memory_user WHERE id = %s FOR UPDATE) RETURNING ann_bucket",
            [user_id],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def _delete_messages(where: str, params: list) -> list[tuple]:
    """Delete the messages ``where`` selects, leaving a tombstone for each (cached indexes
    drop them); returns the ``(session_id, position)`` they held. The caller holds the lock
    of every user concerned (``memory_version_bump``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH gone AS (DELETE FROM memory_message WHERE {where} RETURNING user_id, id, session_id, position),
            tombstones AS (INSERT INTO memory_tombstone (user_id, kind, doc_id) SELECT user_id, 'message', id FROM gone)
            SELECT session_id, position FROM gone
            """,
            params,
        )
        return cursor.fetchall()


def _create_unique(model, *, field_name: str = "name", **values):
    """Create a row; a unique-constraint violation becomes ``Conflict`` naming ``field_name``."""
    try:
        with transaction.atomic():
            return model.objects.create(**values)
    except IntegrityError:
        raise Conflict(
            f"{model._meta.verbose_name.capitalize()} with {field_name} '{values.get(field_name)}' already exists",
            field=field_name,
        ) from None


def _get_or_create(find: Callable[[], QuerySet], create: Callable[[], Model]):
    """``find().first()``, else ``create()``. When a concurrent call creates the same row
    first, ``create`` raises ``Conflict`` (the unique constraint orders them, in a savepoint:
    ``_create_unique``) and the row that call created is returned instead."""
    found = find().first()
    if found is not None:
        return found
    try:
        return create()
    except Conflict:
        return find().get()


def _update_fields(obj, *, field_name: str = "name", **changes):
    """Apply the non-None ``changes`` to ``obj`` and save; duplicate name becomes ``Conflict``."""
    changes = {key: value for key, value in changes.items() if value is not None}
    for key, value in changes.items():
        setattr(obj, key, value)
    if changes:
        try:
            with transaction.atomic():
                obj.save(update_fields=[*changes, "updated_at"])
        except IntegrityError:
            raise Conflict(
                f"{obj._meta.verbose_name.capitalize()} with {field_name} '{changes.get(field_name)}' already exists",
                field=field_name,
            ) from None
    return obj
