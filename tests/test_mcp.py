"""The MCP server, through the official ``mcp`` client: over HTTP against a real uvicorn process
(``/mcp`` in the project's ASGI application), and over stdio (``manage.py mcp_stdio``).

One server for the module, started as the README and docs/api.md say; test data is committed
(``transaction=True``) so that the server's process sees it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import httpx2
import pytest
from django.conf import settings
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from benchmarks.server import ServerProcess
from memory.models import KeyScope, Message, Session, User
from memory.services.api_keys import api_key_create
from memory.services.messages import MessageIn, messages_add
from tests.subprocesses import subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

TOOLS = {"memory_add", "memory_query", "memory_list", "memory_delete", "knowledge_add"}
# The README and docs/api.md give the client configurations these tests start the server with.
DOCS = "\n".join((Path(settings.BASE_DIR) / name).read_text() for name in ("README.md", "docs/api.md"))
PUPPY = {"role": "user", "content": "I adopted a golden retriever puppy named Biscuit."}


@pytest.fixture(scope="module")
def server(django_db_setup, tmp_path_factory):
    """The production server (uvicorn) on the test database, for the whole module."""
    env = subprocess_env(API_RATE_LIMIT="100000/minute")
    process = ServerProcess(log_path=tmp_path_factory.mktemp("mcp") / "server.log", env=env, kind="uvicorn")
    process.start()
    yield process
    process.stop()


def readme_http_url(base_url: str) -> tuple[str, dict]:
    """The README's ``claude mcp add --transport http`` line, pointed at ``base_url``: (url, headers)."""
    match = re.search(r'claude mcp add --transport http memfuse (\S+) --header "([^:]+): ([^"]+)"', DOCS)
    assert match, "the README's Claude Code line"
    url, header, value = match.groups()
    assert url == "http://127.0.0.1:8000/mcp"
    return base_url + url.removeprefix("http://127.0.0.1:8000"), {header: value}


def http_client(base_url: str, key: str | None):
    url, headers = readme_http_url(base_url)
    headers = {name: value.replace("<your key>", key) for name, value in headers.items()} if key else {}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))


def call(base_url: str, key: str, tool: str, arguments: dict):
    """One tool call over HTTP (a client of its own: each call is a whole MCP exchange)."""

    async def run():
        async with http_client(base_url, key) as client:
            return await client.call_tool(tool, arguments)

    return asyncio.run(run())


def ok(result) -> dict:
    assert not result.is_error, result.content[0].text
    assert result.content[0].type == "text" and result.content[0].text
    return result.structured_content


def refused(result, argument: str) -> str:
    assert result.is_error, result.structured_content
    text = result.content[0].text
    assert argument in text, text
    assert "Traceback" not in text
    return text


