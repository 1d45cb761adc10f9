"""Sessions: create, update, delete with their messages."""

from __future__ import annotations

import uuid

from django.db import transaction

from memory import selectors
from memory.errors import NotFound
from memory.models import Agent, Session, User
from memory.services.agents import agent_get_or_create
from memory.services.common import (
    _create_unique,
    _delete_messages,
    _get_or_create,
    _update_fields,
    memory_version_bump,
)
from memory.tenancy import Principal


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


def session_get_or_create(*, principal: Principal, user: User, name: str, agent_name: str) -> Session:
    """The session of ``user`` called ``name``; on first use created with the agent called
    ``agent_name``, itself created when missing (``agent_get_or_create``).

    Raises ``Forbidden`` (field ``agent``) when the session and the agent are both missing
    and ``principal`` is a user key.
    """
    return _get_or_create(
        lambda: selectors.sessions_list(principal=principal, user_id=user.pk, name=name),
        lambda: session_create(user=user, agent=agent_get_or_create(principal=principal, name=agent_name), name=name),
    )


def session_update(*, session: Session, name: str | None = None, metadata: dict | None = None) -> Session:
    """Rename a session or replace its metadata. Raises ``Conflict`` when the name is taken."""
    return _update_fields(session, name=name, metadata=metadata)


def session_delete(*, session: Session) -> None:
    """Delete a session with its messages, in one transaction."""
    with transaction.atomic():
        memory_version_bump(session.user_id)
        _delete_messages("session_id = %s", [session.pk])
        session.delete()
