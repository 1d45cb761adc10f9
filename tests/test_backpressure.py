"""Backpressure: the add's answer says how far behind the user's flush is; past MAX_BACKLOG_MESSAGES of its own a
tenant's adds get 503 with Retry-After (stored rows stay, the flush goes on, other tenants add on); health is
``degraded`` while the flush is behind, and shows no figures."""

# ruff: noqa: F811  (the WebSocket fixtures are imported from test_websocket, then used as arguments)
from __future__ import annotations

import pytest
from django.db import connection

from buffers import backlog
from buffers.services import flush_pending
from memory.errors import Unavailable
from memory.models import Message
from memory.services.messages import MessageIn, messages_add
from tests.envelopes import assert_error, assert_success
from tests.test_websocket import application, connect, receive, return_connections_to_the_pool, stored  # noqa: F401


@pytest.fixture(autouse=True)
def fresh_backlog():
    """Each test reads the backlog afresh (the figure is cached per process for FLUSH_TICK_SECONDS)."""
    backlog.clear_cache()
    yield
    backlog.clear_cache()


@pytest.fixture
def small_backlog(settings):
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": 5, "BACKLOG_RETRY_AFTER_SECONDS": 7}


def add(session, n: int):
    return messages_add(session=session, messages=[MessageIn(role="user", content=f"message {i}") for i in range(n)])


def age_pending(session, seconds: float) -> None:
    """Make the session's pending messages ``seconds`` older, by the database's clock (an add's
    ``now()`` is its transaction's: in a test, the test's, begun before this)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE memory_message SET updated_at = now() - make_interval(secs => %s) WHERE session_id = %s AND flushed_at IS NULL",
            [seconds, session.pk],
        )


def test_the_add_answer_says_how_far_behind_the_users_flush_is(api, alice_session, bob_session):
    """pending_messages and oldest_pending_age_s are the user's: its pending messages and the oldest one's wait (s)."""
    add(alice_session, 2)
    age_pending(alice_session, 30)
    add(bob_session, 1)

    data = assert_success(api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": [{"role": "user", "content": "x"}]}, format="json"), 201)

    assert data["pending_messages"] == 3
    assert 29 < data["oldest_pending_age_s"] < 40  # the add's now() is its transaction's: the test's, begun a moment earlier


@pytest.mark.django_db(transaction=True)
async def test_the_websocket_add_answer_says_it_too(connect, alice_session):
    """messages.added carries oldest_pending_age_s beside pending_messages."""
    from asgiref.sync import sync_to_async

    await sync_to_async(add)(alice_session, 1)
    await sync_to_async(age_pending)(alice_session, 12)
    communicator = await connect(alice_session.pk)
    await communicator.send_json_to({"type": "messages.add", "messages": [{"role": "user", "content": "x"}]})

    frame = await receive(communicator)

    assert frame["pending_messages"] == 2 and 12 <= frame["oldest_pending_age_s"] < 20


def test_past_the_backlog_limit_adds_get_503_with_retry_after_and_store_nothing(api, alice_session, bob_session, small_backlog):
    """At MAX_BACKLOG_MESSAGES pending of the tenant (any of its users), an add is a 503 with Retry-After naming the limit; rows already stored stay."""
    first = add(bob_session, 5)
    backlog.clear_cache()

    response = api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": [{"role": "user", "content": "more"}]}, format="json")

    body = assert_error(response, 503, None)
    assert response["Retry-After"] == "7"
    assert "MAX_BACKLOG_MESSAGES" in body["message"] and "nothing was stored" in body["message"]
    assert not Message.objects.filter(session=alice_session).exists()
    assert set(Message.objects.filter(session=bob_session).values_list("pk", flat=True)) == {m.pk for m in first}
    with pytest.raises(Unavailable):
        add(alice_session, 1)


def test_past_its_backlog_limit_only_that_tenants_adds_are_refused(api, globex_api, alice_session, bob_session, globex_session, small_backlog):
    """Acme at its MAX_BACKLOG_MESSAGES: acme's adds get 503, globex's (another tenant's) are stored."""
    add(bob_session, 5)
    backlog.clear_cache()

    refused = api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": [{"role": "user", "content": "x"}]}, format="json")
    stored = globex_api.post(f"/api/v1/sessions/{globex_session.pk}/messages", {"messages": [{"role": "user", "content": "y"}]}, format="json")

    assert_error(refused, 503, None)
    assert assert_success(stored, 201)["pending_messages"] == 1


def test_an_add_that_would_pass_the_limit_is_refused_whole(alice_session, bob_session, small_backlog):
    """The limit counts the add's own messages: 3 pending and a limit of 5, an add of 3 is refused, one of 2 stored."""
    add(bob_session, 3)
    backlog.clear_cache()

    with pytest.raises(Unavailable):
        add(alice_session, 3)
    assert len(add(alice_session, 2)) == 2


def test_past_the_total_limit_only_tenants_holding_their_share_are_refused(alice_session, globex_session, settings):
    """With the backlog of all tenants at MAX_BACKLOG_MESSAGES_TOTAL, a tenant at or past an equal
    share of it is refused, one below its share is not."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": 0, "MAX_BACKLOG_MESSAGES_TOTAL": 6}
    add(alice_session, 5)
    add(globex_session, 1)
    backlog.clear_cache()

    with pytest.raises(Unavailable, match="MAX_BACKLOG_MESSAGES_TOTAL"):
        add(alice_session, 1)
    assert len(add(globex_session, 2)) == 2  # 1 + 2 pending, within its share of 3


def test_adds_are_accepted_again_once_the_flush_catches_up(api, alice_session, bob_session, small_backlog):
    """After the flush embeds the backlog, the next read of it lets adds in again; everything was embedded once."""
    add(bob_session, 5)
    backlog.clear_cache()
    assert api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": [{"role": "user", "content": "x"}]}, format="json").status_code == 503

    flush_pending(user_id=bob_session.user_id)
    backlog.clear_cache()

    assert_success(api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": [{"role": "user", "content": "x"}]}, format="json"), 201)
    assert list(Message.objects.filter(session=bob_session).values_list("flush_count", flat=True)) == [1] * 5


def test_no_limit_with_max_backlog_zero(alice_session, settings):
    """MAX_BACKLOG_MESSAGES and MAX_BACKLOG_MESSAGES_TOTAL 0 turn the limits off (and the backlog is not read for adds)."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": 0, "MAX_BACKLOG_MESSAGES_TOTAL": 0}

    assert len(add(alice_session, 30)) == 30


