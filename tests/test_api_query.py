"""POST /api/v1/users/{id}/query: result shape, ranking, scope, filters, bad input and user isolation."""

from __future__ import annotations

import uuid

import pytest

from memory.services.agents import agent_create
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create
from tests.envelopes import assert_error, assert_success

pytestmark = pytest.mark.django_db

RESULT_KEYS = {"id", "type", "content", "role", "score", "created_at", "metadata"}


def query_url(user_id) -> str:
    return f"/api/v1/users/{user_id}/query"


def run_query(api, user_id, text: str, **params) -> list[dict]:
    """The results of a successful query; asserts ``total`` matches them."""
    data = assert_success(api.post(query_url(user_id), {"query": text, **params}, format="json"))
    assert set(data) == {"results", "total"}
    assert data["total"] == len(data["results"])
    return data["results"]


@pytest.fixture
def alice_second_session(alice, agent):
    """A second session of alice's, with the same agent, about her garden."""
    session = session_create(user=alice, agent=agent, name="alice-garden")
    messages_add(
        session=session, messages=[MessageIn(role="user", content="I planted tomatoes and basil in my garden.")]
    )
    return session


# --- shape and ranking -------------------------------------------------------------------------


def test_results_have_the_documented_shape(api, alice, alice_session, alice_messages):
    """Each result has id, type, content, role, score, created_at and a metadata dict naming its session."""
    results = run_query(api, alice.pk, "golden retriever", top_k=5)

    assert len(results) == 3
    by_id = {r["id"]: r for r in results}
    assert set(by_id) == {str(m.pk) for m in alice_messages}
    for message in alice_messages:
        result = by_id[str(message.pk)]
        assert set(result) == RESULT_KEYS
        assert result["type"] == "message"
        assert result["content"] == message.content
        assert result["role"] == message.role
        assert result["created_at"] == message.created_at.isoformat()
        metadata = result["metadata"]
        assert metadata["session_id"] == str(alice_session.pk)
        assert metadata["session_name"] == "alice-chat"
        assert metadata["position"] == message.position
        assert metadata["scope"] is None
        assert set(metadata["retrievers"]) <= {"bm25", "vector"}
        assert "vector" in metadata["retrievers"]
    scores = [r["score"] for r in results]
    assert all(isinstance(s, float) and s > 0 for s in scores)
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_caps_the_results(api, alice, alice_messages, alice_second_session, top_k):
    """At most top_k results come back (alice has 4 messages)."""
    assert len(run_query(api, alice.pk, "puppy garden sister", top_k=top_k)) == top_k


def test_top_k_defaults_to_five(api, alice, alice_session, alice_messages):
    """Without top_k the query answers at most 5 results."""
    messages_add(
        session=alice_session, messages=[MessageIn(role="user", content=f"note number {i}") for i in range(4)]
    )

    assert len(run_query(api, alice.pk, "note")) == 5


def test_relevant_message_ranks_first(api, alice, alice_messages, alice_second_session):
    """A clear question finds the message that answers it among the first two results."""
    results = run_query(api, alice.pk, "What is the name of my puppy?", top_k=3)

    assert str(alice_messages[0].pk) in [r["id"] for r in results[:2]]
    assert "Lisbon" in run_query(api, alice.pk, "Where does my sister live?", top_k=1)[0]["content"]


def test_query_sees_messages_added_after_an_earlier_query(api, alice, alice_session, alice_messages):
    """A message added after a query is found by the next one (the per-user BM25 cache goes stale)."""
    run_query(api, alice.pk, "kayak", top_k=3)
    [kayak] = messages_add(
        session=alice_session, messages=[MessageIn(role="user", content="I bought a kayak yesterday.")]
    )

    top = run_query(api, alice.pk, "kayak", top_k=1)[0]

    assert top["id"] == str(kayak.pk)
    assert "bm25" in top["metadata"]["retrievers"]


