"""Messages of a session through the REST API: add, list, read, update, delete, and bad input."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from django.contrib.postgres.search import SearchQuery

from buffers.services import flush_pending
from memory.models import Message
from tests.envelopes import assert_error, assert_success

pytestmark = pytest.mark.django_db

MESSAGE_KEYS = {"id", "session_id", "role", "content", "metadata", "position", "flushed", "created_at", "updated_at"}


def messages_url(session_id) -> str:
    return f"/api/v1/sessions/{session_id}/messages"


def query(api, user_id, text: str, top_k: int = 5) -> list[dict]:
    response = api.post(f"/api/v1/users/{user_id}/query", {"query": text, "top_k": top_k}, format="json")
    return assert_success(response)["results"]


# --- add ---------------------------------------------------------------------------------------


def test_add_returns_ids_in_input_order(api, alice_session):
    """POST answers 201 with data.message_ids in input order; rows get positions 0..n-1."""
    batch = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second", "metadata": {"mood": "calm"}},
        {"role": "system", "content": "third"},
    ]

    data = assert_success(api.post(messages_url(alice_session.pk), {"messages": batch}, format="json"), 201)

    assert set(data) == {"message_ids", "pending_messages", "oldest_pending_age_s"}
    assert data["pending_messages"] == 3
    assert data["oldest_pending_age_s"] == 0.0  # none of alice's messages was pending before
    rows = [Message.objects.get(pk=message_id) for message_id in data["message_ids"]]
    assert [(r.role, r.content, r.position) for r in rows] == [
        ("user", "first", 0),
        ("assistant", "second", 1),
        ("system", "third", 2),
    ]
    assert rows[1].metadata == {"mood": "calm"}
    assert all(r.session_id == alice_session.pk and r.user_id == alice_session.user_id for r in rows)
    # Write-behind: stored now, embedded by a flush.
    assert all(r.flushed_at is None and r.embedding is None for r in rows)
    assert flush_pending(user_id=alice_session.user_id) == 3
    for r in rows:
        r.refresh_from_db()
    assert all(r.flushed_at is not None and len(r.embedding) == 384 and r.flush_count == 1 for r in rows)


def test_positions_continue_across_batches(api, alice_session, alice_messages):
    """A second batch continues the session's positions after the first (3, 4 after 0..2)."""
    batch = [{"role": "user", "content": "later"}, {"role": "assistant", "content": "even later"}]

    ids = assert_success(api.post(messages_url(alice_session.pk), {"messages": batch}, format="json"), 201)[
        "message_ids"
    ]

    assert [m.position for m in alice_messages] == [0, 1, 2]
    assert [Message.objects.get(pk=i).position for i in ids] == [3, 4]


@pytest.mark.django_db(transaction=True)
def test_concurrent_adds_to_one_session_get_distinct_consecutive_positions(alice_session):
    """Adds racing on one session (8 threads x 5 rounds) take disjoint positions 0..79, in order within each add."""
    import threading

    from django.db import connection

    from memory.services.messages import MessageIn, messages_add

    barrier = threading.Barrier(8)
    added = []

    def writer(index: int) -> None:
        barrier.wait()
        try:
            for round_index in range(5):
                rows = messages_add(
                    session=alice_session,
                    messages=[MessageIn(role="user", content=f"w{index} r{round_index} q"), MessageIn(role="assistant", content=f"w{index} r{round_index} a")],
                )
                added.append([row.position for row in rows])
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(b == a + 1 for a, b in added)  # one add's messages are adjacent and in input order
    stored = sorted(Message.objects.filter(session=alice_session).values_list("position", flat=True))
    assert stored == list(range(80)) == sorted(p for pair in added for p in pair)


def test_add_to_a_session_deleted_meanwhile_is_404_and_stores_nothing(alice_session):
    """The add's single statement finds no session row: NotFound naming session_id, no message stored."""
    from memory.errors import NotFound
    from memory.models import Session
    from memory.services.messages import MessageIn, messages_add

    Session.objects.filter(pk=alice_session.pk).delete()  # the caller still holds the old object
    with pytest.raises(NotFound) as raised:
        messages_add(session=alice_session, messages=[MessageIn(role="user", content="too late")])
    assert raised.value.errors[0]["field"] == "session_id"
    assert not Message.objects.filter(content="too late").exists()


def test_add_stores_name_as_speaker_and_given_created_at(api, alice_session):
    """The OpenAI ``name`` field becomes metadata.speaker; an explicit created_at is kept."""
    batch = [{"role": "user", "content": "hello", "name": "Alice", "created_at": "2023-05-01T10:00:00Z"}]

    ids = assert_success(api.post(messages_url(alice_session.pk), {"messages": batch}, format="json"), 201)[
        "message_ids"
    ]

    row = Message.objects.get(pk=ids[0])
    assert row.metadata == {"speaker": "Alice"}
    assert row.index_text == "Alice: hello"
    assert row.created_at.isoformat() == "2023-05-01T10:00:00+00:00"


