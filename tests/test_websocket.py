"""The session WebSocket (``ws/v1/sessions/<id>/``): frames both ways, bad frames, the Redis layer.

Through the whole ASGI application (origin check, auth middleware, router) against real
PostgreSQL. The consumer works in other threads, so test data must be committed
(``transaction=True``).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from concurrent.futures import Future
from datetime import timedelta

import channels.testing.application
import pytest
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.db import close_old_connections
from django.utils import timezone

from buffers import events
from memory.api import consumers
from memory.indexing.flush import flush_pending
from memory.inference import EmbeddingProcessError, registry
from memory.models import ApiKey, KeyScope, Message
from memory.services.api_keys import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = [(b"origin", b"http://127.0.0.1")]  # AllowedHostsOriginValidator refuses a missing origin
TIMEOUT = 10  # s: generous, the final stage of a query runs the embedding model
REDIS_URL = "redis://127.0.0.1:6379"
VALID_MESSAGE = {"role": "user", "content": "I adopted a golden retriever puppy named Biscuit."}


@pytest.fixture(scope="session")
def application(django_db_setup, django_db_blocker):
    """The project's ASGI application, imported once the test database exists (it loads the model)."""
    with django_db_blocker.unblock():
        from memfuse_project.asgi import application
    return application


@pytest.fixture(autouse=True)
def return_connections_to_the_pool(monkeypatch):
    """The consumer's threads give back their pooled DB connections after each frame, as in serving.

    channels' test communicator makes ``close_old_connections`` a no-op (for ``TestCase``
    transactions); these tests commit, and connections kept by the consumer's threads would
    exhaust the pool and keep the test database busy at teardown.
    """
    monkeypatch.setattr(channels.testing.application, "no_op", close_old_connections)


@pytest.fixture
async def connect(application, tenant_key):
    """Opens accepted WebSockets to a session's URL (with acme's key unless given); closes them after the test.

    ``key=None`` sends no key; ``subprotocols`` are offered as a browser would.
    """
    opened: list[WebsocketCommunicator] = []

    async def open_socket(session_id, *, key: str | None = tenant_key, subprotocols=None) -> WebsocketCommunicator:
        headers = ORIGIN + ([(b"authorization", f"Bearer {key}".encode())] if key is not None else [])
        communicator = WebsocketCommunicator(
            application, f"/ws/v1/sessions/{session_id}/", headers=headers, subprotocols=subprotocols
        )
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        opened.append(communicator)
        return communicator

    yield open_socket
    for communicator in opened:
        if not communicator.future.done():
            await communicator.disconnect()


@pytest.fixture
async def redis_channel_layer(settings):
    """The default channel layer is Redis for this test, under a prefix no other run uses."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"memfuse-test-{uuid.uuid4().hex[:12]}"},
        }
    }
    channel_layers.backends = {}  # the cache of layer instances, built from the old setting
    layer = get_channel_layer()
    yield layer
    await layer.flush()  # deletes this prefix's keys and closes the pools
    channel_layers.backends = {}


async def receive(communicator: WebsocketCommunicator) -> dict:
    return await communicator.receive_json_from(timeout=TIMEOUT)


async def add(communicator: WebsocketCommunicator, messages: list[dict], request_id="add") -> dict:
    await communicator.send_json_to({"type": "messages.add", "messages": messages, "request_id": request_id})
    frame = await receive(communicator)
    assert frame["type"] == "messages.added", frame
    return frame


async def stored(session) -> list[Message]:
    return [m async for m in Message.objects.filter(session=session).order_by("position")]


# --- connection ----------------------------------------------------------------------------------


async def test_connect_joins_the_session_group_and_disconnect_leaves_it(connect, alice_session):
    """A real session's socket is accepted without a frame, in the session's group until it closes."""
    communicator = await connect(alice_session.pk)
    layer = get_channel_layer()
    group = events.session_group(alice_session.pk)

    assert await communicator.receive_nothing()
    assert len(layer.groups.get(group, {})) == 1

    await communicator.disconnect()
    assert layer.groups.get(group, {}) == {}


@pytest.mark.parametrize("session_id", [uuid.UUID(int=1), "not-a-uuid"], ids=["unknown-uuid", "not-a-uuid"])
async def test_unknown_session_gets_404_frame_then_close_4404(connect, session_id):
    """An unknown or malformed session id is answered with a 404 error frame naming session_id, then close 4404."""
    communicator = await connect(session_id)

    frame = await receive(communicator)

    assert frame["type"] == "error" and frame["request_id"] is None
    assert frame["error"]["code"] == 404
    assert str(session_id) in frame["error"]["message"]
    assert [e["field"] for e in frame["error"]["errors"]] == ["session_id"]
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_authorize_refusal_looks_like_an_unknown_session(connect, alice_session, monkeypatch, tenant):
    """authorize() gets the key's principal and the session; False is a 404 frame and close 4404, as for an unknown id."""
    calls = []

    def refuse(consumer, principal, session):
        calls.append((principal.tenant_id, session.pk))
        return False

    monkeypatch.setattr(consumers.SessionConsumer, "authorize", refuse)
    communicator = await connect(alice_session.pk)

    frame = await receive(communicator)

    assert frame["error"]["code"] == 404
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}
    assert calls == [(tenant.pk, alice_session.pk)]
    assert len(get_channel_layer().groups.get(events.session_group(alice_session.pk), {})) == 0


