"""Admission at the ASGI edge (``memory.api.admission``): what one tenant may hold of a process.

Through the project's ASGI application: past ``API_TENANT_CONCURRENCY`` requests of a tenant
in progress, its next one is a 429 answered before its body is read, while another tenant is
served; a waiting flush gives its place back; a key a rate limit refused is answered by the
edge, without a view, until its window ends.
"""

# ruff: noqa: F811  (the ASGI fixtures are imported from test_websocket, then used as arguments)
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator

from memory import selectors
from memory.api import admission, auth
from memory.models import KeyScope
from memory.services.api_keys import api_key_create
from tests.test_hostile_input import HUGE, answer_without_a_body, bearer
from tests.test_websocket import application, return_connections_to_the_pool  # noqa: F401  (fixtures)


def get(application, path: str, key: str) -> HttpCommunicator:
    return HttpCommunicator(application, "GET", path, headers=[(b"host", b"127.0.0.1"), bearer(key)])


@pytest.fixture
def held_users_list(monkeypatch, tenant):
    """``GET /api/v1/users`` of acme blocks in its view until ``release`` is set; ``entered`` is
    set once one is inside. Other tenants' lists are served at once."""
    entered, release = threading.Event(), threading.Event()
    real = selectors.users_list

    def users_list(*, principal, name=None):
        if principal.tenant_id == tenant.pk:
            entered.set()
            release.wait(30)
        return real(principal=principal, name=name)

    monkeypatch.setattr(selectors, "users_list", users_list)
    yield entered, release
    release.set()


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.django_db(transaction=True)
async def test_past_its_concurrency_a_tenants_request_is_a_429_before_its_body_and_others_are_served(
    application, settings, tenant, tenant_key, other_tenant_key, held_users_list
):
    """With API_TENANT_CONCURRENCY requests of acme in progress, acme's next request is a 429 with
    Retry-After (and close) while none of its body was sent; globex is served meanwhile, and acme
    again once its request ended."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_TENANT_CONCURRENCY": 1}
    entered, release = held_users_list
    first = asyncio.create_task(get(application, "/api/v1/users", tenant_key).get_response(timeout=30))
    await wait_until(entered.is_set, "acme's first request in its view")

    headers = [(b"content-length", HUGE), (b"content-type", b"application/json"), bearer(tenant_key)]
    start, body = await answer_without_a_body(application, "POST", "/api/v1/users", headers)
    other = await get(application, "/api/v1/users", other_tenant_key).get_response(timeout=30)
    release.set()
    served = await first
    after = await get(application, "/api/v1/users", tenant_key).get_response(timeout=30)

    assert start["status"] == 429
    response_headers = dict(start["headers"])
    assert response_headers[b"retry-after"] == b"1" and response_headers[b"connection"] == b"close"
    answer = json.loads(body["body"])
    assert answer["code"] == 429 and "API_TENANT_CONCURRENCY" in answer["message"]
    assert (other["status"], served["status"], after["status"]) == (200, 200, 200)
    await wait_until(lambda: admission.in_flight(tenant.pk) == 0, "every place given back")


@pytest.fixture
def a_request_waiting_for_a_connection():
    """Every connection of the process's pool lent out and one more asked for: a request waits
    for a connection, as while the database restarts. Everything is given back at the end."""
    from django.db import connections

    pool = connections["default"].pool
    lent = [
        pool.getconn()
        for _ in range(pool.max_size - pool.get_stats().get("pool_size", 0) + pool.get_stats().get("pool_available", 0))
    ]
    waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn(timeout=30)))
    waiter.start()
    try:
        for _ in range(500):
            if pool.get_stats().get("requests_waiting", 0):
                break
            threading.Event().wait(0.01)
        yield
    finally:
        for conn in lent:
            pool.putconn(conn)
        waiter.join(30)


@pytest.mark.django_db(transaction=True)
async def test_past_its_concurrency_while_the_process_waits_for_connections_a_tenants_request_is_a_503(
    application, settings, tenant, tenant_key, held_users_list, a_request_waiting_for_a_connection
):
    """A tenant's requests in progress that wait for connections the process lacks (a database
    restarting, an exhausted pool) are the service's shortage: the next one is the pool's 503 with
    Retry-After, not the tenant's 429."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_TENANT_CONCURRENCY": 1}
    entered, release = held_users_list
    first = asyncio.create_task(get(application, "/api/v1/users", tenant_key).get_response(timeout=30))
    await asyncio.sleep(0.2)  # in progress: in its view, or waiting for a connection

    refused = await get(application, "/api/v1/users", tenant_key).get_response(timeout=30)
    release.set()

    assert refused["status"] == 503
    assert dict(refused["headers"])[b"retry-after"] == b"1"
    assert "no database connection free" in json.loads(refused["body"])["message"]
    first.cancel()