def test_user_without_memories_gets_no_results(api, alice):
    """A user with no messages or knowledge gets an empty result list."""
    assert run_query(api, alice.pk, "anything at all", top_k=10) == []


# --- scope and filters -------------------------------------------------------------------------


def test_scope_is_relative_to_the_given_session(api, alice, alice_session, alice_messages, alice_second_session):
    """With session_id, results are tagged in_session or cross_session; without it, scope is None."""
    scoped = run_query(api, alice.pk, "puppy garden", top_k=10, session_id=str(alice_session.pk))
    unscoped = run_query(api, alice.pk, "puppy garden", top_k=10, session_id=None, agent_id=None)

    assert len(scoped) == 4
    for result in scoped:
        expected = "in_session" if result["metadata"]["session_id"] == str(alice_session.pk) else "cross_session"
        assert result["metadata"]["scope"] == expected
    assert {r["metadata"]["scope"] for r in scoped} == {"in_session", "cross_session"}
    assert [r["metadata"]["scope"] for r in unscoped] == [None] * 4


def test_agent_id_restricts_to_that_agents_sessions(api, alice, agent, alice_session, alice_messages):
    """With agent_id, only messages of that agent's sessions come back."""
    other_agent = agent_create(tenant_id=agent.tenant_id, name="gardener")
    other_session = session_create(user=alice, agent=other_agent, name="alice-with-gardener")
    [other_message] = messages_add(
        session=other_session, messages=[MessageIn(role="user", content="My puppy Biscuit digs up the tulips.")]
    )

    with_agent = run_query(api, alice.pk, "puppy Biscuit", top_k=10, agent_id=str(agent.pk))
    with_other = run_query(api, alice.pk, "puppy Biscuit", top_k=10, agent_id=str(other_agent.pk))
    without = run_query(api, alice.pk, "puppy Biscuit", top_k=10)

    assert {r["id"] for r in with_agent} == {str(m.pk) for m in alice_messages}
    assert [r["id"] for r in with_other] == [str(other_message.pk)]
    assert len(without) == 4


def test_image_caption_makes_a_message_findable(api, alice, alice_session, alice_messages):
    """A word only in metadata.image_caption finds the message; the caption is kept in its metadata."""
    response = api.post(
        f"/api/v1/sessions/{alice_session.pk}/messages",
        {
            "messages": [
                {
                    "role": "user",
                    "content": "Look what I found this morning!",
                    "metadata": {"image_caption": "a red bicycle leaning on a wall"},
                }
            ]
        },
        format="json",
    )
    [message_id] = assert_success(response, 201)["message_ids"]

    top = run_query(api, alice.pk, "bicycle", top_k=1)[0]

    assert top["id"] == message_id
    assert top["content"] == "Look what I found this morning!"
    assert top["metadata"]["image_caption"] == "a red bicycle leaning on a wall"
    assert "bm25" in top["metadata"]["retrievers"]


def test_knowledge_is_returned_with_type_knowledge(api, alice, alice_session, alice_messages):
    """Knowledge items come back as type "knowledge" with role None, scope None and no session."""
    response = api.post(
        f"/api/v1/users/{alice.pk}/knowledge", {"knowledge": ["Alice is allergic to peanuts."]}, format="json"
    )
    [knowledge_id] = assert_success(response, 201)["knowledge_ids"]

    results = run_query(api, alice.pk, "peanut allergy", top_k=2, session_id=str(alice_session.pk))

    top = results[0]
    assert top["id"] == knowledge_id
    assert set(top) == RESULT_KEYS
    assert (top["type"], top["role"], top["content"]) == ("knowledge", None, "Alice is allergic to peanuts.")
    assert top["metadata"]["scope"] is None
    assert "session_id" not in top["metadata"]


