"""Get-or-create of users, agents and sessions (``memory.services``): the one entry point MCP's
``memory_add`` and ``knowledge_add`` call, with its rules per key scope and its answer to a
concurrent create of the same name."""

from __future__ import annotations

import threading

import pytest
from django.db import DataError, connection

from memory.errors import Forbidden, InvalidInput, NotFound
from memory.models import Agent, ApiKey, KeyScope, Message, Session, User
from memory.services.api_keys import api_key_create
from memory.services.messages import MessageIn, messages_add_to_named_session
from memory.services.sessions import session_get_or_create
from memory.services.users import user_get_or_create
from memory.tenancy import Principal

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(tenant_key) -> Principal:
    """acme's tenant key, as a request's principal."""
    return Principal.of(ApiKey.objects.get(scope=KeyScope.TENANT))


@pytest.fixture
def alices_key(alice) -> Principal:
    """alice's user key, as a request's principal."""
    api_key_create(scope=KeyScope.USER, user=alice, name="alice's key")
    return Principal.of(ApiKey.objects.get(scope=KeyScope.USER))


def test_a_tenant_key_finds_by_name_or_id_and_creates_a_new_name(acme, alice):
    """alice by name or id is the existing row; carol is created once, then found."""
    assert user_get_or_create(principal=acme, user="alice") == alice
    assert user_get_or_create(principal=acme, user=alice.pk) == alice

    carol = user_get_or_create(principal=acme, user="carol")
    assert user_get_or_create(principal=acme, user="carol") == carol
    assert User.objects.filter(name="carol").count() == 1


def test_a_user_key_creates_no_user_and_no_agent(alices_key, alice, bob):
    """A user key gets its own user (None or its name); another name is NotFound, an unknown agent Forbidden."""
    assert user_get_or_create(principal=alices_key, user=None) == alice
    assert user_get_or_create(principal=alices_key, user="alice") == alice
    with pytest.raises(NotFound) as missing:
        user_get_or_create(principal=alices_key, user="bob")
    assert [e["field"] for e in missing.value.errors] == ["user"]
    with pytest.raises(Forbidden) as forbidden:
        session_get_or_create(principal=alices_key, user=alice, name="chat", agent_name="new-agent")
    assert [e["field"] for e in forbidden.value.errors] == ["agent"]
    assert not User.objects.filter(name="carol").exists() and not Agent.objects.filter(name="new-agent").exists()


def test_a_tenant_key_must_name_the_user(acme):
    """No user with a tenant key is InvalidInput naming user."""
    with pytest.raises(InvalidInput) as invalid:
        user_get_or_create(principal=acme, user=None)
    assert [e["field"] for e in invalid.value.errors] == ["user"]


def test_a_session_is_created_with_its_agent_once(acme, alice, agent):
    """The first call creates the session (and a new agent); the next ones return it."""
    chat = session_get_or_create(principal=acme, user=alice, name="chat", agent_name="helper")
    assert chat.agent.name == "helper" and chat.user_id == alice.pk
    assert session_get_or_create(principal=acme, user=alice, name="chat", agent_name="other") == chat
    assert not Agent.objects.filter(name="other").exists()
    existing_agent = session_get_or_create(principal=acme, user=alice, name="second", agent_name=agent.name)
    assert existing_agent.agent_id == agent.pk


def test_a_refused_add_leaves_no_user_or_session(acme):
    """The user, agent and session are created with the add or not at all: a role the database refuses rolls all back."""
    with pytest.raises(DataError):  # a role longer than its column
        messages_add_to_named_session(
            principal=acme,
            user="dave",
            agent_name="helper",
            session_name="chat",
            messages=[MessageIn(role="user", content="hello"), MessageIn(role="x" * 100, content="bad")],
        )
    assert not User.objects.filter(name="dave").exists() and not Session.objects.exists()
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_of_one_name_give_one_session(tenant_key, alice):
    """Eight threads asking for the same new session at once all get the one row."""
    acme = Principal.of(ApiKey.objects.get(scope=KeyScope.TENANT))
    barrier, found, errors = threading.Barrier(8), [], []

    def ask() -> None:
        try:
            barrier.wait()
            found.append(session_get_or_create(principal=acme, user=alice, name="race", agent_name="racer").pk)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == [] and len(set(found)) == 1
    assert Session.objects.filter(name="race").count() == 1 and Agent.objects.filter(name="racer").count() == 1
