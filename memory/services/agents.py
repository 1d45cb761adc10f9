"""Agents: create, update, delete with their sessions and messages."""

from __future__ import annotations

import uuid

from django.db import transaction

from memory import selectors
from memory.errors import Forbidden
from memory.models import Agent
from memory.services.common import (
    _create_unique,
    _delete_messages,
    _get_or_create,
    _update_fields,
    memory_version_bump,
)
from memory.tenancy import Principal


def agent_create(*, tenant_id: uuid.UUID, name: str, description: str = "", metadata: dict | None = None) -> Agent:
    """Create an agent of tenant ``tenant_id``. Raises ``Conflict`` (field ``name``) when the tenant has that name."""
    return _create_unique(Agent, tenant_id=tenant_id, name=name, description=description or "", metadata=metadata or {})


def agent_get_or_create(*, principal: Principal, name: str, field: str = "agent") -> Agent:
    """The agent of ``principal``'s tenant called ``name``, created on first use.

    Raises ``Forbidden`` (naming ``field``) when there is none and ``principal`` is a user
    key: a user key creates no agents.
    """

    def create() -> Agent:
        if principal.is_user_key:
            raise Forbidden(f"Agent '{name}' does not exist and a user key cannot create agents", field=field)
        return agent_create(tenant_id=principal.tenant_id, name=name)

    return _get_or_create(lambda: selectors.agents_list(principal=principal, name=name), create)


def agent_update(*, agent: Agent, name: str | None = None, description: str | None = None, metadata: dict | None = None) -> Agent:
    """Change the given fields of ``agent``. Raises ``Conflict`` when the new name is taken."""
    return _update_fields(agent, name=name, description=description, metadata=metadata)


def agent_delete(*, agent: Agent) -> None:
    """Delete an agent with its sessions and their messages, in one transaction."""
    with transaction.atomic():
        for user_id in sorted(set(agent.sessions.values_list("user_id", flat=True))):  # one lock order
            memory_version_bump(user_id)
        _delete_messages("session_id IN (SELECT id FROM memory_session WHERE agent_id = %s)", [agent.pk])
        agent.delete()