@pytest.mark.django_db(transaction=True)
async def test_websocket_add_past_the_limit_gets_a_503_frame(connect, alice_session, bob_session, small_backlog):
    """Over the WebSocket, the refused add is a 503 error frame naming the limit; the socket stays open."""
    from asgiref.sync import sync_to_async

    await sync_to_async(add)(bob_session, 5)
    backlog.clear_cache()
    communicator = await connect(alice_session.pk)
    await communicator.send_json_to({"type": "messages.add", "request_id": 3, "messages": [{"role": "user", "content": "x"}]})

    frame = await receive(communicator)

    assert frame["request_id"] == 3 and frame["error"]["code"] == 503 and "MAX_BACKLOG_MESSAGES" in frame["error"]["message"]
    assert await stored(alice_session) == []


def test_health_is_degraded_while_the_oldest_pending_message_is_older_than_the_threshold(client, alice_session, settings):
    """GET health: ok, then degraded (still 200) once the backlog's oldest message waits past BACKLOG_DEGRADED_SECONDS, ok after the flush."""
    settings.BUFFERS = {**settings.BUFFERS, "BACKLOG_DEGRADED_SECONDS": 60}
    add(alice_session, 3)
    backlog.clear_cache()  # the add read (and cached) the backlog before it stored its rows
    healthy = assert_success(client.get("/api/v1/health"))

    age_pending(alice_session, 90)
    backlog.clear_cache()
    degraded = assert_success(client.get("/api/v1/health"))

    flush_pending(user_id=alice_session.user_id)
    backlog.clear_cache()
    recovered = assert_success(client.get("/api/v1/health"))

    assert [healthy["status"], degraded["status"], recovered["status"]] == ["ok", "degraded", "ok"]


def test_health_is_degraded_when_the_backlog_of_all_tenants_is_at_its_limit(client, alice_session, settings):
    """A backlog at MAX_BACKLOG_MESSAGES_TOTAL is degraded however young it is; one tenant at its own limit is not."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": 5, "MAX_BACKLOG_MESSAGES_TOTAL": 10}
    add(alice_session, 5)
    backlog.clear_cache()
    one_tenant_full = assert_success(client.get("/api/v1/health"))

    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES_TOTAL": 5}
    backlog.clear_cache()
    all_full = assert_success(client.get("/api/v1/health"))

    assert (one_tenant_full["status"], all_full["status"]) == ("ok", "degraded")


def test_health_without_a_key_shows_no_figures(anonymous_api, alice_session):
    """Health answers status, version and database only: the backlog's figures are the operators'."""
    add(alice_session, 3)
    backlog.clear_cache()

    data = assert_success(anonymous_api.get("/api/v1/health"))

    assert set(data) == {"status", "version", "database"}


def test_the_backlog_is_read_at_most_once_per_tick(alice_session, django_assert_num_queries, settings):
    """Adds share one read of the backlog per FLUSH_TICK_SECONDS: the second add pays no query for it."""
    settings.BUFFERS = {**settings.BUFFERS, "TICK_SECONDS": 60}
    with django_assert_num_queries(2):  # the backlog, then the add's one statement
        add(alice_session, 1)
    with django_assert_num_queries(1):
        add(alice_session, 1)