def _unusable_keys(tenant) -> dict[str, str | None]:
    """A missing, unknown, wrong-secret, expired and revoked key (committed rows)."""
    live, live_key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="live")
    expired, expired_key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="expired")
    ApiKey.objects.filter(pk=expired.pk).update(expiry_date=timezone.now() - timedelta(seconds=1))
    revoked, revoked_key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="revoked")
    api_key_revoke(api_key=revoked)
    prefix, secret = live_key.split(".")
    return {
        "none": None,
        "unknown": "nope1234.abcdefghijklmnopqrstuvwxyz012345",
        # Another first character (a fixed "x" would be the live key itself when its secret starts with one).
        "wrong-secret": f"{prefix}.{'y' if secret[0] == 'x' else 'x'}{secret[1:]}",
        "expired": expired_key,
        "revoked": revoked_key,
    }


@pytest.mark.parametrize("which", ["none", "unknown", "wrong-secret", "expired", "revoked"])
async def test_socket_without_a_usable_key_gets_401_then_close_4401(connect, alice_session, tenant, which):
    """No key, an unknown or wrong one, an expired or a revoked one: a 401 frame, close 4401, nothing joined."""
    key = (await database_sync_to_async(_unusable_keys)(tenant))[which]
    communicator = await connect(alice_session.pk, key=key)

    frame = await receive(communicator)

    assert frame["type"] == "error" and frame["error"]["code"] == 401
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    assert len(get_channel_layer().groups.get(events.session_group(alice_session.pk), {})) == 0


@pytest.mark.parametrize("ending", ["revoked", "expired"])
async def test_key_revoked_or_expired_while_open_ends_the_socket_at_the_next_frame(
    connect, alice_session, tenant, monkeypatch, ending
):
    """The key works, then is revoked (or reaches its expiry): the next frame gets 401 and close 4401, nothing stored."""
    api_key, key = await database_sync_to_async(api_key_create)(
        scope=KeyScope.TENANT, tenant=tenant, name="short-lived", expires_at=timezone.now() + timedelta(hours=1)
    )
    communicator = await connect(alice_session.pk, key=key)
    await add(communicator, [{"role": "user", "content": "before"}])

    if ending == "revoked":
        await database_sync_to_async(api_key_revoke)(api_key=api_key)
    else:
        later = timezone.now() + timedelta(hours=2)
        monkeypatch.setattr("memory.tenancy.timezone.now", lambda: later)
    await communicator.send_json_to({"type": "messages.add", "messages": [{"role": "user", "content": "after"}], "request_id": "x"})

    frame = await receive(communicator)
    assert frame["type"] == "error" and frame["error"]["code"] == 401 and frame["request_id"] == "x"
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    assert [m.content for m in await stored(alice_session)] == ["before"]


