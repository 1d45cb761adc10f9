"""Time-bounded queries: ``since`` / ``until`` on REST ``users/{id}/query`` and the ``memory.query`` frame.

The window filters by a message's ``created_at`` (set by the add for an imported chat) and a
knowledge item's creation time, inside each retriever before ``top_k`` is cut; both edges
are inclusive; a naive date-time is refused, naming the field.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import channels.testing.application
import pytest
from channels.testing import WebsocketCommunicator
from django.db import close_old_connections

from buffers.services import flush_pending
from memory.models import Knowledge
from memory.services.knowledge import knowledge_add
from memory.services.messages import MessageIn, messages_add
from tests.envelopes import assert_error, assert_success

MARCH_1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
MARCH_8 = MARCH_1 + timedelta(days=7)
MARCH_15 = MARCH_1 + timedelta(days=14)

# The same words in every message, so that each retriever finds all three: only the window
# tells them apart. The newest repeats them: the best match, whatever the window.
PLANS = [
    (MARCH_1, "I planned a trip to Lisbon for the spring holidays."),
    (MARCH_8, "I planned a dentist visit, then a trip to Porto for the holidays."),
    (MARCH_15, "I planned a trip, a trip, a long trip to the mountains for the holidays."),
]
QUERY = "what trip did I plan for the holidays?"

# Each retriever on its own: a filter applied after the fusion's cut would pass a test of the
# fused ranking by luck.
RETRIEVERS = {
    "bm25": {"vector_weight": 0.0},
    "vector": {"bm25_weight": 0.0},
    "hybrid": {},
}


def iso(moment: datetime) -> str:
    return moment.isoformat()


def query(api, user, **body) -> list[dict]:
    data = assert_success(api.post(f"/api/v1/users/{user.pk}/query", {"query": QUERY, "top_k": 10, **body}, format="json"))
    return data["results"]


@pytest.fixture
def plans(alice_session):
    """Alice's three plans, one a week (1, 8 and 15 March 2026, 09:00 UTC), as an imported chat would set them."""
    rows = messages_add(
        session=alice_session, messages=[MessageIn(role="user", content=text, created_at=at) for at, text in PLANS]
    )
    return {at: row for (at, _), row in zip(PLANS, rows)}


def contents(results: list[dict]) -> list[str]:
    return [r["content"] for r in results]


@pytest.mark.django_db
@pytest.mark.parametrize("retrieval", RETRIEVERS.values(), ids=RETRIEVERS.keys())
def test_only_messages_inside_the_window_are_returned(api, alice, plans, retrieval):
    """A window around 8 March returns that week's message only, from each retriever alone and fused."""
    results = query(api, alice, since=iso(MARCH_8 - timedelta(days=1)), until=iso(MARCH_8 + timedelta(days=1)), retrieval=retrieval)

    assert [r["id"] for r in results] == [str(plans[MARCH_8].pk)]
    assert results[0]["created_at"] == MARCH_8.isoformat()


@pytest.mark.django_db
@pytest.mark.parametrize("retrieval", RETRIEVERS.values(), ids=RETRIEVERS.keys())
def test_flushed_messages_are_filtered_by_the_vector_index_too(api, alice, plans, retrieval):
    """Once embedded and indexed (flushed), messages outside the window still stay out."""
    assert flush_pending(user_id=alice.pk) == 3

    results = query(api, alice, until=iso(MARCH_8 - timedelta(seconds=1)), retrieval=retrieval)

    assert [r["id"] for r in results] == [str(plans[MARCH_1].pk)]
    assert results[0]["metadata"]["flushed"] is True


@pytest.mark.django_db
@pytest.mark.parametrize("retrieval", RETRIEVERS.values(), ids=RETRIEVERS.keys())
def test_the_window_applies_before_top_k_is_cut(api, alice, plans, retrieval):
    """top_k=1 with a window around the oldest message: that message, not an empty list.

    Unbounded, the newest message is the best match; a filter applied after the cut would
    have dropped it and returned nothing.
    """
    assert query(api, alice, top_k=1, retrieval=retrieval)[0]["id"] == str(plans[MARCH_15].pk)

    results = query(api, alice, top_k=1, until=iso(MARCH_1 + timedelta(hours=1)), retrieval=retrieval)

    assert [r["id"] for r in results] == [str(plans[MARCH_1].pk)]


@pytest.mark.django_db
def test_the_edges_of_the_window_are_inclusive(api, alice, plans):
    """since and until equal to messages' created_at keep those messages; a microsecond inside drops them."""
    both_edges = query(api, alice, since=iso(MARCH_1), until=iso(MARCH_8))
    assert {r["id"] for r in both_edges} == {str(plans[MARCH_1].pk), str(plans[MARCH_8].pk)}

    one_us = timedelta(microseconds=1)
    inside = query(api, alice, since=iso(MARCH_1 + one_us), until=iso(MARCH_8 - one_us))
    assert inside == []

    single_instant = query(api, alice, since=iso(MARCH_15), until=iso(MARCH_15))
    assert [r["id"] for r in single_instant] == [str(plans[MARCH_15].pk)]