# --- list and read -----------------------------------------------------------------------------


@pytest.fixture
def six_messages(api, alice_session, alice_messages):
    """alice's session with positions 0..2 (fixture batch, flushed) and 3..5 (a later batch, pending)."""
    flush_pending(user_id=alice_session.user_id)
    batch = [{"role": "user", "content": f"later {i}"} for i in range(3)]
    assert_success(api.post(messages_url(alice_session.pk), {"messages": batch}, format="json"), 201)
    return alice_session


@pytest.mark.parametrize(
    "params, positions",
    [
        ("", [5, 4, 3, 2, 1, 0]),
        ("?limit=2", [5, 4]),
        ("?limit=2&order=desc", [5, 4]),
        ("?limit=4&order=asc", [0, 1, 2, 3]),
        ("?limit=20&sort_by=timestamp&order=desc", [5, 4, 3, 2, 1, 0]),
        ("?sort_by=position&order=asc&limit=3", [0, 1, 2]),
        ("?buffer_only=false&limit=2", [2, 1]),
        ("?buffer_only=true", [5, 4, 3]),
    ],
)
def test_list_respects_limit_and_order(api, six_messages, params, positions):
    """GET lists newest first by default; limit caps it and order=asc gives oldest first."""
    data = assert_success(api.get(f"{messages_url(six_messages.pk)}{params}"))

    assert [m["position"] for m in data["messages"]] == positions
    assert all(set(m) == MESSAGE_KEYS for m in data["messages"])
    assert all(m["session_id"] == str(six_messages.pk) for m in data["messages"])


def test_list_marks_flushed_messages(api, six_messages):
    """Each listed message says whether it is flushed; buffer_only=true lists only the pending ones."""
    listed = assert_success(api.get(f"{messages_url(six_messages.pk)}?limit=10"))["messages"]
    assert [(m["position"], m["flushed"]) for m in listed] == [(5, False), (4, False), (3, False), (2, True), (1, True), (0, True)]

    flush_pending(user_id=six_messages.user_id)
    assert assert_success(api.get(f"{messages_url(six_messages.pk)}?buffer_only=true")) == {"messages": []}


@pytest.mark.parametrize(
    "params, field",
    [("?limit=0", "limit"), ("?limit=abc", "limit"), ("?order=sideways", "order"), ("?sort_by=mood", "sort_by")],
)
def test_list_with_bad_parameter_is_400(api, alice_session, params, field):
    """A bad list parameter is a 400 naming it."""
    assert_error(api.get(f"{messages_url(alice_session.pk)}{params}"), 400, field)


def test_list_of_other_session_only(api, alice_session, alice_messages, bob_messages):
    """A session's list never includes another session's messages."""
    data = assert_success(api.get(messages_url(alice_session.pk)))

    assert {m["id"] for m in data["messages"]} == {str(m.pk) for m in alice_messages}


def test_read_returns_messages_in_the_order_asked(api, alice_session, alice_messages):
    """POST .../messages/read answers the messages in the order of message_ids."""
    asked = [str(alice_messages[2].pk), str(alice_messages[0].pk)]

    data = assert_success(api.post(f"{messages_url(alice_session.pk)}/read", {"message_ids": asked}, format="json"))

    assert [m["id"] for m in data["messages"]] == asked
    assert data["messages"][0]["content"] == alice_messages[2].content


def test_read_of_unknown_id_is_404(api, alice_session, alice_messages, bob_messages):
    """Reading an id that is not in the session (here bob's) is a 404 naming "message_ids"."""
    asked = [str(alice_messages[0].pk), str(bob_messages[0].pk)]

    body = assert_error(
        api.post(f"{messages_url(alice_session.pk)}/read", {"message_ids": asked}, format="json"),
        404,
        "message_ids",
    )
    assert str(bob_messages[0].pk) in body["message"]


# --- update and delete -------------------------------------------------------------------------


