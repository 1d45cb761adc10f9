"""Deletes through the REST API cascade to exactly what they own, and nothing else."""

from __future__ import annotations

import pytest

from memory.models import Agent, Knowledge, Message, Session, User
from memory.services.agents import agent_create
from memory.services.knowledge import knowledge_add
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create
from tests.envelopes import assert_success

pytestmark = pytest.mark.django_db


def counts() -> dict[str, int]:
    return {
        "users": User.objects.count(),
        "agents": Agent.objects.count(),
        "sessions": Session.objects.count(),
        "messages": Message.objects.count(),
        "knowledge": Knowledge.objects.count(),
    }


@pytest.fixture
def world(alice, bob, agent, alice_session, bob_session, alice_messages, bob_messages):
    """alice and bob with the shared agent; alice also talks to a second agent; both have knowledge.

    Rows: 2 users, 2 agents, 3 sessions, 3 + 2 + 1 messages, 2 + 1 knowledge items.
    """
    gardener = agent_create(tenant_id=agent.tenant_id, name="gardener")
    garden_session = session_create(user=alice, agent=gardener, name="alice-garden")
    messages_add(session=garden_session, messages=[MessageIn(role="user", content="Tomatoes need sun.")])
    knowledge_add(user=alice, contents=["Alice is vegetarian.", "Alice speaks Portuguese."])
    knowledge_add(user=bob, contents=["Bob keeps bees."])
    assert counts() == {"users": 2, "agents": 2, "sessions": 3, "messages": 6, "knowledge": 3}
    return {"gardener": gardener, "garden_session": garden_session}


def test_deleting_a_user_deletes_their_sessions_messages_and_knowledge(api, alice, bob, world):
    """DELETE /users/{id} removes the user's sessions, messages and knowledge; other users and agents stay."""
    before = counts()

    assert_success(api.delete(f"/api/v1/users/{alice.pk}"))

    assert counts() == {**before, "users": 1, "sessions": 1, "messages": 2, "knowledge": 1}
    assert not Session.objects.filter(user_id=alice.pk).exists()
    assert not Message.objects.filter(user_id=alice.pk).exists()
    assert not Knowledge.objects.filter(user_id=alice.pk).exists()
    assert Message.objects.filter(user=bob).count() == 2
    assert Knowledge.objects.filter(user=bob).count() == 1


def test_deleting_an_agent_deletes_its_sessions_and_messages_but_not_users(api, alice, bob, agent, world):
    """DELETE /agents/{id} removes that agent's sessions and their messages; users, knowledge and other agents stay."""
    before = counts()

    assert_success(api.delete(f"/api/v1/agents/{agent.pk}"))

    assert counts() == {**before, "agents": 1, "sessions": 1, "messages": 1}
    assert list(Session.objects.values_list("pk", flat=True)) == [world["garden_session"].pk]
    assert set(User.objects.values_list("name", flat=True)) == {"alice", "bob"}


def query_everything(api, user) -> list[dict]:
    response = api.post(f"/api/v1/users/{user.pk}/query", {"query": "puppy", "top_k": 100}, format="json")
    return assert_success(response)["results"]


def test_deleting_an_agent_updates_what_queries_find(api, alice, agent, world):
    """After an agent is deleted, its sessions' messages no longer come back from a query."""
    assert len(query_everything(api, alice)) == 6

    assert_success(api.delete(f"/api/v1/agents/{agent.pk}"))

    results = query_everything(api, alice)
    assert {r["type"] for r in results} == {"message", "knowledge"}
    assert [r["content"] for r in results if r["type"] == "message"] == ["Tomatoes need sun."]


def test_deleting_a_session_deletes_only_its_messages(api, alice, alice_session, world):
    """DELETE /sessions/{id} removes that session and its messages; the user's other session and knowledge stay."""
    before = counts()

    assert_success(api.delete(f"/api/v1/sessions/{alice_session.pk}"))

    assert counts() == {**before, "sessions": 2, "messages": 3}
    assert Message.objects.filter(user=alice).get().session_id == world["garden_session"].pk
    assert Knowledge.objects.filter(user=alice).count() == 2


def test_failed_delete_changes_nothing(api, world):
    """Deleting an unknown user, agent or session is a 404 that removes nothing."""
    before = counts()
    missing = "00000000-0000-4000-8000-000000000000"

    for collection in ["users", "agents", "sessions"]:
        assert api.delete(f"/api/v1/{collection}/{missing}").status_code == 404

    assert counts() == before
