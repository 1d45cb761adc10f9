"""Hostile input on REST and on the WebSocket: always a 4xx in the one error shape, never a 5xx or a
stack trace, and nothing half-written.

Deep nesting, oversized bodies and frames, malformed JSON and UTF-8, NUL bytes and lone
surrogates, 2 MB contents, 5,000-message batches, SQL-looking text, absurd numbers and dates,
bogus keys and types. Every limit is a setting (``memory.api.limits``); the tests lower some
of them to stay small.
"""

# ruff: noqa: F811  (the WebSocket fixtures are imported from test_websocket, then used as arguments)
from __future__ import annotations

import json
import logging

import pytest
from channels.testing import HttpCommunicator

from memory.models import Message, User
from tests.envelopes import assert_error, assert_success
from tests.test_websocket import (  # noqa: F401  (fixtures)
    application,
    connect,
    receive,
    return_connections_to_the_pool,
    stored,
)


@pytest.fixture(autouse=True)
def no_error_logged(caplog):
    """No request of these tests may log an error or a traceback (a 4xx is not an error of ours)."""
    caplog.set_level(logging.WARNING)
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


def nested_metadata(levels: int) -> str:
    """A metadata object with ``levels`` objects inside it: ``{"a": {"a": ... {}}}``."""
    return '{"a": ' * levels + "{}" + "}" * levels


def add_body(metadata: str = "{}", content: str = '"hello"') -> str:
    return f'{{"messages": [{{"role": "user", "content": {content}, "metadata": {metadata}}}]}}'


def post_raw(api, url: str, body: str | bytes, content_type: str = "application/json"):
    return api.generic("POST", url, body.encode() if isinstance(body, str) else body, content_type=content_type)


def messages_url(session) -> str:
    return f"/api/v1/sessions/{session.pk}/messages"


def bearer(key: str) -> tuple[bytes, bytes]:
    """The ASGI header ``Authorization: Bearer <key>``."""
    return (b"authorization", f"Bearer {key}".encode())


# --- nesting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [5000, 900, 29], ids=["5000-deep", "900-deep", "one-past-the-limit"])
def test_metadata_nested_past_the_limit_is_a_400_naming_it(db, api, alice_session, levels):
    """metadata nested deeper than MAX_JSON_DEPTH (32 levels with the body) is a 400 naming the limit; nothing stored."""
    response = post_raw(api, messages_url(alice_session), add_body(nested_metadata(levels)))

    body = assert_error(response, 400, None if levels > 900 else "messages[0].metadata" + ".a" * 29)
    assert "MAX_JSON_DEPTH" in body["message"] and "32 levels" in body["message"]
    assert not Message.objects.filter(session=alice_session).exists()


def test_metadata_nested_up_to_the_limit_is_stored(db, api, alice_session):
    """A body nested exactly MAX_JSON_DEPTH levels deep is accepted and stored as sent."""
    data = assert_success(post_raw(api, messages_url(alice_session), add_body(nested_metadata(28))), 201)

    assert Message.objects.get(pk=data["message_ids"][0]).metadata == json.loads(nested_metadata(28))


def test_nested_arrays_anywhere_are_refused(db, api, alice):
    """Nesting is counted in arrays too, in any field (a query made of 900 nested lists)."""
    response = post_raw(api, f"/api/v1/users/{alice.pk}/query", '{"query": ' + "[" * 900 + "]" * 900 + "}")

    assert "MAX_JSON_DEPTH" in assert_error(response, 400, "query" + "[0]" * 31)["message"]


def test_the_depth_limit_is_a_setting(db, api, alice_session, settings):
    """MAX_JSON_DEPTH=4 refuses metadata with one object inside it (level 5)."""
    settings.MEMFUSE = {**settings.MEMFUSE, "MAX_JSON_DEPTH": 4}

    assert_success(post_raw(api, messages_url(alice_session), add_body(nested_metadata(0))), 201)
    assert "4 levels" in assert_error(post_raw(api, messages_url(alice_session), add_body(nested_metadata(1))), 400, "messages[0].metadata.a")["message"]


# --- size -----------------------------------------------------------------------------------------


