"""A user's knowledge items through the REST API: add, list, read, update, delete, and bad input."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings

from memory.models import Knowledge
from tests.envelopes import assert_error, assert_success

pytestmark = pytest.mark.django_db

KNOWLEDGE_KEYS = {"id", "user_id", "content", "metadata", "created_at", "updated_at"}


def knowledge_url(user_id) -> str:
    return f"/api/v1/users/{user_id}/knowledge"


def add(api, user_id, contents: list[str]) -> list[str]:
    response = api.post(knowledge_url(user_id), {"knowledge": contents}, format="json")
    return assert_success(response, 201)["knowledge_ids"]


@pytest.fixture
def alice_knowledge(api, alice) -> list[str]:
    return add(api, alice.pk, ["Alice is vegetarian.", "Alice speaks Portuguese.", "Alice was born in 1990."])


def test_add_returns_ids_in_input_order(api, alice):
    """POST answers 201 with data.knowledge_ids in input order; rows are stored embedded."""
    ids = add(api, alice.pk, ["first fact", "second fact"])

    rows = [Knowledge.objects.get(pk=i) for i in ids]
    assert [r.content for r in rows] == ["first fact", "second fact"]
    assert all(r.user_id == alice.pk and r.embedding is not None and len(r.embedding) == 384 for r in rows)


def test_list_returns_the_users_items_oldest_first(api, alice, bob, alice_knowledge):
    """GET lists the user's items, oldest first, and none of another user's."""
    add(api, bob.pk, ["Bob keeps bees."])

    items = assert_success(api.get(knowledge_url(alice.pk)))["knowledge"]

    assert [i["id"] for i in items] == alice_knowledge
    assert all(set(i) == KNOWLEDGE_KEYS and i["user_id"] == str(alice.pk) for i in items)


def test_read_returns_items_in_the_order_asked(api, alice, alice_knowledge):
    """POST .../knowledge/read answers the items in the order of knowledge_ids."""
    asked = [alice_knowledge[2], alice_knowledge[0]]

    items = assert_success(api.post(f"{knowledge_url(alice.pk)}/read", {"knowledge_ids": asked}, format="json"))[
        "knowledge"
    ]

    assert [i["id"] for i in items] == asked
    assert [i["content"] for i in items] == ["Alice was born in 1990.", "Alice is vegetarian."]


def test_update_replaces_content_and_reembeds(api, alice, alice_knowledge):
    """PUT replaces the content and its embedding: a query finds the new content."""
    target = alice_knowledge[1]

    data = assert_success(
        api.put(
            knowledge_url(alice.pk),
            {"knowledge_ids": [target], "new_knowledge": ["Alice plays the cello in an orchestra."]},
            format="json",
        )
    )

    assert data == {"knowledge_ids": [target]}
    assert Knowledge.objects.get(pk=target).content == "Alice plays the cello in an orchestra."
    results = assert_success(
        api.post(f"/api/v1/users/{alice.pk}/query", {"query": "musical instrument cello", "top_k": 1}, format="json")
    )["results"]
    assert results[0]["id"] == target
    assert results[0]["metadata"]["retrievers"]["vector"]["rank"] == 1


def test_delete_removes_only_the_given_items(api, alice, alice_knowledge):
    """DELETE with a JSON body removes the given items and keeps the others."""
    data = assert_success(api.delete(knowledge_url(alice.pk), {"knowledge_ids": alice_knowledge[:2]}, format="json"))

    assert data == {"knowledge_ids": alice_knowledge[:2]}
    assert [str(pk) for pk in Knowledge.objects.values_list("pk", flat=True)] == [alice_knowledge[2]]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param({"knowledge": []}, "knowledge", id="empty-list"),
        pytest.param({}, "knowledge", id="missing"),
        pytest.param({"knowledge": "Alice is tall."}, "knowledge", id="string-not-list"),
        pytest.param({"knowledge": ["ok", 7]}, "knowledge[1]", id="non-string-item"),
        pytest.param({"knowledge": [""]}, "knowledge[0]", id="blank-item"),
        pytest.param({"knowledge": ["x" * (settings.MEMFUSE["MAX_MESSAGE_CHARS"] + 1)]}, "knowledge[0]", id="too-long"),
        pytest.param(["Alice is tall."], None, id="body-is-list"),
    ],
)
def test_add_with_bad_input_is_400_and_stores_nothing(api, alice, alice_knowledge, body, field):
    """A bad add is a 400 naming the offending field, and no item of it is stored."""
    before = Knowledge.objects.count()

    assert_error(api.post(knowledge_url(alice.pk), body, format="json"), 400, field)
    assert Knowledge.objects.count() == before


def test_unknown_id_is_404_naming_knowledge_ids(api, alice, alice_knowledge):
    """Read, update and delete with an id that is not the user's answer 404 naming "knowledge_ids"; nothing changes."""
    before = {k.pk: k.content for k in Knowledge.objects.all()}
    ids = [alice_knowledge[0], str(uuid.uuid4())]

    read = api.post(f"{knowledge_url(alice.pk)}/read", {"knowledge_ids": ids}, format="json")
    update = api.put(knowledge_url(alice.pk), {"knowledge_ids": ids, "new_knowledge": ["a", "b"]}, format="json")
    delete = api.delete(knowledge_url(alice.pk), {"knowledge_ids": ids}, format="json")

    for response in (read, update, delete):
        body = assert_error(response, 404, "knowledge_ids")
        assert ids[1] in body["message"]
    assert {k.pk: k.content for k in Knowledge.objects.all()} == before


