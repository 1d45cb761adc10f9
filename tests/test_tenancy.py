"""Tenants and API keys over REST: authentication, isolation between tenants and users, rate limits, commands."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from memory import tenancy
from memory.api.auth import ApiKeyAuthentication, is_operator
from memory.models import Agent, ApiKey, KeyScope, Knowledge, Message, Session, User
from memory.services.api_keys import api_key_create, api_key_revoke
from memory.services.knowledge import knowledge_add
from memory.services.sessions import session_create
from tests.conftest import key_client
from tests.envelopes import assert_error, assert_success

# --- authentication ------------------------------------------------------------------------------


def unusable_key(which: str, tenant) -> str | None:
    """A key that must be refused: missing, unknown, wrong secret, expired or revoked."""
    if which == "none":
        return None
    if which == "unknown":
        return "nope1234.abcdefghijklmnopqrstuvwxyz012345"
    api_key, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name=which)
    if which == "wrong-secret":
        prefix, secret = key.split(".")
        return f"{prefix}.{'x' if secret[0] != 'x' else 'y'}{secret[1:]}"
    if which == "expired":
        ApiKey.objects.filter(pk=api_key.pk).update(expiry_date=timezone.now() - timedelta(seconds=1))
    if which == "revoked":
        api_key_revoke(api_key=api_key)
    return key


@pytest.mark.parametrize("which", ["none", "unknown", "wrong-secret", "expired", "revoked"])
@pytest.mark.parametrize("method, path", [("get", "/api/v1/users"), ("post", "/api/v1/agents"), ("get", "/api/v1/sessions")])
def test_requests_without_a_usable_key_get_401(tenant, which, method, path):
    """No key, an unknown or wrong one, an expired or a revoked one: 401 in the error envelope, nothing written."""
    client = key_client(unusable_key(which, tenant))

    response = getattr(client, method)(path, {"name": "x"} if method == "post" else None, format="json")

    assert_error(response, 401, None)
    assert not Agent.objects.exists()


def test_other_authorization_schemes_are_refused(tenant_key):
    """A key sent with another scheme than Bearer is no key."""
    client = key_client(None)
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {tenant_key}")
    assert_error(client.get("/api/v1/users"), 401, None)


def test_health_needs_no_key_and_ignores_a_bad_one(db, anonymous_api):
    """The health check answers without a key, and a stale key does not turn it into a 401."""
    assert_success(anonymous_api.get("/api/v1/health"))
    assert_success(key_client("stale123.key").get("/api/v1/health"))


def test_revoked_key_is_refused_at_once_in_this_process(api, tenant):
    """A key cached by an earlier request is forgotten when revoked (no wait for the cache TTL)."""
    api_key, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="soon revoked")
    client = key_client(key)
    assert_success(client.get("/api/v1/users"))

    api_key_revoke(api_key=api_key)

    assert_error(client.get("/api/v1/users"), 401, None)


def test_keys_are_stored_hashed(tenant, tenant_key):
    """Only the prefix is stored in clear; the secret part appears nowhere in the row."""
    prefix, secret = tenant_key.split(".")
    row = ApiKey.objects.get(prefix=prefix)
    assert secret not in row.hashed_key and secret not in row.pk
    assert row.hashed_key.startswith("sha512$$")


def test_operator_key_sees_no_tenant_data_but_is_an_operator(alice):
    """An operator key is refused (403) on tenant endpoints; is_operator accepts it and staff sessions only."""
    _, operator_key = api_key_create(scope=KeyScope.OPERATOR, name="ops")
    assert_error(key_client(operator_key).get("/api/v1/users"), 403, None)

    factory = APIRequestFactory()

    def request_with(key: str) -> Request:
        request = Request(factory.get("/", HTTP_AUTHORIZATION=f"Bearer {key}"), authenticators=[ApiKeyAuthentication()])
        request.user  # noqa: B018  (runs authentication)
        return request

    tenant_key = api_key_create(scope=KeyScope.TENANT, tenant=alice.tenant, name="t")[1]
    assert is_operator(request_with(operator_key))
    assert not is_operator(request_with(tenant_key))
    staff_request = factory.get("/")
    staff_request.user = get_user_model().objects.create_user("op", is_staff=True)
    assert is_operator(staff_request)
    staff_request.user = get_user_model().objects.create_user("not-op")
    assert not is_operator(staff_request)


# --- isolation between tenants -------------------------------------------------------------------


@pytest.fixture
def acme_world(alice, agent, alice_session, alice_messages):
    """Acme's alice with a session, messages, knowledge and a user key."""
    [knowledge] = knowledge_add(user=alice, contents=["Alice is vegetarian."])
    api_key, _ = api_key_create(scope=KeyScope.USER, user=alice, name="alice key")
    return {
        "user": alice.pk,
        "agent": agent.pk,
        "session": alice_session.pk,
        "message": alice_messages[0].pk,
        "knowledge": knowledge.pk,
        "key": api_key.prefix,
    }