def test_body_over_the_limit_is_a_413_before_it_is_parsed(db, api, alice_session, settings):
    """A body over MAX_REQUEST_BYTES is a 413 naming the setting, even when it is not valid JSON."""
    settings.MEMFUSE = {**settings.MEMFUSE, "MAX_REQUEST_BYTES": 1000}

    valid_but_large = add_body(content=json.dumps("x" * 1000))
    not_json_at_all = "{" * 1001

    for body in (valid_but_large, not_json_at_all):
        response = assert_error(post_raw(api, messages_url(alice_session), body), 413, None)
        assert "MAX_REQUEST_BYTES" in response["message"] and "1000 bytes" in response["message"]
    assert_success(post_raw(api, messages_url(alice_session), add_body(content=json.dumps("x" * 800))), 201)
    assert Message.objects.filter(session=alice_session).count() == 1


@pytest.mark.django_db(transaction=True)
async def test_asgi_refuses_an_oversized_body_by_its_content_length_without_reading_it(application, settings, tenant_key):
    """Under ASGI, a Content-Length over MAX_REQUEST_BYTES is answered 413 at once: the body is never read."""
    settings.MEMFUSE = {**settings.MEMFUSE, "MAX_REQUEST_BYTES": 1000}
    communicator = HttpCommunicator(
        application,
        "POST",
        "/api/v1/users",
        body=b"",
        headers=[(b"content-length", b"5000000"), (b"content-type", b"application/json"), bearer(tenant_key)],
    )

    response = await communicator.get_response(timeout=10)

    assert response["status"] == 413
    body = json.loads(response["body"])
    assert body["code"] == 413 and body["status"] == "error" and "MAX_REQUEST_BYTES" in body["message"]


