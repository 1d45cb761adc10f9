"""Users, agents and sessions through the REST API: CRUD, name lookups, conflicts and routing."""

from __future__ import annotations

import re
import uuid

import pytest

from memory.models import Agent, Session, User
from tests.envelopes import assert_error, assert_success

pytestmark = pytest.mark.django_db

NAMED_KEYS = {"id", "name", "description", "metadata", "created_at", "updated_at"}
SESSION_KEYS = {"id", "name", "user_id", "agent_id", "metadata", "created_at", "updated_at"}

# Users and agents have the same API: (collection path segment, singular key, model).
RESOURCES = [
    pytest.param("users", "user", User, id="users"),
    pytest.param("agents", "agent", Agent, id="agents"),
]


# --- users and agents --------------------------------------------------------------------------


@pytest.mark.parametrize("collection, key, model", RESOURCES)
@pytest.mark.parametrize("slash", ["", "/"], ids=["no-slash", "slash"])
def test_create_returns_201_envelope(api, collection, key, model, slash):
    """POST /{collection} answers 201 with data.{key} holding the stored row, with or without a slash."""
    response = api.post(
        f"/api/v1/{collection}{slash}",
        {"name": "carol", "description": "a tester", "metadata": {"plan": "pro"}},
        format="json",
    )

    data = assert_success(response, 201)
    assert set(data) == {key}
    item = data[key]
    assert set(item) == NAMED_KEYS
    assert item["name"] == "carol"
    assert item["description"] == "a tester"
    assert item["metadata"] == {"plan": "pro"}
    row = model.objects.get(pk=uuid.UUID(item["id"]))
    assert row.name == "carol"


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_create_with_null_description_stores_empty(api, collection, key, model):
    """The memfuse client sends description null; it is stored as the empty string."""
    response = api.post(f"/api/v1/{collection}", {"name": "carol", "description": None}, format="json")

    item = assert_success(response, 201)[key]
    assert item["description"] == ""
    assert model.objects.get(pk=item["id"]).description == ""


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_create_duplicate_name_is_409_naming_name(api, collection, key, model):
    """A second create with a taken name is 409 naming field "name", and stores nothing."""
    assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)

    response = api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json")

    assert_error(response, 409, "name")
    assert model.objects.filter(name="carol").count() == 1


@pytest.mark.parametrize("collection, key, model", RESOURCES)
@pytest.mark.parametrize(
    "body", [{}, {"name": ""}, {"name": 123}, {"name": None}], ids=["missing", "blank", "int", "null"]
)
def test_create_without_valid_name_is_400(api, collection, key, model, body):
    """Create needs a non-empty string name: otherwise 400 naming "name" and nothing stored."""
    before = model.objects.count()

    response = api.post(f"/api/v1/{collection}", body, format="json")

    assert_error(response, 400, "name")
    assert model.objects.count() == before


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_list_returns_all_oldest_first(api, collection, key, model):
    """GET /{collection} without a name lists every row, oldest first."""
    for name in ["first", "second", "third"]:
        assert_success(api.post(f"/api/v1/{collection}", {"name": name}, format="json"), 201)

    data = assert_success(api.get(f"/api/v1/{collection}"))

    assert [item["name"] for item in data[collection]] == ["first", "second", "third"]


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_name_lookup_returns_the_match(api, collection, key, model):
    """GET /{collection}?name=X answers 200 with exactly that row at data.{collection}[0]."""
    created = assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)[key]
    assert_success(api.post(f"/api/v1/{collection}", {"name": "dave"}, format="json"), 201)

    data = assert_success(api.get(f"/api/v1/{collection}?name=carol"))

    assert [item["id"] for item in data[collection]] == [created["id"]]


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_name_lookup_without_match_is_404_naming_name(api, collection, key, model):
    """GET /{collection}?name=X with no such row is a 404 naming "name" (the client's get-or-create needs it)."""
    assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)

    assert_error(api.get(f"/api/v1/{collection}?name=nobody"), 404, "name")


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_get_by_id(api, collection, key, model):
    """GET /{collection}/{id} answers the row; the trailing slash is optional."""
    created = assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)[key]

    for path in [f"/api/v1/{collection}/{created['id']}", f"/api/v1/{collection}/{created['id']}/"]:
        assert assert_success(api.get(path))[key] == created