def world_counts() -> tuple:
    return (
        User.objects.count(),
        Agent.objects.count(),
        Session.objects.count(),
        Message.objects.count(),
        Knowledge.objects.count(),
        ApiKey.objects.filter(revoked=False).count(),
    )


# Every endpoint that names an object of alice's (acme): (method, path, body).
ALICE_OBJECT_ENDPOINTS = [
    ("get", "users/{user}", None),
    ("put", "users/{user}", {"name": "renamed"}),
    ("delete", "users/{user}", None),
    ("post", "users/{user}/query", {"query": "Biscuit"}),
    ("get", "users/{user}/knowledge", None),
    ("post", "users/{user}/knowledge", {"knowledge": ["stolen"]}),
    ("put", "users/{user}/knowledge", {"knowledge_ids": ["{knowledge}"], "new_knowledge": ["changed"]}),
    ("delete", "users/{user}/knowledge", {"knowledge_ids": ["{knowledge}"]}),
    ("post", "users/{user}/knowledge/read", {"knowledge_ids": ["{knowledge}"]}),
    ("post", "users/{user}/flush", {}),
    ("get", "users/{user}/buffer", None),
    ("get", "users/{user}/api-keys", None),
    ("post", "users/{user}/api-keys", {"name": "stolen"}),
    ("delete", "users/{user}/api-keys/{key}", None),
    ("get", "sessions/{session}", None),
    ("put", "sessions/{session}", {"name": "renamed"}),
    ("delete", "sessions/{session}", None),
    ("post", "sessions/{session}/flush", {}),
    ("get", "sessions/{session}/messages", None),
    ("post", "sessions/{session}/messages", {"messages": [{"role": "user", "content": "injected"}]}),
    ("put", "sessions/{session}/messages", {"message_ids": ["{message}"], "new_messages": [{"role": "user", "content": "x"}]}),
    ("delete", "sessions/{session}/messages", {"message_ids": ["{message}"]}),
    ("post", "sessions/{session}/messages/read", {"message_ids": ["{message}"]}),
]
AGENT_ENDPOINTS = [
    ("get", "agents/{agent}", None),
    ("put", "agents/{agent}", {"name": "renamed"}),
    ("delete", "agents/{agent}", None),
]


def _fill(value, ids: dict):
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def call(client, method: str, path: str, body, ids: dict):
    return getattr(client, method)(f"/api/v1/{_fill(path, ids)}", _fill(body, ids), format="json")