@pytest.mark.django_db
def test_utc_offsets_are_honoured(api, alice, plans):
    """09:00 UTC is 10:00+01:00 and 04:00-05:00: the same edges whatever offset names them."""
    paris = MARCH_8.astimezone(datetime.strptime("+0100", "%z").tzinfo)
    new_york = MARCH_8.astimezone(datetime.strptime("-0500", "%z").tzinfo)
    assert iso(paris) == "2026-03-08T10:00:00+01:00"

    results = query(api, alice, since=iso(paris), until=iso(new_york))
    assert [r["id"] for r in results] == [str(plans[MARCH_8].pk)]

    # "2026-03-08T09:30:00+01:00" is 08:30 UTC: before the message, which is then out.
    assert query(api, alice, until="2026-03-08T09:30:00+01:00", since="2026-03-08T00:00:00Z") == []
    assert len(query(api, alice, until="2026-03-08T09:30:00-01:00", since="2026-03-08T00:00:00Z")) == 1


@pytest.mark.django_db
def test_a_window_with_nothing_in_it_is_an_empty_result(api, alice, plans):
    """A window before the first message answers 200 with no results, not an error."""
    data = assert_success(
        api.post(
            f"/api/v1/users/{alice.pk}/query",
            {"query": QUERY, "since": "2025-01-01T00:00:00Z", "until": "2025-12-31T23:59:59Z"},
            format="json",
        )
    )
    assert data == {"results": [], "total": 0}


@pytest.mark.django_db
def test_knowledge_is_filtered_by_its_creation_time(api, alice, plans):
    """A knowledge item created on 8 March is found in a window around that day, not in one before."""
    (fact,) = knowledge_add(user=alice, contents=["Alice plans every holiday trip with her sister."])
    Knowledge.objects.filter(pk=fact.pk).update(created_at=MARCH_8 + timedelta(hours=2))

    around = query(api, alice, since=iso(MARCH_8 + timedelta(hours=1)), until=iso(MARCH_8 + timedelta(hours=3)))
    assert [(r["id"], r["type"]) for r in around] == [(str(fact.pk), "knowledge")]

    before = query(api, alice, until=iso(MARCH_8 + timedelta(hours=1)))
    assert "knowledge" not in {r["type"] for r in before}
    assert len(before) == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"since": "2026-03-08T09:00:00"}, "since"),
        ({"until": "2026-03-08"}, "until"),
        ({"since": "last week"}, "since"),
        ({"until": 1772960400}, "until"),
        ({"since": "2026-03-09T00:00:00Z", "until": "2026-03-08T00:00:00Z"}, "until"),
    ],
    ids=["naive-since", "date-only-until", "not-a-date", "a-number", "until-before-since"],
)
def test_a_bad_bound_is_a_400_naming_the_field(api, alice, plans, body, field):
    """A naive date-time, a date, text or a number, or until before since: 400 naming the field."""
    response = api.post(f"/api/v1/users/{alice.pk}/query", {"query": QUERY, **body}, format="json")

    body = assert_error(response, 400, field)
    assert [e["field"] for e in body["errors"]] == [field]


@pytest.mark.django_db
def test_the_schema_documents_since_and_until(api):
    """The OpenAPI schema's query body has since and until as nullable, inclusive date-times."""
    schema = api.get("/api/schema/", {"format": "json"}).json()
    properties = schema["components"]["schemas"]["QueryInRequest"]["properties"]
    for name in ("since", "until"):
        assert properties[name]["format"] == "date-time"
        assert properties[name]["nullable"] is True
        assert "inclusive" in properties[name]["description"]


# --- the memory.query frame ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def application(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        from memfuse_project.asgi import application
    return application


@pytest.mark.django_db(transaction=True)
async def test_the_query_frame_takes_since_and_until(application, tenant_key, alice_session, plans, monkeypatch):
    """memory.query with a window: both the partial and the final frame hold only the window's message;
    a naive bound gets a 400 error frame naming the field."""
    # The consumer's threads give back their connections after each frame, as in serving
    # (channels' communicator makes that a no-op; see tests/test_websocket.py).
    monkeypatch.setattr(channels.testing.application, "no_op", close_old_connections)
    communicator = WebsocketCommunicator(
        application,
        f"/ws/v1/sessions/{alice_session.pk}/",
        headers=[(b"origin", b"http://127.0.0.1"), (b"authorization", f"Bearer {tenant_key}".encode())],
    )
    assert (await communicator.connect(timeout=10))[0]
    try:
        await communicator.send_json_to(
            {"type": "memory.query", "query": QUERY, "since": "2026-03-08T10:00:00+01:00", "until": iso(MARCH_8), "request_id": 1}
        )
        frames = [await communicator.receive_json_from(timeout=10) for _ in range(2)]
        assert [f["stage"] for f in frames] == ["partial", "final"]
        for frame in frames:
            assert [r["id"] for r in frame["results"]] == [str(plans[MARCH_8].pk)]

        await communicator.send_json_to({"type": "memory.query", "query": QUERY, "since": "2026-03-08T10:00:00", "request_id": 2})
        error = await communicator.receive_json_from(timeout=10)
        assert error["type"] == "error" and error["request_id"] == 2
        assert error["error"]["code"] == 400
        assert [e["field"] for e in error["error"]["errors"]] == ["since"]
    finally:
        await communicator.disconnect()