async def test_another_tenants_session_is_an_unknown_session(connect, alice_session, other_tenant_key):
    """Globex's key on acme's session: 404 and close 4404, exactly as for an id that does not exist."""
    communicator = await connect(alice_session.pk, key=other_tenant_key)

    frame = await receive(communicator)

    assert frame["error"]["code"] == 404
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_operator_key_sees_no_session(connect, alice_session):
    """An operator key belongs to no tenant: every session is unknown to it (404, close 4404)."""
    _, operator_key = await database_sync_to_async(api_key_create)(scope=KeyScope.OPERATOR, name="ops")
    communicator = await connect(alice_session.pk, key=operator_key)

    assert (await receive(communicator))["error"]["code"] == 404
    assert await communicator.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_user_key_reaches_its_users_session_only(connect, alice, alice_session, bob_session):
    """A user key of bob opens bob's session, and alice's is unknown to it."""
    _, bob_key = await database_sync_to_async(api_key_create)(
        scope=KeyScope.USER, user=bob_session.user, name="bob"
    )
    own = await connect(bob_session.pk, key=bob_key)
    assert await own.receive_nothing()

    other = await connect(alice_session.pk, key=bob_key)
    assert (await receive(other))["error"]["code"] == 404
    assert await other.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}


async def test_browser_key_as_subprotocol(application, alice_session, tenant_key):
    """A browser offers ["memfuse", "bearer.<key>"]: accepted with subprotocol memfuse (the key is never echoed)."""
    communicator = WebsocketCommunicator(
        application,
        f"/ws/v1/sessions/{alice_session.pk}/",
        headers=ORIGIN,
        subprotocols=["memfuse", f"bearer.{tenant_key}"],
    )
    connected, subprotocol = await communicator.connect(timeout=TIMEOUT)
    try:
        assert connected and subprotocol == "memfuse"
        frame = await add(communicator, [VALID_MESSAGE])
        assert len(frame["message_ids"]) == 1
    finally:
        await communicator.disconnect()


# --- messages.add --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["add-1", 0, "r" * 128], ids=["string", "zero", "128-chars"])
async def test_messages_add_acknowledges_with_request_id_and_stores_rows(connect, alice_session, request_id):
    """messages.add answers messages.added echoing request_id, with the ids of rows already stored."""
    communicator = await connect(alice_session.pk)
    batch = [VALID_MESSAGE, {"role": "assistant", "content": "Biscuit is a lovely name.", "name": "Max"}]

    frame = await add(communicator, batch, request_id=request_id)

    rows = await stored(alice_session)
    assert frame == {
        "type": "messages.added",
        "request_id": request_id,
        "message_ids": [str(r.pk) for r in rows],
        "pending_messages": 2,
        "oldest_pending_age_s": 0.0,  # none of the user's messages was pending before
    }
    assert [(r.role, r.content, r.position) for r in rows] == [
        ("user", VALID_MESSAGE["content"], 0),
        ("assistant", "Biscuit is a lovely name.", 1),
    ]
    assert rows[1].metadata == {"speaker": "Max"}
    assert all(r.flushed_at is None for r in rows)


# --- memory.query --------------------------------------------------------------------------------


async def test_memory_query_streams_partial_then_final_before_any_flush(connect, alice_session, bob_messages):
    """A query right after an add finds the pending message: a partial frame, then a final one, both echoing request_id."""
    communicator = await connect(alice_session.pk)
    added = await add(communicator, [VALID_MESSAGE, {"role": "user", "content": "My sister lives in Lisbon."}])
    biscuit_id = added["message_ids"][0]

    await communicator.send_json_to({"type": "memory.query", "query": "my golden retriever Biscuit", "top_k": 3, "request_id": 42})
    partial = await receive(communicator)
    final = await receive(communicator)

    assert (partial["type"], partial["stage"], partial["final"]) == ("memory.results", "partial", False)
    assert (final["type"], final["stage"], final["final"]) == ("memory.results", "final", True)
    bob_ids = {str(m.pk) for m in bob_messages}
    for frame in (partial, final):
        assert frame["request_id"] == 42
        assert frame["total"] == len(frame["results"]) <= 3
        assert not bob_ids & {r["id"] for r in frame["results"]}  # only alice's memory
        assert frame["results"][0]["id"] == biscuit_id
    top = final["results"][0]
    assert top["metadata"]["flushed"] is False
    assert top["metadata"]["scope"] == "in_session"
    assert set(top["metadata"]["retrievers"]) == {"bm25", "vector"}