@pytest.mark.parametrize(
    "method, path, body", ALICE_OBJECT_ENDPOINTS + AGENT_ENDPOINTS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_another_tenant_cannot_reach_any_object(globex_api, globex_alice, acme_world, method, path, body):
    """Globex's key on any of acme's objects: 404 as for an unknown id, and nothing changes."""
    before = world_counts()

    response = call(globex_api, method, path, body, acme_world)

    assert response.status_code == 404, response.content
    assert response.json()["status"] == "error"
    assert world_counts() == before
    assert User.objects.get(pk=acme_world["user"]).name == "alice"


def test_another_tenant_lists_only_its_own(globex_api, globex_alice, globex_session, acme_world):
    """Lists and name lookups of globex never show acme's rows; a filter on acme's ids finds nothing."""
    users = assert_success(globex_api.get("/api/v1/users"))["users"]
    assert [u["id"] for u in users] == [str(globex_alice.pk)]
    agents = assert_success(globex_api.get("/api/v1/agents"))["agents"]
    assert [a["id"] for a in agents] == [str(globex_session.agent_id)]
    sessions = assert_success(globex_api.get("/api/v1/sessions"))["sessions"]
    assert [s["id"] for s in sessions] == [str(globex_session.pk)]
    assert assert_success(globex_api.get(f"/api/v1/sessions?user_id={acme_world['user']}"))["sessions"] == []
    assert assert_success(globex_api.get(f"/api/v1/sessions?agent_id={acme_world['agent']}"))["sessions"] == []
    # Same name, other tenant: globex's own alice, never acme's.
    [alice] = assert_success(globex_api.get("/api/v1/users?name=alice"))["users"]
    assert alice["id"] == str(globex_alice.pk)


def test_another_tenant_cannot_mix_its_objects_with_ours(globex_api, globex_alice, globex_agent, acme_world):
    """A session of globex's user with acme's agent (or the reverse) is refused as unknown (404), nothing created."""
    mixed = [
        ({"user_id": str(globex_alice.pk), "agent_id": str(acme_world["agent"])}, "agent_id"),
        ({"user_id": str(acme_world["user"]), "agent_id": str(globex_agent.pk)}, "user_id"),
    ]
    before = Session.objects.count()
    for body, field in mixed:
        assert_error(globex_api.post("/api/v1/sessions", body, format="json"), 404, field)
    assert Session.objects.count() == before


def test_query_of_another_tenant_finds_nothing_of_ours(globex_api, globex_alice, acme_world):
    """Globex's alice asking about acme's alice's puppy finds nothing."""
    data = assert_success(globex_api.post(f"/api/v1/users/{globex_alice.pk}/query", {"query": "Biscuit puppy"}, format="json"))
    assert data["results"] == []


def test_same_names_in_two_tenants(api, globex_api, alice, agent):
    """Users and agents are unique per tenant: globex creates alice and assistant; acme cannot twice."""
    assert assert_success(globex_api.post("/api/v1/users", {"name": "alice"}, format="json"), 201)["user"]["name"] == "alice"
    assert_success(globex_api.post("/api/v1/agents", {"name": "assistant"}, format="json"), 201)
    assert_error(api.post("/api/v1/users", {"name": "alice"}, format="json"), 409, "name")
    assert_error(api.post("/api/v1/agents", {"name": "assistant"}, format="json"), 409, "name")
    assert User.objects.filter(name="alice").count() == 2


# --- user keys -----------------------------------------------------------------------------------


@pytest.fixture
def bob_api(bob):
    return key_client(api_key_create(scope=KeyScope.USER, user=bob, name="bob key")[1])


@pytest.mark.parametrize("method, path, body", ALICE_OBJECT_ENDPOINTS, ids=lambda v: v if isinstance(v, str) else "")
def test_user_key_cannot_reach_another_user_of_its_tenant(bob_api, acme_world, method, path, body):
    """Bob's user key on any of alice's objects (same tenant): 404, and nothing changes."""
    before = world_counts()

    response = call(bob_api, method, path, body, acme_world)

    assert response.status_code == 404, response.content
    assert world_counts() == before


def test_user_key_sees_and_works_on_its_own_user(bob_api, bob, agent, acme_world):
    """Bob's key lists only bob, reads the tenant's agents, opens a session with one and adds to it."""
    assert [u["id"] for u in assert_success(bob_api.get("/api/v1/users"))["users"]] == [str(bob.pk)]
    assert_error(bob_api.get("/api/v1/users?name=alice"), 404, "name")
    assert [a["id"] for a in assert_success(bob_api.get("/api/v1/agents"))["agents"]] == [str(agent.pk)]
    session = assert_success(
        bob_api.post("/api/v1/sessions", {"user_id": str(bob.pk), "agent_id": str(agent.pk)}, format="json"), 201
    )["session"]
    assert [s["id"] for s in assert_success(bob_api.get("/api/v1/sessions"))["sessions"]] == [session["id"]]
    added = assert_success(
        bob_api.post(f"/api/v1/sessions/{session['id']}/messages", {"messages": [{"role": "user", "content": "hi"}]}, format="json"),
        201,
    )
    assert len(added["message_ids"]) == 1
    assert_error(
        bob_api.post("/api/v1/sessions", {"user_id": str(acme_world["user"]), "agent_id": str(agent.pk)}, format="json"),
        404,
        "user_id",
    )


@pytest.mark.parametrize(
    "method, path, body",
    [("post", "users", {"name": "mallory"}), ("post", "agents", {"name": "mine"}), *AGENT_ENDPOINTS[1:]],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_user_key_cannot_create_users_or_change_agents(bob_api, acme_world, method, path, body):
    """A user key may not create users nor create, change or delete the tenant's agents (403)."""
    before = world_counts()
    assert_error(call(bob_api, method, path, body, acme_world), 403, None)
    assert world_counts() == before


# --- MemFuse's api-keys endpoints ----------------------------------------------------------------


def test_api_keys_create_list_revoke(api, alice, bob):
    """A created key is shown once, listed without its secret, works for its user only, and revoking ends it."""
    created = assert_success(api.post(f"/api/v1/users/{alice.pk}/api-keys", {"name": "phone"}, format="json"), 201)["api_key"]
    assert created["key"].startswith(created["id"] + ".") and created["scope"] == "user"
    listed = assert_success(api.get(f"/api/v1/users/{alice.pk}/api-keys"))["api_keys"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    as_alice = key_client(created["key"])
    assert_success(as_alice.get(f"/api/v1/users/{alice.pk}"))
    assert_error(as_alice.get(f"/api/v1/users/{bob.pk}"), 404, "user_id")
    assert_error(api.delete(f"/api/v1/users/{bob.pk}/api-keys/{created['id']}"), 404, "api_key_id")

    assert_success(api.delete(f"/api/v1/users/{alice.pk}/api-keys/{created['id']}"))

    assert_error(as_alice.get(f"/api/v1/users/{alice.pk}"), 401, None)
    assert assert_success(api.get(f"/api/v1/users/{alice.pk}/api-keys"))["api_keys"][0]["revoked"] is True


@pytest.mark.parametrize(
    "body, field",
    [
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "soon"}, "expires_at"),
        ({"key": "my-own-key"}, "key"),
        ({"name": "n" * 51}, "name"),
    ],
)
def test_api_key_create_rejects_bad_input(api, alice, body, field):
    """A past or malformed expiry, a client-chosen key or a long name: 400 naming the field, no key made."""
    assert_error(api.post(f"/api/v1/users/{alice.pk}/api-keys", body, format="json"), 400, field)
    assert not ApiKey.objects.filter(user=alice).exists()


def test_key_with_expiry_works_until_then(api, alice):
    """A key created with a future expires_at works and reports it."""
    expires = (timezone.now() + timedelta(days=1)).isoformat()
    created = assert_success(api.post(f"/api/v1/users/{alice.pk}/api-keys", {"expires_at": expires}, format="json"), 201)
    assert created["api_key"]["expires_at"] is not None
    assert_success(key_client(created["api_key"]["key"]).get(f"/api/v1/users/{alice.pk}"))


# --- keys made by user keys ----------------------------------------------------------------------


def create_key(client, user, **body) -> dict:
    """``POST users/{id}/api-keys`` with ``client``: the created key (with its secret)."""
    return assert_success(client.post(f"/api/v1/users/{user.pk}/api-keys", body, format="json"), 201)["api_key"]


def test_a_key_made_by_a_user_key_is_revoked_with_it_and_its_descendants_at_once(api, alice):
    """A user key's child and grandchild record their parents; revoking the first revokes all three in this process at once, not the keys the tenant made."""
    _, parent_key = api_key_create(scope=KeyScope.USER, user=alice, name="phone")
    child = create_key(key_client(parent_key), alice, name="child")
    grandchild = create_key(key_client(child["key"]), alice, name="grandchild")
    sibling = create_key(api, alice, name="made by the tenant")
    clients = {name: key_client(key) for name, key in [("parent", parent_key), ("child", child["key"]), ("grandchild", grandchild["key"]), ("sibling", sibling["key"])]}
    for client in clients.values():
        assert_success(client.get(f"/api/v1/users/{alice.pk}"))  # cached by this process now
    rows = {row.prefix: row for row in ApiKey.objects.filter(user=alice)}
    assert rows[grandchild["id"]].parent_id == rows[child["id"]].pk and rows[child["id"]].parent.prefix == parent_key.split(".")[0]
    assert rows[sibling["id"]].parent_id is None

    assert_success(api.delete(f"/api/v1/users/{alice.pk}/api-keys/{parent_key.split('.')[0]}"))

    for name in ("parent", "child", "grandchild"):
        assert_error(clients[name].get(f"/api/v1/users/{alice.pk}"), 401, None)
    assert_success(clients["sibling"].get(f"/api/v1/users/{alice.pk}"))
    assert set(ApiKey.objects.filter(user=alice, revoked=True).values_list("prefix", flat=True)) == {
        parent_key.split(".")[0],
        child["id"],
        grandchild["id"],
    }


def test_a_key_made_by_a_user_key_expires_no_later_than_it(alice):
    """No expires_at: the child takes its parent's expiry; a later one is a 400 naming expires_at; an earlier one is kept."""
    parent_expiry = timezone.now() + timedelta(days=1)
    _, parent_key = api_key_create(scope=KeyScope.USER, user=alice, name="phone", expires_at=parent_expiry)
    as_parent = key_client(parent_key)

    inherited = create_key(as_parent, alice)
    later = as_parent.post(f"/api/v1/users/{alice.pk}/api-keys", {"expires_at": (parent_expiry + timedelta(hours=1)).isoformat()}, format="json")
    earlier = create_key(as_parent, alice, expires_at=(parent_expiry - timedelta(hours=12)).isoformat())

    assert ApiKey.objects.get(prefix=inherited["id"]).expiry_date == parent_expiry
    assert "expires_at must not be later" in assert_error(later, 400, "expires_at")["message"]
    assert ApiKey.objects.get(prefix=earlier["id"]).expiry_date == parent_expiry - timedelta(hours=12)
    assert ApiKey.objects.filter(user=alice).count() == 3


@pytest.mark.django_db(transaction=True)
def test_a_key_created_while_its_parent_is_being_revoked_is_refused(alice):
    """A child key asked for while its parent's revocation is uncommitted waits for it, then is refused (401): no key outlives its parent."""
    import threading

    from django.db import connections, transaction

    from memory.errors import Unauthenticated

    parent, parent_key = api_key_create(scope=KeyScope.USER, user=alice, name="phone")
    creator = tenancy.resolve_key(parent_key)
    outcome = []

    def create_child():
        try:
            outcome.append(api_key_create(scope=KeyScope.USER, user=alice, name="child", created_by=creator))
        except Unauthenticated as exc:
            outcome.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=create_child)
    with transaction.atomic():
        api_key_revoke(api_key=parent)
        thread.start()
        thread.join(timeout=1)
        waited = thread.is_alive()
    thread.join(timeout=30)

    assert waited
    assert len(outcome) == 1 and isinstance(outcome[0], Unauthenticated)
    assert list(ApiKey.objects.filter(user=alice, revoked=False)) == []


