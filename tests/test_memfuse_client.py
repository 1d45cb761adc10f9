"""Round trips with the official ``memfuse`` client (0.3.x) against a live server."""

from __future__ import annotations

import asyncio

import pytest
from memfuse import AsyncMemFuse, MemFuse
from memfuse.utils import MemFuseHTTPError

from memory.models import Agent, Knowledge, Message, Session, User

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_S = 30  # the live server embeds on a small shared machine


def test_sync_client_round_trip(live_server, tenant_key, tenant):
    """init, add, query, list, add_knowledge, re-init to the same ids, and a 404 as MemFuseHTTPError."""
    with MemFuse(base_url=live_server.url, api_key=tenant_key, timeout=TIMEOUT_S) as client:
        memory = client.init(user="alice", agent="test_agent", session="test_session")
        assert User.objects.get(pk=memory.user_id).tenant_id == tenant.pk
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


def test_sync_client_init_without_session_name_creates_one(live_server, tenant_key):
    """init without a session name gets a new session with a generated name each time."""
    with MemFuse(base_url=live_server.url, api_key=tenant_key, timeout=TIMEOUT_S) as client:
        first = client.init(user="bob")
        second = client.init(user="bob")

    assert first.session != second.session
    assert first.session_id != second.session_id
    assert first.user_id == second.user_id
    assert Agent.objects.get().name == "agent_default"


def test_async_client_init_add_query(live_server, tenant_key):
    """The AsyncMemFuse client can init, add and find a message."""

    async def scenario() -> tuple[str, dict]:
        async with AsyncMemFuse(base_url=live_server.url, api_key=tenant_key, timeout=TIMEOUT_S) as client:
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


def test_client_manages_user_keys_and_a_user_key_works(live_server, tenant_key):
    """api_keys create/list/delete through the client; the created key works until it is revoked."""
    with MemFuse(base_url=live_server.url, api_key=tenant_key, timeout=TIMEOUT_S) as client:
        memory = client.init(user="dora", agent="keys_agent", session="keys_session")
        created = client.api_keys.create_sync(memory.user_id, name="dora's phone")["data"]["api_key"]
        listed = client.api_keys.list_sync(memory.user_id)["data"]["api_keys"]
        assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]

    with MemFuse(base_url=live_server.url, api_key=created["key"], timeout=TIMEOUT_S) as as_dora:
        assert as_dora.users.get_sync(memory.user_id)["data"]["user"]["name"] == "dora"
        client_of_tenant = MemFuse(base_url=live_server.url, api_key=tenant_key, timeout=TIMEOUT_S)
        try:
            client_of_tenant.api_keys.delete_sync(memory.user_id, created["id"])
        finally:
            client_of_tenant.close()
        with pytest.raises(MemFuseHTTPError) as raised:
            as_dora.users.get_sync(memory.user_id)
        assert raised.value.status_code == 401


def test_client_without_a_key_gets_401(live_server, db):
    """The client without a key gets a 401 error envelope on anything but health."""
    with MemFuse(base_url=live_server.url, timeout=TIMEOUT_S) as client:
        with pytest.raises(MemFuseHTTPError) as raised:
            client.users.list_sync()
    assert raised.value.status_code == 401
    assert raised.value.response_data["status"] == "error"