@pytest.mark.django_db(transaction=True)
async def test_asgi_refuses_a_chunked_body_once_it_passes_the_limit(application, settings, tenant_key):
    """A body without Content-Length (chunked) is counted as it arrives: past MAX_REQUEST_BYTES, a 413."""
    settings.MEMFUSE = {**settings.MEMFUSE, "MAX_REQUEST_BYTES": 1000}
    communicator = HttpCommunicator(
        application, "POST", "/api/v1/users", headers=[(b"content-type", b"application/json"), bearer(tenant_key)]
    )
    await communicator.send_input({"type": "http.request", "body": b"{" * 600, "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b"{" * 600, "more_body": True})

    start = await communicator.receive_output(timeout=10)
    body = await communicator.receive_output(timeout=10)

    assert start["status"] == 413
    assert json.loads(body["body"])["code"] == 413


# --- no key, no body ----------------------------------------------------------------------------

HUGE = str(256 * 1024 * 1024).encode()  # a Content-Length no test ever sends


def refused_key(which: str, tenant) -> str | None:
    """A key the edge must refuse: none, an unknown one, an expired or a revoked one."""
    from datetime import timedelta

    from django.utils import timezone

    from memory.models import ApiKey, KeyScope
    from memory.services.api_keys import api_key_create, api_key_revoke

    if which == "none":
        return None
    if which == "unknown":
        return "nope1234.abcdefghijklmnopqrstuvwxyz012345"
    api_key, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name=which)
    if which == "expired":
        ApiKey.objects.filter(pk=api_key.pk).update(expiry_date=timezone.now() - timedelta(seconds=1))
    if which == "revoked":
        api_key_revoke(api_key=api_key)
    return key


async def answer_without_a_body(application, method: str, path: str, headers: list) -> tuple[dict, dict]:
    """``(response start, body)`` of a request whose body is never sent: an application that
    reads any of it waits for ever, and this times out."""
    from channels.testing import ApplicationCommunicator

    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "query_string": b"", "headers": headers}
    communicator = ApplicationCommunicator(application, scope)
    start = await communicator.receive_output(timeout=10)
    body = await communicator.receive_output(timeout=10)
    await communicator.wait(timeout=10)
    return start, body


NO_KEY_PATHS = [
    ("POST", "/api/v1/users/00000000-0000-4000-8000-000000000000/import", "api"),
    ("POST", "/api/v1/sessions/00000000-0000-4000-8000-000000000000/messages", "api"),
    ("PUT", "/api/v1/no-such-endpoint", "api"),
    ("POST", "/mcp", "mcp"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("which", ["none", "unknown", "expired", "revoked"])
@pytest.mark.parametrize("method, path, realm", NO_KEY_PATHS, ids=[path for _, path, _ in NO_KEY_PATHS])
async def test_asgi_answers_a_request_without_a_usable_key_401_before_reading_its_body(
    application, tenant, which, framing, method, path, realm
):
    """/api/ and /mcp without a usable key: 401 in the envelope (and close) while none of the body was sent, whatever its size or framing."""
    from asgiref.sync import sync_to_async

    key = await sync_to_async(refused_key)(which, tenant)
    headers = [(b"content-length", HUGE)] if framing == "content-length" else [(b"transfer-encoding", b"chunked")]
    headers += [(b"content-type", b"application/json")] + ([bearer(key)] if key else [])

    start, body = await answer_without_a_body(application, method, path, headers)

    assert start["status"] == 401
    response_headers = dict(start["headers"])
    assert response_headers[b"connection"] == b"close"
    assert response_headers[b"www-authenticate"] == f'Bearer realm="{realm}"'.encode()
    answer = json.loads(body["body"])
    assert answer["status"] == "error" and answer["code"] == 401 and answer["errors"][0]["field"] is None


@pytest.mark.django_db(transaction=True)
async def test_asgi_serves_health_and_the_schema_pages_without_a_key(application):
    """GET /api/v1/health and the schema and docs pages need no key at the edge (a stale one is ignored)."""
    for path in ("/api/v1/health", "/api/schema/", "/api/docs/", "/api/redoc/"):
        headers = [(b"host", b"127.0.0.1"), bearer("stale123.key")]
        response = await HttpCommunicator(application, "GET", path, headers=headers).get_response(timeout=30)
        assert response["status"] == 200, (path, response["body"][:300])


@pytest.fixture(scope="module")
def uvicorn_server(django_db_setup, tmp_path_factory):
    """The README's production server (uvicorn, httptools) on the test database, models not preloaded."""
    from benchmarks.server import ServerProcess
    from tests.subprocesses import subprocess_env

    env = subprocess_env(PRELOAD_MODELS="false", BACKGROUND_EMBEDDING="thread", QUERY_EMBEDDING="thread", FLUSH_IN_PROCESS="off")
    process = ServerProcess(log_path=tmp_path_factory.mktemp("edge") / "server.log", env=env, kind="uvicorn")
    process.start()
    yield process
    process.stop()


MAX_REQUEST_BYTES = 4 * 1024 * 1024  # the server's default
PUSH_AT_MOST = 64 * 1024 * 1024  # bytes: far past MAX_REQUEST_BYTES, far short of the Content-Length


def send_until_answered(url: str, head: bytes, *, push: bool, chunked: bool = False) -> tuple[int | None, int]:
    """Send ``head`` (request line and headers) to the server at ``url``, then, with ``push``, as
    much of a body as the connection takes, 64 KiB at a time (each a chunk of the chunked
    encoding when ``chunked``), until the answer comes.

    Returns ``(status, body bytes the connection took)``, the status ``None`` when no answer
    came within 20 s. The client's send buffer is small, so what the connection takes is what
    the server read, plus what the kernel buffers on both sides hold (a few hundred KiB).
    """
    import select
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect((address.hostname, address.port))
    sock.sendall(head)
    sock.setblocking(False)
    chunk = b"x" * 65536
    if chunked:
        chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    pending, taken, pushing = memoryview(b""), 0, push
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pushing else [], [], 0.2)
            if readable:
                sock.setblocking(True)
                sock.settimeout(5)
                answer = sock.recv(4096)
                return (int(answer.split(b" ", 2)[1]) if answer else None), taken
            if writable:
                pending = pending or memoryview(chunk)
                try:
                    sent = sock.send(pending)
                except BlockingIOError:
                    sent = 0
                except OSError:  # the server closed the connection: its answer is already here
                    sent, pushing = 0, False
                pending, taken = pending[sent:], taken + sent
                pushing = pushing and taken < PUSH_AT_MOST
        return None, taken
    finally:
        sock.close()


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("push", [False, True], ids=["no-body-sent", "body-pushed"])
@pytest.mark.parametrize(
    "request_line, framing, key",
    [
        ("POST /api/v1/users/00000000-0000-4000-8000-000000000000/import", "content-length", None),
        ("POST /api/v1/users/00000000-0000-4000-8000-000000000000/import", "content-length", "nope1234.abcdefghijklmnopqrstuvwxyz012345"),
        ("POST /api/v1/sessions/00000000-0000-4000-8000-000000000000/messages", "chunked", None),
        ("POST /mcp", "content-length", None),
    ],
    ids=["import-no-key", "import-unknown-key", "add-chunked-no-key", "mcp-no-key"],
)
def test_uvicorn_answers_401_to_a_request_without_a_valid_key_before_taking_its_body(
    uvicorn_server, request_line, framing, key, push
):
    """Over a real socket: 256 MiB announced (or chunked) without a valid key is a 401 with no body sent, or with at most the kernel's buffers of one taken."""
    framing_header = f"Content-Length: {HUGE.decode()}" if framing == "content-length" else "Transfer-Encoding: chunked"
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}{framing_header}\r\n\r\n"

    status, taken = send_until_answered(uvicorn_server.url, head.encode(), push=push, chunked=framing == "chunked")

    assert status == 401
    assert taken == 0 if not push else taken < MAX_REQUEST_BYTES // 4


IMPORT_LIMITS = {"MAX_REQUEST_BYTES": 1000, "MAX_IMPORT_BYTES": 10_000}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "key, into, limit",
    [
        ("tenant", "alice", "MAX_IMPORT_BYTES"),
        ("tenant", "unknown", "MAX_IMPORT_BYTES"),
        ("alice", "alice", "MAX_IMPORT_BYTES"),
        ("bob", "alice", "MAX_REQUEST_BYTES"),
        ("alice", "not-a-uuid", "MAX_REQUEST_BYTES"),
        ("operator", "alice", "MAX_REQUEST_BYTES"),
        ("globex", "alice", "MAX_IMPORT_BYTES"),
    ],
)
async def test_the_import_limit_is_only_for_a_key_that_may_import_into_that_user(
    application, settings, tenant_key, other_tenant_key, alice, bob, key, into, limit
):
    """POST users/{id}/import may send MAX_IMPORT_BYTES with a tenant key (any user id) or the user's own key; any other key MAX_REQUEST_BYTES."""
    from asgiref.sync import sync_to_async

    from memory.models import KeyScope
    from memory.services.api_keys import api_key_create

    settings.MEMFUSE = {**settings.MEMFUSE, **IMPORT_LIMITS}

    def make_key() -> str:
        if key in ("alice", "bob"):
            return api_key_create(scope=KeyScope.USER, user=alice if key == "alice" else bob, name=key)[1]
        if key == "operator":
            return api_key_create(scope=KeyScope.OPERATOR, name="ops")[1]
        return tenant_key if key == "tenant" else other_tenant_key

    secret = await sync_to_async(make_key)()
    user_id = {"alice": str(alice.pk), "unknown": "00000000-0000-4000-8000-000000000000"}.get(into, into)
    path = f"/api/v1/users/{user_id}/import"

    def post(length: int) -> HttpCommunicator:
        headers = [(b"content-length", str(length).encode()), (b"content-type", b"application/x-ndjson"), bearer(secret)]
        return HttpCommunicator(application, "POST", path, body=b"", headers=headers)

    over_its_limit = await post(IMPORT_LIMITS[limit] + 1).get_response(timeout=10)
    assert over_its_limit["status"] == 413
    assert limit in json.loads(over_its_limit["body"])["message"]
    if limit == "MAX_IMPORT_BYTES":  # between the two limits: not refused for its size
        body = b"x" * (IMPORT_LIMITS["MAX_REQUEST_BYTES"] + 1)
        headers = [(b"content-type", b"application/x-ndjson"), bearer(secret)]
        within = await HttpCommunicator(application, "POST", path, body=body, headers=headers).get_response(timeout=30)
        assert within["status"] not in (401, 413), within["body"][:300]