def test_a_user_has_at_most_max_api_keys_per_user_live_keys(api, alice, bob, settings):
    """Past MAX_API_KEYS_PER_USER live keys a new one is a 409 naming the limit (REST and create_api_key); revoked and expired keys do not count."""
    settings.MEMFUSE = {**settings.MEMFUSE, "MAX_API_KEYS_PER_USER": 3}
    first = create_key(api, alice)
    create_key(api, alice)
    expiring = create_key(api, alice, expires_at=(timezone.now() + timedelta(days=1)).isoformat())

    refused = api.post(f"/api/v1/users/{alice.pk}/api-keys", {}, format="json")

    assert "MAX_API_KEYS_PER_USER=3" in assert_error(refused, 409, None)["message"]
    with pytest.raises(CommandError, match="MAX_API_KEYS_PER_USER"):
        run("create_api_key", "--tenant", "acme", "--user", "alice")
    create_key(api, bob)  # another user's keys are counted apart
    assert_success(api.delete(f"/api/v1/users/{alice.pk}/api-keys/{first['id']}"))
    create_key(api, alice)  # a revoked key frees its place
    ApiKey.objects.filter(prefix=expiring["id"]).update(expiry_date=timezone.now() - timedelta(seconds=1))
    create_key(api, alice)  # and so does an expired one
    assert ApiKey.objects.filter(user=alice, revoked=False).count() == 4


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limit_per_key_answers_429_with_retry_after(api, tenant, settings):
    """Past API_RATE_LIMIT requests a key gets 429 with Retry-After; another key is counted apart."""
    # Per hour: the window's edge (where the count restarts) falls within the test ~never.
    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "3/hour"}
    for _ in range(3):
        assert_success(api.get("/api/v1/users"))

    response = api.get("/api/v1/users")

    assert_error(response, 429, None)
    assert 0 < int(response["Retry-After"]) <= 3600
    other = key_client(api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="other")[1])
    assert_success(other.get("/api/v1/users"))


