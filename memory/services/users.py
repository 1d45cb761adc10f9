"""Users: create, update, delete with their sessions, messages and knowledge."""

from __future__ import annotations

import uuid

from django.db import transaction

from memory import selectors
from memory.models import User
from memory.retrieval import cache
from memory.services.common import _create_unique, _get_or_create, _update_fields, memory_version_bump
from memory.tenancy import Principal


def user_create(*, tenant_id: uuid.UUID, name: str, description: str = "", metadata: dict | None = None) -> User:
    """Create a user of tenant ``tenant_id``. Raises ``Conflict`` (field ``name``) when the tenant has that name."""
    return _create_unique(User, tenant_id=tenant_id, name=name, description=description or "", metadata=metadata or {})


def user_get_or_create(*, principal: Principal, user: uuid.UUID | str | None, field: str = "user") -> User:
    """The user ``principal`` names by ``user`` (an id, a name, or ``None`` for a user key's
    own user: ``selectors.user_find``); a tenant key's name not taken yet creates that user in
    its tenant (the ``memfuse`` client's ``init``, MCP's ``memory_add`` and ``knowledge_add``).

    Raises what ``selectors.user_find`` raises (``NotFound``, ``InvalidInput``, naming
    ``field``): an id must exist, and a user key creates no users.
    """
    if not isinstance(user, str) or principal.is_user_key:
        return selectors.user_find(principal=principal, user=user, field=field)
    return _get_or_create(
        lambda: selectors.users_list(principal=principal, name=user),
        lambda: user_create(tenant_id=principal.tenant_id, name=user),
    )


def user_update(*, user: User, name: str | None = None, description: str | None = None, metadata: dict | None = None) -> User:
    """Change the given fields of ``user``. Raises ``Conflict`` when the new name is taken."""
    return _update_fields(user, name=name, description=description, metadata=metadata)


def user_delete(*, user: User) -> None:
    """Delete a user with its sessions, messages and knowledge, in one transaction."""
    with transaction.atomic():
        memory_version_bump(user.pk)
        user.delete()
    cache.forget(user.pk)