def test_two_megabyte_content_and_5000_message_batch_are_400s(db, api, alice_session):
    """Contents over MAX_MESSAGE_CHARS and batches over MAX_BATCH_MESSAGES are 400s naming the field."""
    huge = add_body(content=json.dumps("y" * 2_000_000))
    batch = json.dumps({"messages": [{"role": "user", "content": f"m{i}"} for i in range(5000)]})

    assert_error(post_raw(api, messages_url(alice_session), huge), 400, "messages[0].content")
    assert_error(post_raw(api, messages_url(alice_session), batch), 400, "messages")
    assert not Message.objects.filter(session=alice_session).exists()


# --- malformed bodies, text and numbers -----------------------------------------------------------

BAD_ADDS = {
    "truncated JSON": ('{"messages": [', None),
    "not UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    "NUL in content": (add_body(content='"a\\u0000b"'), "messages[0].content"),
    "lone surrogate": (add_body(content='"\\ud800"'), "messages[0].content"),
    "NUL in a metadata key": (add_body(metadata='{"k\\u0000": 1}'), "messages[0].metadata"),
    "NaN": (add_body(metadata='{"n": NaN}'), None),
    "number too large for a float": (add_body(metadata='{"n": 1e400}'), None),
    "integer of 5,000 digits": (add_body(metadata='{"n": ' + "9" * 5000 + "}"), None),
    "content a number": (add_body(content="123"), "messages[0].content"),
    "role not a role": ('{"messages": [{"role": "root", "content": "x"}]}', "messages[0].role"),
    "created_at in year 99999": ('{"messages": [{"role": "user", "content": "x", "created_at": "99999-01-01T00:00:00Z"}]}', "messages[0].created_at"),
    "messages an object": ('{"messages": {"role": "user"}}', "messages"),
    "body an array": ("[]", None),
    "body a string": ('"messages"', None),
    "body null": ("null", None),
    "empty body": ("", "messages"),
}