def test_the_tenant_rate_limit_counts_every_key_of_the_tenant(api, tenant, alice, settings, globex_api):
    """Past API_TENANT_RATE_LIMIT the tenant's keys, new ones too, get 429 naming it; another tenant and operator keys are not counted."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "4/hour", "API_TENANT_RATE_LIMIT": "6/hour"}
    user_key = key_client(api_key_create(scope=KeyScope.USER, user=alice, name="alice")[1])
    for _ in range(4):
        assert_success(api.get("/api/v1/users"))
    assert_success(user_key.get("/api/v1/users"))
    assert_success(user_key.get("/api/v1/users"))

    refused = user_key.get("/api/v1/users")
    new_key = key_client(api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="new")[1])

    body = assert_error(refused, 429, None)
    assert "API_TENANT_RATE_LIMIT" in body["message"] and 0 < int(refused["Retry-After"]) <= 3600
    assert "API_TENANT_RATE_LIMIT" in assert_error(new_key.get("/api/v1/users"), 429, None)["message"]
    assert_success(globex_api.get("/api/v1/users"))
    _, operator_key = api_key_create(scope=KeyScope.OPERATOR, name="ops")
    for _ in range(4):
        assert_success(key_client(operator_key).get("/api/v1/admin/stats"))


def test_a_key_past_its_own_limit_does_not_use_up_its_tenants_budget(api, tenant, settings):
    """Requests a key's API_RATE_LIMIT refuses (429 naming it) are not counted against API_TENANT_RATE_LIMIT."""
    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "2/hour", "API_TENANT_RATE_LIMIT": "4/hour"}
    for _ in range(2):
        assert_success(api.get("/api/v1/users"))
    for _ in range(5):
        assert "(API_RATE_LIMIT)" in assert_error(api.get("/api/v1/users"), 429, None)["message"]

    other = key_client(api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="other")[1])

    assert_success(other.get("/api/v1/users"))
    assert_success(other.get("/api/v1/users"))