def test_query_accepts_metadata_from_the_client(api, alice, alice_messages):
    """The client may send a metadata dict with the query; it is accepted."""
    assert len(run_query(api, alice.pk, "puppy", top_k=1, metadata={"source": "test"})) == 1


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 101, -1, "5", 5.5, True, None], ids=repr)
def test_top_k_out_of_range_or_not_an_integer_is_400(api, alice, alice_messages, top_k):
    """top_k must be a JSON integer in 1..100: otherwise 400 naming "top_k"."""
    response = api.post(query_url(alice.pk), {"query": "puppy", "top_k": top_k}, format="json")

    assert_error(response, 400, "top_k")


@pytest.mark.parametrize(
    "body",
    [{"query": ""}, {}, {"query": None}, {"query": 42}, {"query": ["puppy"]}],
    ids=["empty", "missing", "null", "int", "list"],
)
def test_missing_or_empty_query_is_400(api, alice, alice_messages, body):
    """The query text must be a non-empty string: otherwise 400 naming "query"."""
    assert_error(api.post(query_url(alice.pk), {**body, "top_k": 3}, format="json"), 400, "query")


@pytest.mark.parametrize("field", ["session_id", "agent_id"])
def test_malformed_filter_id_is_400(api, alice, alice_messages, field):
    """A session_id or agent_id that is not a UUID is a 400 naming it."""
    response = api.post(query_url(alice.pk), {"query": "puppy", field: "alice-chat"}, format="json")

    assert_error(response, 400, field)


def test_query_body_that_is_a_list_is_400(api, alice):
    """A JSON list instead of an object is a 400 about the whole request."""
    assert_error(api.post(query_url(alice.pk), ["puppy"], format="json"), 400, None)


@pytest.mark.parametrize("user_id", [str(uuid.uuid4()), "alice"], ids=["unknown-uuid", "not-uuid"])
def test_unknown_user_is_404(api, alice, user_id):
    """Querying an unknown or malformed user id is a 404 naming "user_id"."""
    assert_error(api.post(query_url(user_id), {"query": "puppy"}, format="json"), 404, "user_id")


# --- isolation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["beagle Pepper beach", "Pepper sounds like a happy beagle.", "dog", "What is my dog called?", "Bob keeps bees"],
)
def test_alices_queries_never_return_bobs_memories(
    api, alice, bob, agent, alice_messages, bob_messages, bob_session, text
):
    """Alice's queries return only alice's rows, however well bob's messages and knowledge match."""
    assert_success(
        api.post(f"/api/v1/users/{bob.pk}/knowledge", {"knowledge": ["Bob keeps bees in his garden."]}, format="json"),
        201,
    )

    results = run_query(api, alice.pk, text, top_k=100)
    # The same filters that name bob's session or the agent both users share.
    with_bobs_session = run_query(api, alice.pk, text, top_k=100, session_id=str(bob_session.pk))
    with_shared_agent = run_query(api, alice.pk, text, top_k=100, agent_id=str(agent.pk))

    alices = {str(m.pk) for m in alice_messages}
    for found in (results, with_bobs_session, with_shared_agent):
        assert {r["id"] for r in found} == alices
        assert all("Pepper" not in r["content"] and "bees" not in r["content"] for r in found)
        assert all(r["type"] == "message" for r in found)


def test_bobs_query_sees_his_own_memories(api, bob, alice_messages, bob_messages):
    """Isolation works both ways: bob's query finds his beagle and none of alice's messages."""
    results = run_query(api, bob.pk, "golden retriever Biscuit beagle", top_k=100)

    assert {r["id"] for r in results} == {str(m.pk) for m in bob_messages}


# --- per-query retrieval overrides -------------------------------------------------------------


def test_retrieval_override_switches_a_retriever_off(api, alice, alice_messages):
    """retrieval.vector_weight = 0 ranks by BM25 alone for this query only."""
    bm25_only = run_query(api, alice.pk, "Biscuit puppy", top_k=3, retrieval={"vector_weight": 0})
    default = run_query(api, alice.pk, "Biscuit puppy", top_k=3)

    assert bm25_only and all(set(r["metadata"]["retrievers"]) == {"bm25"} for r in bm25_only)
    assert any("vector" in r["metadata"]["retrievers"] for r in default)


