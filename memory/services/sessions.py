"""Sessions: create, update, delete with their messages."""

from __future__ import annotations

import uuid

from django.db import transaction

from memory.errors import NotFound
from memory.models import Agent, Session, User
from memory.services.common import _bump_memory_version, _create_unique, _delete_messages, _update_fields


def session_create(*, user: User, agent: Agent, name: str | None = None, metadata: dict | None = None) -> Session:
    """Create a session of ``user`` with ``agent``; a missing name becomes ``session-<hex>``.

    Raises ``Conflict`` (field ``name``) when the user already has a session of that name, and
    ``NotFound`` (field ``agent_id``) when the agent belongs to another tenant than the user.
    """
    if agent.tenant_id != user.tenant_id:
        raise NotFound(f"Agent '{agent.pk}' not found", field="agent_id")
    return _create_unique(
        Session,
        user=user,
        agent=agent,
        name=name or f"session-{uuid.uuid4().hex[:12]}",
        metadata=metadata or {},
    )


def session_update(*, session: Session, name: str | None = None, metadata: dict | None = None) -> Session:
    """Rename a session or replace its metadata. Raises ``Conflict`` when the name is taken."""
    return _update_fields(session, name=name, metadata=metadata)


def session_delete(*, session: Session) -> None:
    """Delete a session with its messages, in one transaction."""
    with transaction.atomic():
        _bump_memory_version(session.user_id)
        _delete_messages("session_id = %s", [session.pk])
        session.delete()