@pytest.mark.django_db(transaction=True)
async def test_a_waiting_flush_gives_its_place_back(application, settings, tenant, tenant_key, alice_session):
    """A {"wait": true} flush holds none of its tenant's API_TENANT_CONCURRENCY places while it waits:
    the tenant's other requests are served meanwhile."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_TENANT_CONCURRENCY": 1}
    settings.BUFFERS = {**settings.BUFFERS, "TIMEOUT_SECONDS": 3.0}  # no worker runs the job: the wait times out
    communicator = HttpCommunicator(
        application,
        "POST",
        f"/api/v1/sessions/{alice_session.pk}/flush",
        body=b'{"wait": true}',
        headers=[
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"14"),
            bearer(tenant_key),
        ],
    )
    waiting = asyncio.create_task(communicator.get_response(timeout=30))
    await wait_until(lambda: admission.in_flight(tenant.pk) == 0 and _waits(tenant.pk) == 1, "the wait")

    meanwhile = await get(application, "/api/v1/users", tenant_key).get_response(timeout=30)
    waited = await waiting

    assert meanwhile["status"] == 200
    assert waited["status"] == 200 and json.loads(waited["body"])["data"]["state"] == "queued"


def _waits(tenant_id) -> int:
    from buffers import services as buffers

    return buffers._waits.get(tenant_id, 0)


@pytest.mark.django_db(transaction=True)
async def test_a_key_refused_by_its_rate_limit_is_answered_at_the_edge_until_its_window_ends(
    application, settings, tenant, tenant_key, monkeypatch
):
    """Once API_RATE_LIMIT refused a key, its next requests get the same 429 (naming the setting,
    with Retry-After) without a view or a count; another key of the tenant is still served."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "2/minute", "API_TENANT_RATE_LIMIT": "100/minute"}
    counted = []
    real_usage = auth.rate_usage
    monkeypatch.setattr(auth, "rate_usage", lambda principal: counted.append(principal.key_id) or real_usage(principal))
    other_key = (await sync_to_async(api_key_create)(scope=KeyScope.TENANT, tenant=tenant, name="second"))[1]

    statuses = [
        (await get(application, "/api/v1/users", tenant_key).get_response(timeout=30))["status"] for _ in range(3)
    ]
    views_before = len(counted)
    edge = await get(application, "/api/v1/users", tenant_key).get_response(timeout=30)
    views_after = len(counted)
    other = await get(application, "/api/v1/users", other_key).get_response(timeout=30)
    auth.forget_refusals()

    assert statuses == [200, 200, 429]
    assert edge["status"] == 429 and views_after == views_before
    assert int(dict(edge["headers"])[b"retry-after"]) >= 1
    assert "(API_RATE_LIMIT)" in json.loads(edge["body"])["message"]
    assert other["status"] == 200


@pytest.mark.django_db(transaction=True)
async def test_an_add_of_a_tenant_at_its_backlog_limit_is_a_503_before_its_body(
    application, settings, tenant_key, alice_session, bob_messages, globex_session, other_tenant_key
):
    """With acme at MAX_BACKLOG_MESSAGES by the figures the process holds, acme's add is the
    add's 503 (Retry-After, close) while none of its body was sent; globex's add is stored."""
    from buffers import backlog

    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": len(bob_messages), "TICK_SECONDS": 60.0}
    backlog.clear_cache()
    await sync_to_async(backlog.current)()  # the figures, as the process's last add read them
    headers = [(b"content-length", HUGE), (b"content-type", b"application/json"), bearer(tenant_key)]

    start, body = await answer_without_a_body(
        application, "POST", f"/api/v1/sessions/{alice_session.pk}/messages", headers
    )
    payload = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    other = await HttpCommunicator(
        application,
        "POST",
        f"/api/v1/sessions/{globex_session.pk}/messages",
        body=payload,
        headers=[(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                 (b"content-length", str(len(payload)).encode()), bearer(other_tenant_key)],
    ).get_response(timeout=30)  # fmt: skip
    backlog.clear_cache()

    assert start["status"] == 503
    response_headers = dict(start["headers"])
    assert int(response_headers[b"retry-after"]) >= 1 and response_headers[b"connection"] == b"close"
    assert "MAX_BACKLOG_MESSAGES" in json.loads(body["body"])["message"]
    assert other["status"] == 201


async def test_a_place_is_given_back_with_the_answers_last_byte(settings):
    """A request's place frees once its answer is sent, before the application returns (Django's
    clean-up after the answer may lag): the client's next request is admitted meanwhile."""
    import uuid

    from memory.tenancy import PRINCIPAL_SCOPE_KEY, Principal

    settings.MEMFUSE = {**settings.MEMFUSE, "API_TENANT_CONCURRENCY": 1}
    tenant_id = uuid.uuid4()
    cleaning_up, done = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        if scope["path"] == "/api/v1/first":
            cleaning_up.set()
            await done.wait()

    principal = Principal(key_id="k", scope=KeyScope.TENANT, tenant_id=tenant_id)
    sent: dict[str, list] = {"/api/v1/first": [], "/api/v1/second": []}

    def call(path: str):
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], PRINCIPAL_SCOPE_KEY: principal}

        async def send(message):
            sent[path].append(message)

        return admission.TenantAdmission(app)(scope, None, send)

    first = asyncio.create_task(call("/api/v1/first"))
    await asyncio.wait_for(cleaning_up.wait(), 5)
    await call("/api/v1/second")
    done.set()
    await first

    assert [m["status"] for m in sent["/api/v1/second"] if m["type"] == "http.response.start"] == [200]
    assert admission.in_flight(tenant_id) == 0