def test_update_replaces_content_and_reembeds(api, alice, alice_session, alice_messages):
    """PUT replaces role/content/metadata and re-embeds: queries find the new content, not the old."""
    target = alice_messages[0]
    new = {"role": "assistant", "content": "I bought a red kayak to paddle on the river.", "metadata": {"v": 2}}

    data = assert_success(
        api.put(
            messages_url(alice_session.pk),
            {"message_ids": [str(target.pk)], "new_messages": [new]},
            format="json",
        )
    )

    assert data == {"message_ids": [str(target.pk)]}
    row = Message.objects.get(pk=target.pk)
    assert (row.role, row.content, row.metadata, row.position) == ("assistant", new["content"], {"v": 2}, 0)
    assert Message.objects.filter(session=alice_session).count() == 3
    # Vector rank 1 shows the stored embedding is the new content's, not only the full-text column.
    kayak = query(api, alice.pk, "kayak paddling on a river", top_k=1)[0]
    assert kayak["id"] == str(target.pk)
    assert kayak["content"] == new["content"]
    assert kayak["metadata"]["retrievers"]["vector"]["rank"] == 1
    puppy = query(api, alice.pk, "adopted golden retriever puppy", top_k=3)
    assert puppy[0]["id"] == str(alice_messages[1].pk)
    # The old words are no longer in the message's own full-text index (its BM25 document
    # still carries its neighbours' words, "Golden retrievers" among them).
    assert not Message.objects.filter(pk=target.pk, search_vector=SearchQuery("adopted puppy", config="english")).exists()
    assert Message.objects.filter(pk=target.pk, search_vector=SearchQuery("kayak river", config="english")).exists()


def test_update_with_unknown_id_is_404_and_changes_nothing(api, alice_session, alice_messages):
    """An update naming an id outside the session is a 404 naming "message_ids"; no message changes."""
    before = {m.pk: (m.content, m.updated_at) for m in Message.objects.all()}
    body = {
        "message_ids": [str(alice_messages[0].pk), str(uuid.uuid4())],
        "new_messages": [{"role": "user", "content": "changed"}, {"role": "user", "content": "changed too"}],
    }

    assert_error(api.put(messages_url(alice_session.pk), body, format="json"), 404, "message_ids")
    assert {m.pk: (m.content, m.updated_at) for m in Message.objects.all()} == before


@pytest.mark.parametrize(
    "make_body, field",
    [
        (lambda ids: {"message_ids": ids[:2], "new_messages": [{"role": "user", "content": "x"}]}, "new_messages"),
        (lambda ids: {"message_ids": ids[:1], "new_messages": []}, "new_messages"),
        (
            lambda ids: {"message_ids": [ids[0], ids[0]], "new_messages": [{"role": "user", "content": "x"}] * 2},
            "message_ids",
        ),
        (
            lambda ids: {"message_ids": ids[:1], "new_messages": [{"role": "robot", "content": "x"}]},
            "new_messages[0].role",
        ),
        (lambda ids: {"new_messages": [{"role": "user", "content": "x"}]}, "message_ids"),
    ],
    ids=["mismatched-lengths", "empty-new", "duplicate-ids", "bad-role", "no-ids"],
)
def test_update_with_bad_input_is_400_and_changes_nothing(api, alice_session, alice_messages, make_body, field):
    """A malformed update (lengths differ, duplicate ids, bad message) is a 400 naming the field."""
    ids = [str(m.pk) for m in alice_messages]
    before = {m.pk: m.content for m in Message.objects.all()}

    assert_error(api.put(messages_url(alice_session.pk), make_body(ids), format="json"), 400, field)
    assert {m.pk: m.content for m in Message.objects.all()} == before


def test_delete_removes_only_the_given_messages(api, alice_session, alice_messages):
    """DELETE with a JSON body removes the given messages and keeps the others."""
    gone = [str(alice_messages[0].pk), str(alice_messages[2].pk)]

    data = assert_success(api.delete(messages_url(alice_session.pk), {"message_ids": gone}, format="json"))

    assert data == {"message_ids": gone}
    assert list(Message.objects.filter(session=alice_session).values_list("pk", flat=True)) == [alice_messages[1].pk]


def test_delete_of_other_sessions_id_is_404_and_deletes_nothing(api, alice_session, alice_messages, bob_messages):
    """Deleting a batch that holds another session's id is a 404 naming "message_ids" and deletes none of it."""
    body = {"message_ids": [str(alice_messages[0].pk), str(bob_messages[0].pk)]}

    assert_error(api.delete(messages_url(alice_session.pk), body, format="json"), 404, "message_ids")
    assert Message.objects.count() == len(alice_messages) + len(bob_messages)


@pytest.mark.parametrize(
    "body, field",
    [({"message_ids": []}, "message_ids"), ({"message_ids": ["nope"]}, "message_ids[0]"), ({}, "message_ids")],
    ids=["empty", "not-uuid", "missing"],
)
def test_delete_with_bad_ids_is_400(api, alice_session, alice_messages, body, field):
    """A delete without a list of UUIDs is a 400 naming the field; nothing is deleted."""
    assert_error(api.delete(messages_url(alice_session.pk), body, format="json"), 400, field)
    assert Message.objects.count() == len(alice_messages)