def test_rate_limit_counts_concurrent_requests_of_one_key_exactly(settings):
    """Requests of one key racing from many threads: exactly API_RATE_LIMIT of them pass
    (one counter per key, incremented atomically), whatever the interleaving."""
    import sys
    import threading
    from types import SimpleNamespace

    from memory.api.auth import ApiKeyRateThrottle
    from memory.errors import RateLimited
    from memory.tenancy import Principal

    settings.MEMFUSE = {**settings.MEMFUSE, "API_RATE_LIMIT": "100/hour"}
    request = SimpleNamespace(auth=Principal(key_id=f"race{uuid.uuid4().hex[:8]}", scope="tenant", tenant_id=uuid.uuid4()))
    allowed = []
    start = threading.Barrier(8)

    def allow() -> bool:
        try:
            return ApiKeyRateThrottle().allow_request(request, None)
        except RateLimited:
            return False

    def client():
        start.wait()
        allowed.extend(allow() for _ in range(50))

    threads = [threading.Thread(target=client) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch every few bytecodes: a read-then-write count loses updates
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)

    assert len(allowed) == 400 and allowed.count(True) == 100


# --- commands ------------------------------------------------------------------------------------


def run(command: str, *args) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


def test_create_tenant_prints_a_working_key(db):
    """create_tenant prints a tenant key that the API accepts; --quiet prints only the key."""
    key = run("create_tenant", "initech").strip().splitlines()[-1]
    client = key_client(key)
    assert_success(client.post("/api/v1/users", {"name": "alice"}, format="json"), 201)
    quiet_key = run("create_tenant", "hooli", "--quiet").strip()
    assert assert_success(key_client(quiet_key).get("/api/v1/users"))["users"] == []