async def test_each_query_sees_the_messages_added_since_the_last_one(connect, alice_session):
    """A query reads the user's current memory_version, so the BM25 cache never hides a later add."""
    communicator = await connect(alice_session.pk)
    await add(communicator, [VALID_MESSAGE])
    await communicator.send_json_to({"type": "memory.query", "query": "Lisbon architect"})
    for _stage in ("partial", "final"):
        await receive(communicator)

    lisbon_id = (await add(communicator, [{"role": "user", "content": "My sister is an architect in Lisbon."}]))["message_ids"][0]
    await communicator.send_json_to({"type": "memory.query", "query": "Lisbon architect"})
    partial = await receive(communicator)
    final = await receive(communicator)

    assert partial["results"][0]["id"] == lisbon_id
    assert final["results"][0]["id"] == lisbon_id


async def test_memory_query_applies_the_frames_retrieval_overrides(connect, alice_session):
    """retrieval.vector_weight = 0 in the frame: BM25 alone, so one final frame and no vector ranks."""
    communicator = await connect(alice_session.pk)
    await add(communicator, [VALID_MESSAGE])

    await communicator.send_json_to(
        {"type": "memory.query", "query": "golden retriever", "retrieval": {"vector_weight": 0}, "request_id": "o"}
    )
    final = await receive(communicator)

    assert (final["type"], final["stage"], final["request_id"]) == ("memory.results", "final", "o")
    assert final["results"] and all(set(r["metadata"]["retrievers"]) == {"bm25"} for r in final["results"])


async def test_partial_frame_leaves_before_the_query_is_embedded(connect, alice_session, monkeypatch):
    """The partial frame is sent while the final stage still waits for the model, which runs off the event loop."""
    released = threading.Event()
    released_in_time = []
    submit_query = registry.submit_query

    def submit_query_when_released(texts, **kwargs):
        if texts != ["Biscuit"]:  # the pending message's: the add started it
            return submit_query(texts, **kwargs)
        future = Future()

        def answer():
            released_in_time.append(released.wait(timeout=5))
            future.set_result(submit_query(texts, **kwargs).result())

        threading.Thread(target=answer, daemon=True).start()
        return future

    communicator = await connect(alice_session.pk)
    await add(communicator, [VALID_MESSAGE])  # its embedding for queries starts with the add
    monkeypatch.setattr(registry, "submit_query", submit_query_when_released)

    await communicator.send_json_to({"type": "memory.query", "query": "Biscuit", "request_id": "q"})
    partial = await receive(communicator)
    released.set()
    final = await receive(communicator)

    assert (partial["stage"], final["stage"]) == ("partial", "final")
    assert released_in_time == [True]  # the query's embedding waited for the release


# --- flush.completed -----------------------------------------------------------------------------


async def test_flush_completed_is_pushed_after_a_flush(connect, alice, alice_session):
    """When flush_pending writes the session's messages, the client gets flush.completed with their ids."""
    communicator = await connect(alice_session.pk)
    added = await add(communicator, [VALID_MESSAGE, {"role": "assistant", "content": "Congratulations!"}])

    assert await database_sync_to_async(flush_pending)(user_id=alice.pk) == 2
    frame = await receive(communicator)

    assert frame["type"] == "flush.completed"
    assert frame["session_id"] == str(alice_session.pk)
    assert sorted(frame["message_ids"]) == sorted(added["message_ids"])  # in no particular order


async def test_flush_completed_reaches_the_client_through_redis(redis_channel_layer, connect, alice, alice_session):
    """With the Redis channel layer, flush.completed from the flush's thread reaches the client through Redis."""
    assert isinstance(redis_channel_layer, RedisChannelLayer)
    communicator = await connect(alice_session.pk)
    added = await add(communicator, [VALID_MESSAGE])

    assert await database_sync_to_async(flush_pending)(user_id=alice.pk) == 1
    frame = await receive(communicator)

    assert frame["type"] == "flush.completed"
    assert frame["session_id"] == str(alice_session.pk)
    assert sorted(frame["message_ids"]) == sorted(added["message_ids"])  # in no particular order


