"""Users: create, update, delete with their sessions, messages and knowledge."""

from __future__ import annotations

import uuid

from django.db import transaction

from memory.models import User
from memory.services.common import _bump_memory_version, _create_unique, _update_fields


def user_create(*, tenant_id: uuid.UUID, name: str, description: str = "", metadata: dict | None = None) -> User:
    """Create a user of tenant ``tenant_id``. Raises ``Conflict`` (field ``name``) when the tenant has that name."""
    return _create_unique(User, tenant_id=tenant_id, name=name, description=description or "", metadata=metadata or {})


def user_update(*, user: User, name: str | None = None, description: str | None = None, metadata: dict | None = None) -> User:
    """Change the given fields of ``user``. Raises ``Conflict`` when the new name is taken."""
    return _update_fields(user, name=name, description=description, metadata=metadata)


def user_delete(*, user: User) -> None:
    """Delete a user with its sessions, messages and knowledge, in one transaction."""
    from memory.retrieval import cache

    with transaction.atomic():
        _bump_memory_version(user.pk)
        user.delete()
    cache.forget(user.pk)
