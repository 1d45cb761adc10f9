"""Round trips with the official ``memfuse`` client (0.3.x) against a live server."""

from __future__ import annotations

import asyncio

import pytest
from memfuse import AsyncMemFuse, MemFuse
from memfuse.utils import MemFuseHTTPError

from memory.models import Agent, Knowledge, Message, Session, User

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_S = 30  # the live server embeds on a small shared machine


def test_sync_client_round_trip(live_server):
    """init, add, query, list, add_knowledge, re-init to the same ids, and a 404 as MemFuseHTTPError."""
    with MemFuse(base_url=live_server.url, timeout=TIMEOUT_S) as client:
        memory = client.init(user="alice", agent="test_agent", session="test_session")
        assert memory.user_id and memory.agent_id and memory.session_id
        assert Session.objects.get(pk=memory.session_id).name == "test_session"

        added = memory.add(
            [
                {"role": "user", "content": "My favourite colour is blue, like the sea in Nazaré."},
                {"role": "assistant", "content": "Noted: you love the colour blue."},
            ]
        )
        assert added["status"] == "success"
        message_ids = added["data"]["message_ids"]
        assert [Message.objects.get(pk=i).position for i in message_ids] == [0, 1]

        found = memory.query("What is my favourite colour?", top_k=1)["data"]
        assert found["total"] == 1
        assert found["results"][0]["id"] == message_ids[0]
        assert found["results"][0]["metadata"]["scope"] is None
        in_session = memory.query_session("favourite colour", top_k=2)["data"]["results"]
        assert {r["metadata"]["scope"] for r in in_session} == {"in_session"}

        listed = memory.list_messages(limit=10)["data"]["messages"]
        assert [m["id"] for m in listed] == message_ids[::-1]  # newest first
        # Not flushed yet (no worker runs in tests): both wait in the buffer.
        assert [m["id"] for m in memory.list_messages(limit=10, buffer_only=True)["data"]["messages"]] == message_ids[::-1]
        assert memory.list_messages(limit=10, buffer_only=False)["data"]["messages"] == []

        knowledge = memory.add_knowledge(["Alice lives in Porto."])
        [knowledge_id] = knowledge["data"]["knowledge_ids"]
        assert Knowledge.objects.get(pk=knowledge_id).user_id == User.objects.get(name="alice").pk

        again = client.init(user="alice", agent="test_agent", session="test_session")
        assert (again.user_id, again.agent_id, again.session_id) == (memory.user_id, memory.agent_id, memory.session_id)
        assert (User.objects.count(), Agent.objects.count(), Session.objects.count()) == (1, 1, 1)

        with pytest.raises(MemFuseHTTPError) as raised:
            client.users.get_sync("no-such-id")
        assert raised.value.status_code == 404
        assert raised.value.response_data["status"] == "error"
        assert raised.value.response_data["errors"][0]["field"] == "user_id"


def test_sync_client_init_without_session_name_creates_one(live_server):
    """init without a session name gets a new session with a generated name each time."""
    with MemFuse(base_url=live_server.url, timeout=TIMEOUT_S) as client:
        first = client.init(user="bob")
        second = client.init(user="bob")

    assert first.session != second.session
    assert first.session_id != second.session_id
    assert first.user_id == second.user_id
    assert Agent.objects.get().name == "agent_default"


def test_async_client_init_add_query(live_server):
    """The AsyncMemFuse client can init, add and find a message."""

    async def scenario() -> tuple[str, dict]:
        async with AsyncMemFuse(base_url=live_server.url, timeout=TIMEOUT_S) as client:
            memory = await client.init(user="carol", agent="async_agent", session="async_session")
            added = await memory.add(
                [
                    {"role": "user", "content": "I keep a pet tortoise called Shelly."},
                    {"role": "user", "content": "Tomorrow I fly to Oslo for work."},
                ]
            )
            found = await memory.query("What pet do I have?", top_k=1)
            return added["data"]["message_ids"][0], found["data"]

    tortoise_id, found = asyncio.run(scenario())

    assert found["total"] == 1
    assert found["results"][0]["id"] == tortoise_id
    assert Message.objects.filter(session__name="async_session").count() == 2