def test_retrieval_override_of_rrf_k_changes_the_fused_scores(api, alice, alice_messages):
    """rrf_k is applied: the top score is sum(w / (k + 1)) over the retrievers that found it."""
    results = run_query(api, alice.pk, "golden retriever Biscuit", top_k=1, retrieval={"rrf_k": 1})
    ranks = results[0]["metadata"]["retrievers"]
    weights = {"bm25": 3.0, "vector": 1.0}

    assert results[0]["score"] == pytest.approx(sum(weights[n] / (1 + r["rank"]) for n, r in ranks.items()), abs=1e-6)


def test_retrieval_rerank_override_uses_the_configured_reranker(api, alice, alice_messages, reranker_path):
    """With a reranker configured, rerank is on by default and can be switched off per query."""
    reranked = run_query(api, alice.pk, "dog", top_k=3)
    plain = run_query(api, alice.pk, "dog", top_k=3, retrieval={"rerank": False})

    assert all("reranker" in r["metadata"]["retrievers"] for r in reranked)
    assert all("reranker" not in r["metadata"]["retrievers"] for r in plain)


@pytest.mark.parametrize(
    "retrieval, field",
    [
        ({"bm25_weight": -0.5}, "retrieval.bm25_weight"),
        ({"bm25_weight": 101}, "retrieval.bm25_weight"),
        ({"vector_weight": "1"}, "retrieval.vector_weight"),
        ({"rrf_k": 0}, "retrieval.rrf_k"),
        ({"rrf_k": 2.5}, "retrieval.rrf_k"),
        ({"bm25_candidates": 501}, "retrieval.bm25_candidates"),
        ({"vector_candidates": True}, "retrieval.vector_candidates"),
        ({"rerank_top_n": 51}, "retrieval.rerank_top_n"),
        ({"rerank": "yes"}, "retrieval.rerank"),
        ({"rerank": True}, "retrieval.rerank"),  # no reranker configured
        ({"bm25_weight": 0, "vector_weight": 0}, "retrieval.vector_weight"),
        ({"bm25_context_turns": 4}, "retrieval.bm25_context_turns"),  # changes the index: not overridable
        ({"bm25_weigth": 1}, "retrieval.bm25_weigth"),
        ([1, 2], "retrieval"),
        ("fast", "retrieval"),
    ],
    ids=repr,
)
def test_bad_retrieval_override_is_400_naming_the_field(api, alice, alice_messages, retrieval, field):
    """Unknown, mistyped or out-of-range retrieval overrides are a 400 naming retrieval.<field>."""
    response = api.post(query_url(alice.pk), {"query": "puppy", "retrieval": retrieval}, format="json")

    assert_error(response, 400, field)


def test_retrieval_fusion_and_prf_overrides_are_accepted(api, alice, alice_messages):
    """fusion, the PRF knobs and the speaker weight are per-query overrides; convex scores lie in [0, 1]."""
    results = run_query(api, alice.pk, "Biscuit", top_k=3, retrieval={"fusion": "convex", "prf_docs": 0, "prf_weight": 1.5, "speaker_weight": 2.0})

    assert results and all(0.0 <= r["score"] <= 1.0 for r in results)


@pytest.mark.parametrize(
    "retrieval, field",
    [
        ({"fusion": "borda"}, "retrieval.fusion"),
        ({"prf_docs": 11}, "retrieval.prf_docs"),
        ({"prf_weight": -1}, "retrieval.prf_weight"),
        ({"speaker_weight": -0.5}, "retrieval.speaker_weight"),
        ({"speaker_weight": "high"}, "retrieval.speaker_weight"),
    ],
    ids=repr,
)
def test_bad_fusion_or_prf_override_is_400(api, alice, alice_messages, retrieval, field):
    """An unknown fusion or an out-of-range PRF or speaker knob is a 400 naming it."""
    assert_error(api.post(query_url(alice.pk), {"query": "puppy", "retrieval": retrieval}, format="json"), 400, field)