@pytest.mark.parametrize("body, field", BAD_ADDS.values(), ids=BAD_ADDS.keys())
def test_malformed_adds_are_400s_and_store_nothing(db, api, alice_session, body, field):
    """Each malformed add is a 400 in the error envelope (naming the field where there is one); nothing stored."""
    assert_error(post_raw(api, messages_url(alice_session), body), 400, field)
    assert not Message.objects.filter(session=alice_session).exists()


BAD_QUERIES = {
    "top_k 1e400": ('{"query": "dogs", "top_k": 1e400}', None),
    "top_k 1e308": ('{"query": "dogs", "top_k": 1e308}', "top_k"),
    "top_k of 300 digits": ('{"query": "dogs", "top_k": 1' + "0" * 300 + "}", "top_k"),
    "top_k negative": ('{"query": "dogs", "top_k": -1}', "top_k"),
    "top_k true": ('{"query": "dogs", "top_k": true}', "top_k"),
    "weight -Infinity": ('{"query": "dogs", "retrieval": {"bm25_weight": -Infinity}}', None),
    "bogus retrieval key": ('{"query": "dogs", "retrieval": {"drop_table": 1}}', "retrieval.drop_table"),
    "query an object": ('{"query": {"$gt": ""}}', "query"),
}


@pytest.mark.parametrize("body, field", BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
def test_absurd_query_numbers_and_keys_are_400s(db, api, alice, body, field):
    """Absurd numbers and bogus keys in a query are 400s naming the field where the body could be decoded."""
    assert_error(post_raw(api, f"/api/v1/users/{alice.pk}/query", body), 400, field)


def test_sql_looking_text_is_stored_as_text(db, api, alice_session, tenant):
    """SQL in names, contents and metadata is data: stored and read back exactly, tables intact."""
    evil = "'; DROP TABLE memory_message; --"
    user = assert_success(api.post("/api/v1/users", {"name": f"Robert'); {evil}"}, format="json"), 201)["user"]
    data = assert_success(
        api.post(messages_url(alice_session), {"messages": [{"role": "user", "content": evil, "metadata": {evil: evil}}]}, format="json"),
        201,
    )

    message = Message.objects.get(pk=data["message_ids"][0])
    assert (message.content, message.metadata) == (evil, {evil: evil})
    assert User.objects.get(pk=user["id"]).name == f"Robert'); {evil}"
    results = assert_success(api.post(f"/api/v1/users/{alice_session.user_id}/query", {"query": evil}, format="json"))["results"]
    assert [r["content"] for r in results] == [evil]


def test_bogus_types_keys_and_parameters_outside_bodies(db, api, alice_session):
    """Wrong content type, absurd query-string numbers, NUL in a filter, junk ids and keys: 4xx, never 5xx."""
    assert post_raw(api, messages_url(alice_session), add_body(), content_type="text/plain").status_code == 415
    assert_error(api.get(messages_url(alice_session), {"limit": "9" * 40}), 400, "limit")
    assert_error(api.get(messages_url(alice_session), {"limit": "1e400"}), 400, "limit")
    assert_error(api.get("/api/v1/users", {"name": "a\x00b"}), 400, "name")
    assert_error(api.get("/api/v1/sessions/" + "9" * 400 + "/messages"), 404, "session_id")
    assert_error(api.get(f"/api/v1/sessions/{alice_session.pk}%00/messages"), 404, "session_id")
    api.credentials(HTTP_AUTHORIZATION="Bearer " + "k" * 10_000)
    assert_error(api.get("/api/v1/users"), 401, None)


# --- the WebSocket ----------------------------------------------------------------------------------

pytest_ws = pytest.mark.django_db(transaction=True)


async def add_frame(communicator, body: str) -> dict:
    await communicator.send_to(text_data=body)
    return await receive(communicator)


def ws_add(metadata: str = "{}", content: str = '"hello"') -> str:
    return f'{{"type": "messages.add", "request_id": "r", "messages": [{{"role": "user", "content": {content}, "metadata": {metadata}}}]}}'


@pytest_ws
async def test_ws_deep_nesting_is_a_400_frame_naming_the_limit_and_the_socket_stays_open(connect, alice_session):
    """A frame nested 5,000 deep, or one level past MAX_JSON_DEPTH, gets a 400 error frame naming the limit; the socket works on."""
    communicator = await connect(alice_session.pk)

    very_deep = await add_frame(communicator, ws_add(nested_metadata(5000)))
    one_past = await add_frame(communicator, ws_add(nested_metadata(29)))
    accepted = await add_frame(communicator, ws_add(nested_metadata(28)))

    for frame in (very_deep, one_past):
        assert frame["type"] == "error" and frame["error"]["code"] == 400
        assert "MAX_JSON_DEPTH" in frame["error"]["message"]
    assert one_past["error"]["errors"][0]["field"] == "messages[0].metadata" + ".a" * 29
    assert accepted["type"] == "messages.added"
    assert len(await stored(alice_session)) == 1


@pytest_ws
async def test_ws_frame_over_the_limit_gets_a_413_frame_unparsed(connect, alice_session, settings):
    """A text frame over WS_MAX_FRAME_BYTES (counted in UTF-8 bytes) gets a 413 error frame; nothing stored."""
    settings.MEMFUSE = {**settings.MEMFUSE, "WS_MAX_FRAME_BYTES": 1000}
    communicator = await connect(alice_session.pk)

    ascii_frame = await add_frame(communicator, ws_add(content=json.dumps("x" * 1000)))
    multibyte_frame = await add_frame(communicator, ws_add(content=json.dumps("é" * 480, ensure_ascii=False)))
    small = await add_frame(communicator, ws_add(content=json.dumps("é" * 100, ensure_ascii=False)))

    for frame in (ascii_frame, multibyte_frame):
        assert frame["error"]["code"] == 413 and "WS_MAX_FRAME_BYTES" in frame["error"]["message"]
    assert small["type"] == "messages.added"
    assert len(await stored(alice_session)) == 1


WS_BAD_FRAMES = {
    "truncated JSON": ('{"type": "messages.add", "messages": [', None),
    "NUL in content": (ws_add(content='"a\\u0000b"'), "messages[0].content"),
    "lone surrogate": (ws_add(content='"\\ud800"'), "messages[0].content"),
    "number too large for a float": (ws_add(metadata='{"n": 1e400}'), None),
    "NaN": (ws_add(metadata='{"n": NaN}'), None),
    "5000 messages": (json.dumps({"type": "messages.add", "messages": [{"role": "user", "content": "m"}] * 5000}), "messages"),
    "two-megabyte content": (ws_add(content=json.dumps("y" * 2_000_000)), "messages[0].content"),
    "top_k of 300 digits": ('{"type": "memory.query", "query": "dogs", "top_k": 1' + "0" * 300 + "}", "top_k"),
    "bogus type": ('{"type": "flush.completed", "session_id": "x", "message_ids": []}', "type"),
    "array frame": ("[1, 2]", None),
}


@pytest_ws
@pytest.mark.parametrize("frame, field", WS_BAD_FRAMES.values(), ids=WS_BAD_FRAMES.keys())
async def test_ws_malformed_frames_get_400_frames_and_store_nothing(connect, alice_session, frame, field):
    """Each malformed frame gets a 400 error frame (naming the field where there is one); nothing stored, socket open."""
    communicator = await connect(alice_session.pk)

    answer = await add_frame(communicator, frame)

    assert answer["type"] == "error" and answer["error"]["code"] == 400, answer
    if field is not None:
        assert field in [error["field"] for error in answer["error"]["errors"]]
    assert await stored(alice_session) == []
    assert (await add_frame(communicator, ws_add()))["type"] == "messages.added"


# --- the WebSocket's rate limit -----------------------------------------------------------------


@pytest_ws
async def test_ws_frames_count_against_the_keys_rate_limit_with_rest(connect, alice_session, settings, api):
    """The connect and each add or query frame count against API_RATE_LIMIT, one budget with REST: 429 frame, then 429 REST."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "3/minute"}
    from django.core.cache import cache

    await cache.aclear()
    communicator = await connect(alice_session.pk)  # 1

    first = await add_frame(communicator, ws_add())  # 2
    second = await add_frame(communicator, ws_add())  # 3
    refused = await add_frame(communicator, ws_add())

    assert first["type"] == second["type"] == "messages.added"
    assert refused["type"] == "error" and refused["request_id"] == "r" and refused["error"]["code"] == 429
    assert "API_RATE_LIMIT" in refused["error"]["message"] and "retry in" in refused["error"]["message"]
    assert len(await stored(alice_session)) == 2
    rest = await api_get(api, "/api/v1/users")
    assert rest.status_code == 429 and int(rest["Retry-After"]) >= 1


@pytest_ws
async def test_ws_connect_past_the_rate_limit_is_refused_with_4429(application, alice_session, tenant_key, settings):
    """A connect past the key's limit gets a 429 error frame, then close code 4429."""
    from channels.testing import WebsocketCommunicator
    from django.core.cache import cache

    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "1/minute"}
    await cache.aclear()
    headers = [(b"origin", b"http://127.0.0.1"), (b"authorization", f"Bearer {tenant_key}".encode())]
    sockets = [WebsocketCommunicator(application, f"/ws/v1/sessions/{alice_session.pk}/", headers=headers) for _ in range(2)]
    try:
        for socket in sockets:
            assert (await socket.connect(timeout=10))[0]
        assert await sockets[0].receive_nothing()
        frame = await receive(sockets[1])
        closed = await sockets[1].receive_output(timeout=10)
    finally:
        for socket in sockets:
            await socket.disconnect()

    assert frame["error"]["code"] == 429 and "API_RATE_LIMIT" in frame["error"]["message"]
    assert closed == {"type": "websocket.close", "code": 4429}