# --- bad frames ----------------------------------------------------------------------------------

BAD_FRAMES = [
    # (id, frame: text, bytes or a JSON object, the field errors name, the request_id echoed)
    ("invalid-json", '{"type": "messages.add", "messages": [', None, None),
    ("empty-text", "", None, None),
    ("nested-too-deep", "[" * 100_000 + "]" * 100_000, None, None),
    ("binary", json.dumps({"type": "messages.add", "messages": [VALID_MESSAGE]}).encode(), None, None),
    ("not-an-object", json.dumps([{"type": "messages.add", "messages": [VALID_MESSAGE]}]), None, None),
    ("missing-type", {"messages": [VALID_MESSAGE], "request_id": "r-1"}, "type", "r-1"),
    ("unknown-type", {"type": "messages.delete", "request_id": 7}, "type", 7),
    ("server-event-type", {"type": "flush.completed", "session_id": "x", "message_ids": []}, "type", None),
    ("type-not-a-string", {"type": ["messages.add"], "messages": [VALID_MESSAGE]}, "type", None),
    ("request-id-too-long", {"type": "messages.add", "messages": [VALID_MESSAGE], "request_id": "r" * 129}, "request_id", None),
    ("request-id-float", {"type": "messages.add", "messages": [VALID_MESSAGE], "request_id": 1.5}, "request_id", None),
    ("request-id-bool", {"type": "messages.add", "messages": [VALID_MESSAGE], "request_id": True}, "request_id", None),
    ("request-id-object", {"type": "messages.add", "messages": [VALID_MESSAGE], "request_id": {"a": 1}}, "request_id", None),
    ("bad-role-late-in-batch", {"type": "messages.add", "messages": [VALID_MESSAGE, {"role": "robot", "content": "x"}], "request_id": "r-2"}, "messages[1].role", "r-2"),
    ("content-not-a-string", {"type": "messages.add", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    ("messages-missing", {"type": "messages.add", "request_id": "r-3"}, "messages", "r-3"),
    ("messages-empty", {"type": "messages.add", "messages": []}, "messages", None),
    ("messages-not-a-list", {"type": "messages.add", "messages": VALID_MESSAGE}, "messages", None),
    ("query-missing", {"type": "memory.query", "request_id": "q-1"}, "query", "q-1"),
    ("query-not-a-string", {"type": "memory.query", "query": ["dog"]}, "query", None),
    ("top-k-string", {"type": "memory.query", "query": "dog", "top_k": "5"}, "top_k", None),
    ("top-k-zero", {"type": "memory.query", "query": "dog", "top_k": 0}, "top_k", None),
    ("top-k-too-big", {"type": "memory.query", "query": "dog", "top_k": 101}, "top_k", None),
    ("agent-id-not-a-uuid", {"type": "memory.query", "query": "dog", "agent_id": "nope"}, "agent_id", None),
    ("retrieval-weight-out-of-range", {"type": "memory.query", "query": "dog", "retrieval": {"bm25_weight": -1}}, "retrieval.bm25_weight", None),
    ("retrieval-unknown-field", {"type": "memory.query", "query": "dog", "retrieval": {"bm25_context_turns": 3}}, "retrieval.bm25_context_turns", None),
    ("retrieval-not-an-object", {"type": "memory.query", "query": "dog", "retrieval": [1]}, "retrieval", None),
]


@pytest.mark.parametrize(("frame", "field", "request_id"), [case[1:] for case in BAD_FRAMES], ids=[case[0] for case in BAD_FRAMES])
async def test_bad_frame_gets_400_naming_the_problem_and_the_connection_stays_open(
    connect, alice_session, frame, field, request_id
):
    """A bad frame gets a 400 error frame naming the field, writes nothing, and the next valid frame is answered."""
    communicator = await connect(alice_session.pk)

    if isinstance(frame, bytes):
        await communicator.send_input({"type": "websocket.receive", "bytes": frame})
    elif isinstance(frame, str):  # send_to() refuses the empty text frame
        await communicator.send_input({"type": "websocket.receive", "text": frame})
    else:
        await communicator.send_json_to(frame)
    error = await receive(communicator)

    assert error["type"] == "error"
    assert error["request_id"] == request_id
    assert error["error"]["code"] == 400
    assert error["error"]["message"]
    assert field in [e["field"] for e in error["error"]["errors"]], error
    assert await stored(alice_session) == []

    ack = await add(communicator, [VALID_MESSAGE], request_id=1)
    assert ack["request_id"] == 1
    assert [str(m.pk) for m in await stored(alice_session)] == ack["message_ids"]


async def test_unexpected_error_gets_500_frame_and_the_connection_stays_open(connect, alice_session, monkeypatch, caplog):
    """A server error while handling a frame is logged and answered with a 500 error frame; later frames still work."""

    def broken_messages_add(**kwargs):
        raise RuntimeError("disk on fire")

    communicator = await connect(alice_session.pk)

    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="memory.api.consumers"):
        patch.setattr("memory.api.consumers.messages_add", broken_messages_add)
        await communicator.send_json_to({"type": "messages.add", "messages": [VALID_MESSAGE], "request_id": "boom"})
        error = await receive(communicator)

    assert error["request_id"] == "boom"
    assert error["error"]["code"] == 500
    assert "disk on fire" not in json.dumps(error)  # details go to the log, not to the client
    assert any(record.exc_info and "disk on fire" in str(record.exc_info[1]) for record in caplog.records)

    ack = await add(communicator, [VALID_MESSAGE], request_id="after")
    assert ack["request_id"] == "after"


async def test_query_embedding_process_failure_gets_503_frame_and_the_connection_stays_open(connect, alice_session, monkeypatch):
    """A query whose embedding process died is answered with a 503 error frame (the REST API's
    message); the next query, with the process back, is answered."""

    def dead_process(texts, **kwargs):
        future = Future()
        future.set_exception(EmbeddingProcessError("query embedding process died: EOFError()"))
        return future

    communicator = await connect(alice_session.pk)

    with monkeypatch.context() as patch:
        patch.setattr(registry, "submit_query", dead_process)
        await communicator.send_json_to({"type": "memory.query", "query": "hiking", "request_id": "lost"})
        frames = [await receive(communicator)]
        while frames[-1]["type"] != "error":
            frames.append(await receive(communicator))

    assert frames[-1]["request_id"] == "lost" and frames[-1]["error"]["code"] == 503
    assert "embedding" in frames[-1]["error"]["message"]
    await communicator.send_json_to({"type": "memory.query", "query": "hiking", "request_id": "again"})
    final = await receive(communicator)
    while not final.get("final"):
        final = await receive(communicator)
    assert final["request_id"] == "again"


async def test_a_client_that_left_before_its_answer_is_not_an_error(application, tenant_key, alice_session, caplog):
    """A send on a closed connection (uvicorn raises ClientDisconnected, an OSError) ends the frame quietly: no error logged, no exception out of the app."""
    import asyncio

    inputs: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        if message["type"] == "websocket.send":
            raise OSError("client disconnected")  # what uvicorn's send does once the client is gone
        sent.append(message)

    headers = ORIGIN + [(b"authorization", f"Bearer {tenant_key}".encode())]
    scope = {"type": "websocket", "path": f"/ws/v1/sessions/{alice_session.id}/", "headers": headers,
             "query_string": b"", "subprotocols": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    for message in ({"type": "websocket.connect"},
                    {"type": "websocket.receive", "text": json.dumps({"type": "memory.query", "query": "puppy"})},
                    {"type": "websocket.receive", "text": json.dumps({"type": "nonsense"})},
                    {"type": "websocket.disconnect", "code": 1001}):
        inputs.put_nowait(message)
    with caplog.at_level(logging.DEBUG, logger="memory.api.consumers"):
        await asyncio.wait_for(application(scope, inputs.get, send), TIMEOUT)
    assert sent[0]["type"] == "websocket.accept"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text
    assert caplog.text.count("left before its answer") == 2