@pytest.mark.django_db(transaction=True)
async def test_a_flush_wait_with_no_place_is_answered_at_the_edge_and_other_flushes_go_on(
    application, settings, tenant, tenant_key, alice_session, monkeypatch
):
    """With the tenant's FLUSH_WAIT_MAX_PER_TENANT waits in progress, {"wait": true} is the 429
    naming it without a view; a flush without wait still reaches the view (202), its body intact."""
    from buffers import services as buffers
    from memory.api import views

    settings.BUFFERS = {**settings.BUFFERS, "WAIT_MAX_PER_TENANT": 1}
    viewed = []
    real = views._manual_flush
    monkeypatch.setattr(views, "_manual_flush", lambda request, target: viewed.append(1) or real(request, target))

    def flush(body: bytes) -> HttpCommunicator:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), bearer(tenant_key)]
        headers.append((b"content-length", str(len(body)).encode()))
        return HttpCommunicator(
            application, "POST", f"/api/v1/sessions/{alice_session.pk}/flush", body=body, headers=headers
        )

    with buffers.wait_place(tenant_id=tenant.pk):
        refused = await flush(b'{"wait": true}').get_response(timeout=30)
        queued = await flush(b"{}").get_response(timeout=30)

    assert refused["status"] == 429 and viewed == [1]
    assert int(dict(refused["headers"])[b"retry-after"]) >= 1
    assert "FLUSH_WAIT_MAX_PER_TENANT" in json.loads(refused["body"])["message"]
    assert queued["status"] == 202


@pytest.mark.django_db(transaction=True)
async def test_an_import_of_a_tenant_at_its_backlog_limit_is_refused_after_its_header_line(
    application, settings, tenant_key, bob_messages
):
    """With acme at MAX_BACKLOG_MESSAGES, an import whose header announces no embeddings of this
    model is the 503 once its first line came, the rest never sent; one whose header brings
    this model's embeddings goes on to the view."""
    import uuid

    from channels.testing import ApplicationCommunicator

    from buffers import backlog
    from memory.inference import registry

    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": len(bob_messages), "TICK_SECONDS": 60.0}
    backlog.clear_cache()
    await sync_to_async(backlog.current)()
    path = f"/api/v1/users/{uuid.uuid4()}/import"

    def header(embedding) -> bytes:
        return json.dumps({"type": "header", "format": "memfuse.memory", "version": 1, "embedding": embedding}).encode()

    headers = [(b"content-length", HUGE), (b"content-type", b"application/x-ndjson"), bearer(tenant_key)]
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": headers,
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input(
        {"type": "http.request", "body": header(None) + b'\n{"type": "user", ', "more_body": True}
    )
    start = await communicator.receive_output(timeout=10)
    body = await communicator.receive_output(timeout=10)
    await communicator.wait(timeout=10)

    user = json.dumps(
        {"type": "user", "id": str(uuid.uuid4()), "name": "carol", "created_at": "2024-01-01T00:00:00+00:00"}
    ).encode()
    embedded = header(await sync_to_async(registry.document_model)()) + b"\n" + user + b"\n"
    passed = await HttpCommunicator(
        application,
        "POST",
        path,
        body=embedded,
        headers=[
            (b"content-type", b"application/x-ndjson"),
            (b"content-length", str(len(embedded)).encode()),
            bearer(tenant_key),
        ],
    ).get_response(timeout=30)
    backlog.clear_cache()

    assert start["status"] == 503 and dict(start["headers"])[b"connection"] == b"close"
    assert "MAX_BACKLOG_MESSAGES" in json.loads(body["body"])["message"]
    assert passed["status"] == 200, passed["body"][:300]