@pytest_ws
async def test_ws_connect_counts_against_the_tenants_rate_limit_with_its_other_keys(application, alice_session, tenant, settings):
    """A connect with a fresh key of a tenant whose other keys used up API_TENANT_RATE_LIMIT: a 429 frame naming it, then 4429."""
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.core.cache import cache

    from memory.models import KeyScope
    from memory.services.api_keys import api_key_create

    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "100/hour", "API_TENANT_RATE_LIMIT": "2/hour"}
    await cache.aclear()
    first, second = [await sync_to_async(api_key_create)(scope=KeyScope.TENANT, tenant=tenant, name=n) for n in "ab"]
    for _ in range(2):
        assert (await HttpCommunicator(application, "GET", "/api/v1/users", headers=[bearer(first[1])]).get_response(timeout=30))["status"] == 200
    headers = [(b"origin", b"http://127.0.0.1"), bearer(second[1])]
    socket = WebsocketCommunicator(application, f"/ws/v1/sessions/{alice_session.pk}/", headers=headers)
    try:
        assert (await socket.connect(timeout=10))[0]
        frame = await receive(socket)
        closed = await socket.receive_output(timeout=10)
    finally:
        await socket.disconnect()

    assert frame["error"]["code"] == 429 and "API_TENANT_RATE_LIMIT" in frame["error"]["message"]
    assert closed == {"type": "websocket.close", "code": 4429}


async def api_get(api, path: str):
    from asgiref.sync import sync_to_async

    return await sync_to_async(api.get)(path)