@pytest.mark.parametrize("collection, key, model", RESOURCES)
@pytest.mark.parametrize("bad_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown-uuid", "not-uuid"])
def test_get_unknown_id_is_404_naming_id(api, collection, key, model, bad_id):
    """GET of an unknown or malformed id is a 404 naming "{key}_id"."""
    assert_error(api.get(f"/api/v1/{collection}/{bad_id}"), 404, f"{key}_id")


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_update_changes_given_fields_only(api, collection, key, model):
    """PUT changes the non-null fields; null fields (the client always sends both) stay as they were."""
    created = assert_success(
        api.post(f"/api/v1/{collection}", {"name": "carol", "description": "old"}, format="json"), 201
    )[key]

    renamed = assert_success(
        api.put(f"/api/v1/{collection}/{created['id']}", {"name": "caroline", "description": None}, format="json")
    )[key]
    described = assert_success(
        api.put(f"/api/v1/{collection}/{created['id']}", {"name": None, "description": "new"}, format="json")
    )[key]

    assert (renamed["name"], renamed["description"]) == ("caroline", "old")
    assert (described["name"], described["description"]) == ("caroline", "new")
    row = model.objects.get(pk=created["id"])
    assert (row.name, row.description) == ("caroline", "new")


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_update_to_taken_name_is_409_and_changes_nothing(api, collection, key, model):
    """Renaming to another row's name is a 409 naming "name"; the row keeps its name."""
    carol = assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)[key]
    assert_success(api.post(f"/api/v1/{collection}", {"name": "dave"}, format="json"), 201)

    response = api.put(f"/api/v1/{collection}/{carol['id']}", {"name": "dave", "description": None}, format="json")

    assert_error(response, 409, "name")
    assert model.objects.get(pk=carol["id"]).name == "carol"


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_update_unknown_id_is_404(api, collection, key, model):
    """PUT of an unknown id is a 404 naming "{key}_id"."""
    response = api.put(f"/api/v1/{collection}/{uuid.uuid4()}", {"name": "x"}, format="json")

    assert_error(response, 404, f"{key}_id")


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_delete_removes_the_row(api, collection, key, model):
    """DELETE answers 200 with the id; the row is gone and a later GET is 404."""
    created = assert_success(api.post(f"/api/v1/{collection}", {"name": "carol"}, format="json"), 201)[key]

    data = assert_success(api.delete(f"/api/v1/{collection}/{created['id']}"))

    assert data == {f"{key}_id": created["id"]}
    assert not model.objects.filter(pk=created["id"]).exists()
    assert_error(api.get(f"/api/v1/{collection}/{created['id']}"), 404, f"{key}_id")


@pytest.mark.parametrize("collection, key, model", RESOURCES)
def test_delete_unknown_id_is_404(api, collection, key, model):
    """DELETE of an unknown id is a 404 naming "{key}_id"."""
    assert_error(api.delete(f"/api/v1/{collection}/{uuid.uuid4()}"), 404, f"{key}_id")


# --- sessions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slash", ["", "/"], ids=["no-slash", "slash"])
def test_session_create_returns_201_envelope(api, alice, agent, slash):
    """POST /sessions answers 201 with data.session naming its user and agent."""
    response = api.post(
        f"/api/v1/sessions{slash}",
        {"user_id": str(alice.pk), "agent_id": str(agent.pk), "name": "morning", "metadata": {"topic": "dogs"}},
        format="json",
    )

    session = assert_success(response, 201)["session"]
    assert set(session) == SESSION_KEYS
    assert session["name"] == "morning"
    assert session["user_id"] == str(alice.pk)
    assert session["agent_id"] == str(agent.pk)
    assert session["metadata"] == {"topic": "dogs"}
    assert Session.objects.get(pk=session["id"]).user_id == alice.pk


@pytest.mark.parametrize("body", [{"name": None}, {}], ids=["null-name", "no-name"])
def test_session_create_without_name_generates_one(api, alice, agent, body):
    """A session created with a null or missing name gets a generated "session-<12 hex>" name."""
    response = api.post(
        "/api/v1/sessions", {"user_id": str(alice.pk), "agent_id": str(agent.pk), **body}, format="json"
    )

    session = assert_success(response, 201)["session"]
    assert re.fullmatch(r"session-[0-9a-f]{12}", session["name"])
    assert Session.objects.get(pk=session["id"]).name == session["name"]


def test_session_names_are_unique_per_user(api, alice, bob, agent, alice_session):
    """The same session name is a 409 for the same user but allowed for another user."""
    taken = {"user_id": str(alice.pk), "agent_id": str(agent.pk), "name": alice_session.name}

    assert_error(api.post("/api/v1/sessions", taken, format="json"), 409, "name")
    bobs = assert_success(api.post("/api/v1/sessions", {**taken, "user_id": str(bob.pk)}, format="json"), 201)[
        "session"
    ]

    assert bobs["name"] == alice_session.name
    assert bobs["user_id"] == str(bob.pk)
    assert Session.objects.filter(name=alice_session.name).count() == 2


@pytest.mark.parametrize(
    "field",
    ["user_id", "agent_id"],
)
def test_session_create_with_unknown_owner_is_404(api, alice, agent, field):
    """Creating a session for an unknown user or agent is a 404 naming that field; nothing stored."""
    body = {"user_id": str(alice.pk), "agent_id": str(agent.pk), "name": "s", field: str(uuid.uuid4())}

    assert_error(api.post("/api/v1/sessions", body, format="json"), 404, field)
    assert not Session.objects.exists()