def rest_query(base_url: str, key: str, user_id: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{base_url}/api/v1/users/{user_id}/query",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]["results"]


@pytest.fixture
def user_key(alice) -> str:
    """A user key of acme's alice."""
    return api_key_create(scope=KeyScope.USER, user=alice, name="alice's key")[1]


BUILD_THE_SERVER = """
import logging, os, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()
from memory.mcp import tools
root = logging.getLogger()
before = list(root.handlers)
print("built at import:", tools._server is not None)
tools.mcp_server()
print("root handlers kept:", root.handlers == before)
logging.getLogger("memory.mcp").warning("one line")
"""


def test_the_server_is_built_on_first_use_and_leaves_the_logging_alone():
    """Importing the tools builds no MCP server; building it (the first /mcp request, mcp_stdio)
    keeps the root logger's handlers, so a project log line prints once."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_THE_SERVER], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["built at import: False", "root handlers kept: True"]
    assert result.stderr.count("one line") == 1, result.stderr


# --- HTTP --------------------------------------------------------------------------------------


def test_the_tools_are_listed_with_their_argument_schemas(server, tenant_key):
    """tools/list names the five tools; memory_query documents since and until in its JSON Schema."""

    async def run():
        async with http_client(server.url, tenant_key) as client:
            return (await client.list_tools()).tools

    tools = {tool.name: tool for tool in asyncio.run(run())}

    assert set(tools) == TOOLS
    properties = tools["memory_query"].input_schema["properties"]
    assert {"query", "user", "top_k", "session_id", "since", "until"} <= set(properties)
    assert "UTC offset" in properties["since"]["description"]
    assert tools["memory_add"].input_schema["required"] == ["messages"]
    assert all(tool.description for tool in tools.values())


def test_add_then_query_reads_its_writes_before_a_flush(server, tenant_key):
    """memory_add by names creates alice, agent and session; memory_query finds the turn at once,
    unflushed, with the REST query's fields and ranking."""
    added = ok(call(server.url, tenant_key, "memory_add", {"user": "alice", "messages": [PUPPY]}))
    assert len(added["message_ids"]) == 1
    session = Session.objects.select_related("user", "agent").get(pk=added["session_id"])
    assert (session.user.name, session.agent.name, session.name) == ("alice", "mcp", "mcp")

    result = call(server.url, tenant_key, "memory_query", {"user": "alice", "query": "What is my dog called?"})
    found = ok(result)

    assert found["total"] == 1
    [hit] = found["results"]
    assert hit["id"] == added["message_ids"][0] and hit["metadata"]["flushed"] is False
    assert "Biscuit" in result.content[0].text
    rest = rest_query(server.url, tenant_key, added["user_id"], {"query": "What is my dog called?"})
    assert [r["id"] for r in rest] == [hit["id"]]
    assert set(rest[0]) == set(hit) and set(rest[0]["metadata"]) == set(hit["metadata"])

    again = ok(call(server.url, tenant_key, "memory_add", {"session_id": added["session_id"], "messages": [PUPPY]}))
    assert again["session_id"] == added["session_id"]
    listed = ok(call(server.url, tenant_key, "memory_list", {"session_id": added["session_id"], "limit": 1}))
    assert [m["id"] for m in listed["messages"]] == added["message_ids"] and listed["next_offset"] == 1


def test_memory_query_takes_a_time_window(server, tenant_key, alice, alice_session):
    """since/until keep the window's messages only; a naive bound is a tool error naming it."""
    old, new = messages_add(
        session=alice_session,
        messages=[
            MessageIn(role="user", content="I planned a trip to Lisbon.", created_at=_at("2026-03-01T09:00:00+00:00")),
            MessageIn(role="user", content="I planned a trip to Porto.", created_at=_at("2026-03-08T09:00:00+00:00")),
        ],
    )
    window = {"user": str(alice.pk), "query": "which trip did I plan?", "until": "2026-03-01T10:00:00+01:00"}

    assert [r["id"] for r in ok(call(server.url, tenant_key, "memory_query", window))["results"]] == [str(old.pk)]
    assert ok(call(server.url, tenant_key, "memory_query", {**window, "until": "2025-01-01T00:00:00Z"}))["total"] == 0
    refused(call(server.url, tenant_key, "memory_query", {**window, "since": "2026-03-01T00:00:00"}), "since")


def test_memory_query_takes_the_rest_querys_retrieval_overrides(server, tenant_key, alice, alice_messages):
    """retrieval.vector_weight = 0 ranks by BM25 alone, as in REST; a bad override is a tool error
    naming retrieval.<field>, as REST's 400 names it."""
    query = {"user": str(alice.pk), "query": "Biscuit puppy", "top_k": 3}
    bm25_only = ok(call(server.url, tenant_key, "memory_query", {**query, "retrieval": {"vector_weight": 0}}))["results"]
    default = ok(call(server.url, tenant_key, "memory_query", query))["results"]

    assert bm25_only and all(set(r["metadata"]["retrievers"]) == {"bm25"} for r in bm25_only)
    assert any("vector" in r["metadata"]["retrievers"] for r in default)
    for bad, field in (({"colour": 1}, "retrieval.colour"), ({"rrf_k": 0}, "retrieval.rrf_k")):
        refused(call(server.url, tenant_key, "memory_query", {**query, "retrieval": bad}), field)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_another_tenant_sees_nothing(server, other_tenant_key, alice, alice_session, alice_messages):
    """With globex's key, acme's alice, session and messages do not exist, and nothing is written to them."""
    session_id = str(alice_session.pk)

    refused(call(server.url, other_tenant_key, "memory_query", {"user": str(alice.pk), "query": "puppy"}), "user")
    refused(call(server.url, other_tenant_key, "memory_list", {"session_id": session_id}), "session_id")
    refused(call(server.url, other_tenant_key, "memory_add", {"session_id": session_id, "messages": [PUPPY]}), "session_id")
    refused(call(server.url, other_tenant_key, "memory_delete", {"what": "session", "session_id": session_id}), "session_id")
    # By name, globex's "alice" is not acme's: unknown to globex (a query creates no user).
    refused(call(server.url, other_tenant_key, "memory_query", {"user": "alice", "query": "puppy"}), "user")
    assert Message.objects.filter(session=alice_session).count() == 3
    assert Session.objects.filter(pk=alice_session.pk).exists()


def test_a_user_key_cannot_reach_another_user(server, user_key, alice, agent, bob, bob_session, bob_messages):
    """Alice's key works on alice without naming her (with an existing agent: as in REST, a user key
    creates none); bob, by name, id or session, does not exist for it."""
    refused(call(server.url, user_key, "memory_add", {"agent": "new-agent", "messages": [PUPPY]}), "agent")
    added = ok(call(server.url, user_key, "memory_add", {"agent": agent.name, "messages": [PUPPY]}))
    assert added["user_id"] == str(alice.pk) and added["agent_id"] == str(agent.pk)
    assert ok(call(server.url, user_key, "memory_query", {"query": "puppy"}))["total"] == 1

    for user in ("bob", str(bob.pk)):
        refused(call(server.url, user_key, "memory_query", {"user": user, "query": "beagle"}), "user")
        refused(call(server.url, user_key, "memory_add", {"user": user, "messages": [PUPPY]}), "user")
    refused(call(server.url, user_key, "memory_list", {"session_id": str(bob_session.pk)}), "session_id")
    refused(call(server.url, user_key, "memory_delete", {"what": "user", "user": "bob"}), "user")
    assert Message.objects.filter(session=bob_session).count() == 2
    assert not User.objects.filter(name="bob").exclude(pk=bob.pk).exists()


def test_bad_arguments_are_tool_errors_and_write_nothing(server, tenant_key):
    """A bad turn in a batch (by the schema, or by the REST rules), a bad top_k, a missing user:
    tool errors naming the argument; no user, session or message was created."""
    # Valid for the JSON Schema, refused by the REST API's rules (a speaker is a string).
    bad_speaker = {"role": "user", "content": "later", "metadata": {"speaker": 5}}

    refused(call(server.url, tenant_key, "memory_add", {"user": "carol", "messages": [PUPPY, {"role": "robot", "content": "x"}]}), "role")
    text = refused(call(server.url, tenant_key, "memory_add", {"user": "carol", "messages": [PUPPY, bad_speaker]}), "messages[1].metadata.speaker")
    assert "Invalid input" in text
    refused(call(server.url, tenant_key, "memory_add", {"messages": [PUPPY]}), "user")
    refused(call(server.url, tenant_key, "memory_query", {"user": "carol", "query": "x", "top_k": 0}), "top_k")
    refused(call(server.url, tenant_key, "knowledge_add", {"user": "carol", "knowledge": []}), "knowledge")
    refused(call(server.url, tenant_key, "memory_delete", {"what": "messages", "session_id": "not-an-id"}), "session_id")

    assert not User.objects.exists() and not Session.objects.exists() and not Message.objects.exists()


def test_no_key_or_a_wrong_key_is_refused_at_the_transport(server, tenant_key):
    """Without a key, or with one that does not resolve: 401 in the API's envelope, before any MCP exchange."""
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    for headers in ({}, {"Authorization": "Bearer abcdefgh.wrong"}, {"Authorization": f"Bearer {tenant_key}x"}):
        request = urllib.request.Request(
            f"{server.url}/mcp",
            data=initialize,
            headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
        )
        with pytest.raises(urllib.error.HTTPError) as refused_request:
            urllib.request.urlopen(request, timeout=30)
        assert refused_request.value.code == 401
        assert refused_request.value.headers["WWW-Authenticate"] == 'Bearer realm="mcp"'
        assert json.loads(refused_request.value.read())["code"] == 401

    async def run():
        async with http_client(server.url, None) as client:
            await client.list_tools()

    # The official client, refused at its first request, reports the HTTP error as an MCPError.
    with pytest.raises(BaseException) as failure:
        asyncio.run(run())
    assert "Server returned an error response" in _messages(failure.value)


def _messages(exc: BaseException) -> str:
    """The text of ``exc`` and of everything it groups or was caused by (the client raises task groups)."""
    parts = [str(exc)]
    for inner in [*getattr(exc, "exceptions", ()), exc.__cause__]:
        if inner is not None:
            parts.append(_messages(inner))
    return " | ".join(parts)


def test_knowledge_add_and_the_three_deletes(server, tenant_key):
    """knowledge_add stores facts found by memory_query; memory_delete forgets messages, then a
    session, then a user with all their memory."""
    stored = ok(call(server.url, tenant_key, "knowledge_add", {"user": "dora", "knowledge": ["Dora is allergic to peanuts."]}))
    found = ok(call(server.url, tenant_key, "memory_query", {"user": "dora", "query": "allergies"}))
    assert [(r["id"], r["type"]) for r in found["results"]] == [(stored["knowledge_ids"][0], "knowledge")]

    added = ok(call(server.url, tenant_key, "memory_add", {"user": "dora", "messages": [PUPPY, PUPPY]}))
    session_id, (first, second) = added["session_id"], added["message_ids"]
    gone = ok(call(server.url, tenant_key, "memory_delete", {"what": "messages", "session_id": session_id, "message_ids": [first]}))
    assert gone == {"deleted": "messages", "ids": [first]}
    assert list(Message.objects.filter(session_id=session_id).values_list("id", flat=True)) == [uuid.UUID(second)]
    ok(call(server.url, tenant_key, "memory_delete", {"what": "session", "session_id": session_id}))
    assert not Session.objects.filter(pk=session_id).exists()

    deleted = ok(call(server.url, tenant_key, "memory_delete", {"what": "user", "user": "dora"}))
    assert deleted == {"deleted": "user", "ids": [stored["user_id"]]}
    assert not User.objects.filter(pk=stored["user_id"]).exists()


def test_the_server_process_loaded_its_models_once(server, tenant_key):
    """After REST and MCP traffic, the server's log shows no model of its own and one query process:
    the MCP tools use the REST API's registry."""
    ok(call(server.url, tenant_key, "memory_add", {"user": "erin", "messages": [PUPPY]}))
    ok(call(server.url, tenant_key, "memory_query", {"user": "erin", "query": "puppy"}))

    log = server.log_path.read_text(errors="replace")
    assert log.count("embedding model loaded") == 0
    assert len(re.findall(r"query embedding process \d+ ready", log)) == 1
    assert len(re.findall(r"background embedding process \d+ ready", log)) <= 1


def test_runserver_serves_mcp_too(runserver, tenant_key):
    """runserver (daphne, no ASGI lifespan) serves /mcp from the same application: add, then query."""
    added = ok(call(runserver.url, tenant_key, "memory_add", {"user": "alice", "messages": [PUPPY]}))
    found = ok(call(runserver.url, tenant_key, "memory_query", {"user": "alice", "query": "puppy"}))
    assert [r["id"] for r in found["results"]] == added["message_ids"]


# --- stdio -------------------------------------------------------------------------------------


def readme_stdio_server(key: str) -> StdioServerParameters:
    """The documented Claude Desktop entry (docs/api.md), with this checkout's interpreter and paths."""
    match = re.search(r"```json\n(\{\n  \"mcpServers\".*?)\n```", DOCS, re.S)
    assert match, "the claude_desktop_config.json of docs/api.md"
    entry = json.loads(match.group(1))["mcpServers"]["memfuse"]
    assert entry["command"] == "/path/to/memfuse/.venv/bin/python"
    checkout = str(settings.BASE_DIR)
    args = [arg.replace("/path/to/memfuse", checkout) for arg in entry["args"]]
    env = {name: value.replace("<your key>", key) for name, value in entry["env"].items()}
    database = subprocess_env()
    # As docs/api.md says for a server that does not use the embedded database.
    env.update(DATABASE_URL=database["DATABASE_URL"], SECRET_KEY=database["SECRET_KEY"])
    inspector = re.search(r"npx @modelcontextprotocol/inspector -e MEMFUSE_API_KEY=<your key> (\S+) (.+?)`", DOCS)
    assert inspector and [inspector.group(1), *inspector.group(2).split()] == [entry["command"], *entry["args"]]
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd="/")