# --- bad input on add --------------------------------------------------------------------------

OK = {"role": "user", "content": "fine"}


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param({"messages": []}, "messages", id="empty-batch"),
        pytest.param(None, "messages", id="no-body"),
        pytest.param([OK], None, id="body-is-list"),
        pytest.param({"messages": "hello"}, "messages", id="messages-not-list"),
        pytest.param({"messages": [{"role": "user", "content": 123}]}, "messages[0].content", id="content-int"),
        pytest.param({"messages": [{"role": "user"}]}, "messages[0].content", id="content-missing"),
        pytest.param({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role", id="role-robot"),
        pytest.param({"messages": [{"content": "who"}]}, "messages[0].role", id="role-missing"),
        pytest.param({"messages": [{**OK, "metadata": "x"}]}, "messages[0].metadata", id="metadata-str"),
        pytest.param(
            {"messages": [{**OK, "metadata": {"image_caption": 5}}]},
            "messages[0].metadata.image_caption",
            id="caption-int",
        ),
        pytest.param({"messages": [OK, {"role": "robot", "content": "x"}]}, "messages[1].role", id="second-bad"),
        pytest.param({"messages": [OK, OK, "just text"]}, "messages[2]", id="third-not-object"),
        pytest.param({"messages": [{**OK, "created_at": "yesterday"}]}, "messages[0].created_at", id="bad-date"),
    ],
)
def test_add_with_bad_input_is_400_and_stores_nothing(api, alice_session, alice_messages, body, field):
    """A bad batch is a 400 naming the offending field, and no message of it is stored."""
    before = Message.objects.count()

    assert_error(api.post(messages_url(alice_session.pk), body, format="json"), 400, field)
    assert Message.objects.count() == before


def test_add_oversized_content_is_400_and_stores_nothing(api, alice_session, alice_messages):
    """Content one character over MAX_MESSAGE_CHARS is a 400 naming it; the batch is not stored."""
    before = Message.objects.count()
    too_long = "a" * (settings.MEMFUSE["MAX_MESSAGE_CHARS"] + 1)
    body = {"messages": [OK, {"role": "user", "content": too_long}]}

    assert_error(api.post(messages_url(alice_session.pk), body, format="json"), 400, "messages[1].content")
    assert Message.objects.count() == before


def test_add_content_at_the_limit_is_accepted(api, alice_session):
    """Content of exactly MAX_MESSAGE_CHARS characters is stored."""
    at_limit = "a" * settings.MEMFUSE["MAX_MESSAGE_CHARS"]

    response = api.post(
        messages_url(alice_session.pk), {"messages": [{"role": "user", "content": at_limit}]}, format="json"
    )

    assert_success(response, 201)
    assert Message.objects.get(session=alice_session).content == at_limit


def test_add_malformed_json_is_400_and_stores_nothing(api, alice_session, alice_messages):
    """A body that is not valid JSON is a 400 about the request as a whole."""
    before = Message.objects.count()

    response = api.post(messages_url(alice_session.pk), data='{"messages": [', content_type="application/json")

    assert_error(response, 400, None)
    assert Message.objects.count() == before


@pytest.mark.parametrize("session_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown-uuid", "not-uuid"])
@pytest.mark.parametrize("method, suffix", [("post", ""), ("get", ""), ("put", ""), ("delete", ""), ("post", "/read")])
def test_unknown_session_is_404_and_stores_nothing(api, alice_messages, session_id, method, suffix):
    """Every messages route answers 404 naming "session_id" for an unknown or malformed session id."""
    before = Message.objects.count()
    ids = [str(alice_messages[0].pk)]
    body = {
        "messages": [OK],
        "message_ids": ids,
        "new_messages": [OK],
    }

    assert_error(getattr(api, method)(f"{messages_url(session_id)}{suffix}", body, format="json"), 404, "session_id")
    assert Message.objects.count() == before
    assert Message.objects.get(pk=alice_messages[0].pk).content == alice_messages[0].content


def test_add_with_a_whitespace_only_name_stores_no_speaker(api, alice_session):
    """A blank name (whitespace only, as a fuzzer sent: U+0085) is no speaker, not a 400."""
    body = {"messages": [{"role": "user", "content": "hello there", "name": "\u0085 "}]}
    response = api.post(messages_url(alice_session.pk), body, format="json")
    [message_id] = assert_success(response, code=201)["message_ids"]
    message = Message.objects.get(pk=message_id)
    assert "speaker" not in message.metadata and message.index_text == "hello there"