def test_session_create_with_malformed_user_id_is_400(api, agent):
    """A user_id that is not a UUID in the body is a 400 naming "user_id"."""
    body = {"user_id": "alice", "agent_id": str(agent.pk), "name": "s"}

    assert_error(api.post("/api/v1/sessions", body, format="json"), 400, "user_id")


def test_session_list_filters_by_user_and_agent(api, alice, bob, agent, alice_session, bob_session):
    """GET /sessions lists all sessions, or those of the user_id / agent_id given."""
    other_agent = assert_success(api.post("/api/v1/agents", {"name": "other"}, format="json"), 201)["agent"]
    alice_other = assert_success(
        api.post(
            "/api/v1/sessions",
            {"user_id": str(alice.pk), "agent_id": other_agent["id"], "name": "alice-other"},
            format="json",
        ),
        201,
    )["session"]

    def names(query: str) -> list[str]:
        return [s["name"] for s in assert_success(api.get(f"/api/v1/sessions{query}"))["sessions"]]

    assert names("") == ["alice-chat", "bob-chat", "alice-other"]
    assert names(f"?user_id={alice.pk}") == ["alice-chat", "alice-other"]
    assert names(f"?agent_id={agent.pk}") == ["alice-chat", "bob-chat"]
    assert names(f"?user_id={alice.pk}&agent_id={other_agent['id']}") == [alice_other["name"]]


def test_session_name_lookup_is_scoped_to_user(api, alice, bob, alice_session):
    """GET /sessions?name=X&user_id=U finds U's session; the same name of another user is a 404 naming "name"."""
    found = assert_success(api.get(f"/api/v1/sessions?name={alice_session.name}&user_id={alice.pk}"))

    assert [s["id"] for s in found["sessions"]] == [str(alice_session.pk)]
    assert_error(api.get(f"/api/v1/sessions?name={alice_session.name}&user_id={bob.pk}"), 404, "name")
    assert_error(api.get("/api/v1/sessions?name=nothing-like-it"), 404, "name")


def test_session_get_by_id(api, alice_session):
    """GET /sessions/{id} answers the session."""
    session = assert_success(api.get(f"/api/v1/sessions/{alice_session.pk}"))["session"]

    assert session["id"] == str(alice_session.pk)
    assert session["name"] == "alice-chat"
    assert session["user_id"] == str(alice_session.user_id)


@pytest.mark.parametrize("bad_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown-uuid", "not-uuid"])
def test_session_get_unknown_id_is_404(api, db, bad_id):
    """GET of an unknown or malformed session id is a 404 naming "session_id"."""
    assert_error(api.get(f"/api/v1/sessions/{bad_id}"), 404, "session_id")


def test_session_update_renames(api, alice_session):
    """PUT /sessions/{id} with a name renames the session."""
    session = assert_success(api.put(f"/api/v1/sessions/{alice_session.pk}", {"name": "renamed"}, format="json"))[
        "session"
    ]

    assert session["name"] == "renamed"
    alice_session.refresh_from_db()
    assert alice_session.name == "renamed"


def test_session_update_to_taken_name_is_409(api, alice, agent, alice_session):
    """Renaming a session to a name the user already uses is a 409 naming "name"."""
    other = assert_success(
        api.post(
            "/api/v1/sessions", {"user_id": str(alice.pk), "agent_id": str(agent.pk), "name": "second"}, format="json"
        ),
        201,
    )["session"]

    assert_error(api.put(f"/api/v1/sessions/{other['id']}", {"name": "alice-chat"}, format="json"), 409, "name")
    assert Session.objects.get(pk=other["id"]).name == "second"


def test_session_delete(api, alice_session):
    """DELETE /sessions/{id} answers the id and removes the session."""
    data = assert_success(api.delete(f"/api/v1/sessions/{alice_session.pk}"))

    assert data == {"session_id": str(alice_session.pk)}
    assert not Session.objects.filter(pk=alice_session.pk).exists()


# --- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/health/"])
def test_health_answers_on_both_paths(api, db, path):
    """The client checks /health and /health/: both answer 200 with the API version."""
    data = assert_success(api.get(path))

    assert data["status"] == "ok"
    assert data["version"].startswith("0.3.")


@pytest.mark.parametrize(
    "method, path",
    [("get", "/api/v1/nothing-here"), ("post", "/api/v1/users/x/y/z"), ("delete", "/api/v1/sessions/a/b/c/d")],
)
def test_unknown_url_is_404_json_envelope(api, db, method, path):
    """An unknown URL under /api/v1/ answers a 404 JSON envelope, not Django's HTML page."""
    response = getattr(api, method)(path, format="json")

    body = assert_error(response, 404, None)
    assert path in body["message"]


def test_unsupported_method_is_405_json_envelope(api, db):
    """A method a route does not serve answers a 405 JSON envelope."""
    assert_error(api.patch("/api/v1/users", {"name": "x"}, format="json"), 405, None)