def test_stdio_serves_the_same_tools_with_the_commands_key(user_key, alice, agent):
    """mcp_stdio started as the documented Claude Desktop entry: the five tools, add then query,
    scoped to the key (a user key's own user, another user refused)."""

    async def run():
        async with Client(readme_stdio_server(user_key)) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            added = await client.call_tool("memory_add", {"agent": agent.name, "messages": [PUPPY]})
            found = await client.call_tool("memory_query", {"query": "What is my dog called?"})
            other = await client.call_tool("memory_query", {"user": "bob", "query": "x"})
            return names, added, found, other

    names, added, found, other = asyncio.run(run())

    assert names == TOOLS
    assert ok(added)["user_id"] == str(alice.pk)
    assert [r["id"] for r in ok(found)["results"]] == ok(added)["message_ids"]
    refused(other, "user")


def test_stdio_refuses_to_start_without_a_usable_key(tmp_path):
    """mcp_stdio with a wrong key exits with an error naming the problem, before serving."""
    env = subprocess_env(MEMFUSE_API_KEY="abcdefgh.wrong")
    done = subprocess.run(
        [sys.executable, "manage.py", "mcp_stdio"], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "Invalid, expired or revoked API key" in done.stderr
    assert done.stdout == ""


def test_stdio_reads_its_key_from_a_key_file(user_key, alice, agent, tmp_path):
    """mcp_stdio --key-file PATH (no MEMFUSE_API_KEY, nothing in its command line but the path) acts with the file's key."""
    key_file = tmp_path / "key"
    key_file.write_text(user_key + "\n")
    key_file.chmod(0o600)
    documented = readme_stdio_server(user_key)
    env = {name: value for name, value in documented.env.items() if name != "MEMFUSE_API_KEY"}
    parameters = StdioServerParameters(command=documented.command, args=[*documented.args, "--key-file", str(key_file)], env=env, cwd="/")

    async def run():
        async with Client(parameters) as client:
            return await client.call_tool("memory_add", {"agent": agent.name, "messages": [PUPPY]})

    assert user_key not in " ".join(parameters.args)
    assert ok(asyncio.run(run()))["user_id"] == str(alice.pk)


@pytest.mark.parametrize(
    "args, file_text, message",
    [
        ([], None, "An API key is required: MEMFUSE_API_KEY, --key-file PATH or --key"),
        (["--key-file", "{missing}"], None, "--key-file: cannot read"),
        (["--key-file", "{file}"], "\n", "is empty"),
        (["--key-file", "{file}", "--key", "abcdefgh.x"], "abcdefgh.x", "not allowed with argument"),
    ],
    ids=["no-key", "missing-file", "empty-file", "two-sources"],
)
def test_stdio_names_what_is_wrong_with_its_key_source(monkeypatch, tmp_path, args, file_text, message):
    """No key anywhere, an unreadable or empty key file, or two sources at once: a command error naming it, before serving."""
    from django.core.management import CommandError, call_command

    monkeypatch.delenv("MEMFUSE_API_KEY", raising=False)
    key_file = tmp_path / "key"
    if file_text is not None:
        key_file.write_text(file_text)
    paths = {"missing": tmp_path / "nowhere", "file": key_file}
    with pytest.raises(CommandError, match=message):
        call_command("mcp_stdio", *[arg.format(**paths) for arg in args])


# --- the benchmark ---------------------------------------------------------------------------


def test_interfaces_bench_reports_every_mode(runserver, capsys):
    """interfaces_bench against a running server: a figure for each mode, both differences, its data deleted."""
    from django.core.management import call_command

    call_command("interfaces_bench", "--url", runserver.url, "--messages", "20", "--calls", "2", "--warmup", "0")

    report = json.loads(capsys.readouterr().out)
    for mode in ("rest_query", "mcp_query", "rest_query_bounded", "rest_add", "mcp_add"):
        assert report[mode]["p50_ms"] > 0 and report[mode]["server_cpu_ms_per_call"] is None  # --url: not our process
    assert set(report["mcp_over_rest"]) == {"query", "add"} and "p50_ms" in report["bounded_over_unbounded"]
    assert report["setup"]["messages"] == 20
    assert not User.objects.exists()
