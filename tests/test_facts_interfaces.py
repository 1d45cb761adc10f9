"""The ``layers`` option of the WebSocket query and of the MCP ``memory_query`` tool, with the
facts layer on (``tests.llm_server``): facts come tagged ``"layer": "m1"`` with their sources."""

from __future__ import annotations

import types

import pytest
from channels.db import database_sync_to_async

from memory.facts import worker
from memory.indexing.flush import flush_pending
from memory.mcp import tools
from memory.tenancy import Principal
from tests.test_facts import llm_on, llm_server, say  # noqa: F401  (fixtures)
from tests.test_websocket import application, connect, receive, return_connections_to_the_pool  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

CAT = "I adopted a grey cat called Miso yesterday afternoon."


def _extracted(alice, alice_session) -> str:
    [row] = say(alice_session, CAT)
    flush_pending(user_id=alice.pk)
    assert worker.run_once() == 1
    return str(row.pk)


async def test_websocket_query_returns_facts_in_the_final_stage(llm_on, connect, alice, alice_session):  # noqa: F811
    """The partial frame is M0's; the final one has the fact, tagged m1, with its source;
    layers ["m0"] leaves facts out."""
    source = await database_sync_to_async(_extracted)(alice, alice_session)
    communicator = await connect(alice_session.pk)
    await communicator.send_json_to({"type": "memory.query", "query": "grey cat Miso", "request_id": 1})
    partial, final = await receive(communicator), await receive(communicator)
    assert {r["layer"] for r in partial["results"]} == {"m0"}
    fact = next(r for r in final["results"] if r["layer"] == "m1")
    assert fact["metadata"]["source_message_ids"] == [source]
    await communicator.send_json_to(
        {"type": "memory.query", "query": "grey cat Miso", "layers": ["m0"], "request_id": 2}
    )
    await receive(communicator)
    final = await receive(communicator)
    assert {r["layer"] for r in final["results"]} == {"m0"}


async def test_mcp_query_takes_layers(llm_on, monkeypatch, tenant, tenant_key, alice, alice_session):  # noqa: F811
    """memory_query with layers ["m1"] returns only facts; ["m0"] only messages."""
    source = await database_sync_to_async(_extracted)(alice, alice_session)
    principal = Principal(key_id=tenant_key.split(".")[0], scope="tenant", tenant_id=tenant.pk)
    monkeypatch.setattr(tools, "_stdio_principal", principal)
    ctx = types.SimpleNamespace(request_context=types.SimpleNamespace(request=None))  # stdio: no HTTP request
    facts = await tools.memory_query(query="grey cat Miso", ctx=ctx, user="alice", layers=["m1"])
    results = facts.structured_content["results"]
    assert results and {r["layer"] for r in results} == {"m1"}
    assert results[0]["metadata"]["source_message_ids"] == [source]
    messages = await tools.memory_query(query="grey cat Miso", ctx=ctx, user="alice", layers=["m0"])
    assert {r["layer"] for r in messages.structured_content["results"]} == {"m0"}