@pytest.mark.parametrize("name, message", [("", "name"), ("   ", "name"), ("acme", "already exists")])
def test_create_tenant_rejects_bad_names(tenant, name, message):
    """A blank or taken tenant name is a command error."""
    with pytest.raises(CommandError, match=message):
        run("create_tenant", name)


def test_create_api_key_for_a_tenant_a_user_and_operators(alice, bob):
    """create_api_key prints keys with the asked scope: a user key sees only its user."""
    tenant_key = run("create_api_key", "--tenant", "acme", "--quiet").strip()
    assert len(assert_success(key_client(tenant_key).get("/api/v1/users"))["users"]) == 2
    user_key = run("create_api_key", "--tenant", "acme", "--user", "alice", "--expires-in", "30", "--quiet").strip()
    assert [u["name"] for u in assert_success(key_client(user_key).get("/api/v1/users"))["users"]] == ["alice"]
    assert ApiKey.objects.get(prefix=user_key.split(".")[0]).expiry_date > timezone.now() + timedelta(days=29)
    operator_key = run("create_api_key", "--scope", "operator", "--quiet").strip()
    assert tenancy.resolve_key(operator_key).is_operator


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--tenant is required"),
        (["--tenant", "nobody"], "--tenant: no tenant"),
        (["--tenant", "acme", "--user", "zed"], "--user: tenant 'acme' has no user"),
        (["--scope", "user", "--tenant", "acme"], "--user is required"),
        (["--scope", "operator", "--tenant", "acme"], "operator key belongs to no tenant"),
        (["--scope", "tenant", "--tenant", "acme", "--user", "alice"], "--user: a tenant key"),
        (["--tenant", "acme", "--expires-in", "0"], "--expires-in"),
        (["--tenant", "acme", "--name", "n" * 51], "--name"),
    ],
)
def test_create_api_key_rejects_bad_input(alice, args, message):
    """Missing or unknown owners, a scope that does not fit, a bad expiry or name: clear command errors, no key."""
    with pytest.raises(CommandError, match=message):
        run("create_api_key", *args)
    assert not ApiKey.objects.exists()


def test_services_refuse_a_session_across_tenants(alice, globex_agent):
    """session_create refuses a user and an agent of different tenants, whoever calls it."""
    from memory.errors import NotFound

    with pytest.raises(NotFound):
        session_create(user=alice, agent=globex_agent)
    assert not Session.objects.exists()


def test_embedded_default_creates_the_local_tenant_once(db, settings, tmp_path):
    """On the embedded default the first start creates tenant 'local' and writes a working key (0600); later starts reuse it."""
    from memory.startup import local_tenant_if_embedded

    settings.USING_EMBEDDED_DB = True
    settings.EMBEDDED_PG_DIR = tmp_path

    key_file = local_tenant_if_embedded()
    key = key_file.read_text().strip()

    assert key_file.stat().st_mode & 0o777 == 0o600
    assert assert_success(key_client(key).get("/api/v1/users"))["users"] == []
    assert local_tenant_if_embedded() == key_file and key_file.read_text().strip() == key
    assert ApiKey.objects.filter(tenant__name="local").count() == 1


def test_no_local_tenant_with_a_database_url(db, settings, tmp_path):
    """With DATABASE_URL (not the embedded default) no tenant is created at start."""
    from memory.startup import local_tenant_if_embedded

    settings.USING_EMBEDDED_DB = False
    settings.EMBEDDED_PG_DIR = tmp_path
    assert local_tenant_if_embedded() is None
    assert not ApiKey.objects.exists()