def test_other_users_item_is_404(api, alice, bob, alice_knowledge):
    """Bob's item cannot be read, updated or deleted through alice's URL."""
    [bobs] = add(api, bob.pk, ["Bob keeps bees."])

    assert_error(
        api.post(f"{knowledge_url(alice.pk)}/read", {"knowledge_ids": [bobs]}, format="json"), 404, "knowledge_ids"
    )
    assert_error(
        api.put(knowledge_url(alice.pk), {"knowledge_ids": [bobs], "new_knowledge": ["hacked"]}, format="json"),
        404,
        "knowledge_ids",
    )
    assert_error(api.delete(knowledge_url(alice.pk), {"knowledge_ids": [bobs]}, format="json"), 404, "knowledge_ids")
    assert Knowledge.objects.get(pk=bobs).content == "Bob keeps bees."


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param(
            lambda ids: {"knowledge_ids": ids[:2], "new_knowledge": ["one"]}, "new_knowledge", id="mismatched"
        ),
        pytest.param(
            lambda ids: {"knowledge_ids": [ids[0], ids[0]], "new_knowledge": ["a", "b"]},
            "knowledge_ids",
            id="duplicates",
        ),
        pytest.param(
            lambda ids: {"knowledge_ids": ["nope"], "new_knowledge": ["a"]}, "knowledge_ids[0]", id="not-uuid"
        ),
        pytest.param(lambda ids: {"knowledge_ids": ids[:1], "new_knowledge": [3]}, "new_knowledge[0]", id="non-string"),
    ],
)
def test_update_with_bad_input_is_400_and_changes_nothing(api, alice, alice_knowledge, body, field):
    """A malformed update is a 400 naming the field; no item changes."""
    before = {k.pk: k.content for k in Knowledge.objects.all()}

    assert_error(api.put(knowledge_url(alice.pk), body(alice_knowledge), format="json"), 400, field)
    assert {k.pk: k.content for k in Knowledge.objects.all()} == before


@pytest.mark.parametrize("user_id", [str(uuid.uuid4()), "alice"], ids=["unknown-uuid", "not-uuid"])
def test_unknown_user_is_404(api, db, user_id):
    """Every knowledge route answers 404 naming "user_id" for an unknown user."""
    assert_error(api.get(knowledge_url(user_id)), 404, "user_id")
    assert_error(api.post(knowledge_url(user_id), {"knowledge": ["x"]}, format="json"), 404, "user_id")
    assert not Knowledge.objects.exists()
