"""Retrieval stages: tsvector tokens, neighbouring-turn context for BM25, weighted RRF."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from memory import retrieval, selectors, services
from memory.retrieval import DocKey, context_documents, rrf_fuse, tsvector_tokens
from memory.services import MessageIn


def test_tsvector_tokens_repeat_each_lexeme_per_position():
    """A tsvector's text form becomes its lexemes, once per position, quotes unescaped."""
    assert tsvector_tokens("'group':6,9 'it''s':2 'support':5") == ["group", "group", "it's", "support"]
    assert tsvector_tokens("") == []


def test_context_documents_add_neighbours_of_the_same_session_only():
    """A turn's document holds its own words (weighted) and its neighbours' within the session."""
    tokens = [["a"], ["b"], ["c"], ["d"]]
    sessions = ["s1", "s1", "s1", "s2"]

    documents = context_documents(tokens, sessions, window=1, own_weight=2)

    assert documents == [["a", "a", "b"], ["b", "b", "a", "c"], ["c", "c", "b"], ["d", "d"]]
    assert context_documents(tokens, sessions, window=0, own_weight=1) == tokens


def test_rrf_weights_order_the_fusion():
    """With a heavier weight, a retriever's first hit wins the fused ranking; ranks are reported."""
    a, b = DocKey("message", uuid.uuid4()), DocKey("message", uuid.uuid4())
    lists = {"bm25": [(a, 9.0), (b, 1.0)], "vector": [(b, 0.9), (a, 0.1)]}

    fused = rrf_fuse(lists, {"bm25": 3.0, "vector": 1.0}, k=60)

    assert [key for key, _, _ in fused] == [a, b]
    assert fused[0][2] == {"bm25": {"rank": 1, "score": 9.0}, "vector": {"rank": 2, "score": 0.1}}
    assert [key for key, _, _ in rrf_fuse(lists, {"bm25": 1.0, "vector": 3.0}, k=60)] == [b, a]


def _trail_conversation(alice_session):
    return services.messages_add(
        session=alice_session,
        messages=[
            MessageIn(role="user", content="Which hiking trail did you pick in Patagonia?"),
            MessageIn(role="assistant", content="The one along the glacier, it took three days."),
            MessageIn(role="user", content="I baked bread this morning."),
        ],
    )


@pytest.mark.parametrize("context_turns, found", [(2, True), (0, False)])
def test_bm25_finds_a_turn_through_its_neighbours_words(alice_session, settings, context_turns, found):
    """With context, BM25 finds the answer turn by words only its neighbour has; without, it does not."""
    settings.MEMFUSE = {**settings.MEMFUSE, "BM25_CONTEXT_TURNS": context_turns}
    _, answer, _ = _trail_conversation(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()

    hits = retrieval.hybrid_search(
        user_id=alice.pk, memory_version=alice.memory_version, query="Patagonia hiking trail", top_k=3,
        config=retrieval.RetrievalConfig.from_settings(vector_weight=0.0),
    )

    assert (DocKey("message", answer.pk) in [key for key, _, _ in hits]) is found


def test_query_stages_stream_bm25_then_the_fused_ranking(alice_session):
    """memory_query_stages yields a BM25-only 'partial' stage, then the 'final' fused one."""
    _trail_conversation(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()

    stages = list(selectors.memory_query_stages(user=alice, query="glacier trail", top_k=2))

    assert [stage for stage, _ in stages] == ["partial", "final"]
    assert all(set(r["metadata"]["retrievers"]) == {"bm25"} for r in stages[0][1])
    assert any("vector" in r["metadata"]["retrievers"] for r in stages[1][1])


# --- the per-user service cache ----------------------------------------------------------------


@pytest.fixture
def tiny_user_cache():
    retrieval.reset_user_cache(max_size=1)
    yield
    retrieval.reset_user_cache()


def test_user_cache_counts_hits_misses_and_evictions(tiny_user_cache):
    """The LRU keeps USER_CACHE_SIZE services; lookups and evictions are counted."""
    first, second = uuid.uuid4(), uuid.uuid4()

    service = retrieval.user_memory(first)
    assert retrieval.user_memory(first) is service
    retrieval.user_memory(second)  # evicts first

    assert retrieval.cache_stats() == {"size": 1, "max_size": 1, "hits": 1, "misses": 2, "evictions": 1, "hit_rate": 0.3333}
    assert retrieval.user_memory(first) is not service  # rebuilt, not kept


def test_evicting_a_user_with_pending_messages_loses_nothing(tiny_user_cache, alice_session, bob_session):
    """Alice's service is evicted while her messages are pending: they stay pending, are found, then flushed."""
    from buffers import services as buffers

    [kayak] = services.messages_add(
        session=alice_session, messages=[services.MessageIn(role="user", content="I bought a red kayak for the lake.")]
    )
    alice, bob = alice_session.user, bob_session.user
    alice.refresh_from_db()
    assert selectors.memory_query(user=alice, query="What boat did I buy?", top_k=1)[0]["id"] == str(kayak.pk)
    alice_service = retrieval.user_memory(alice.pk)
    assert alice_service._pending_vectors  # her pending message's embedding is cached here

    bob.refresh_from_db()
    selectors.memory_query(user=bob, query="dog", top_k=1)  # the cache holds one user: alice is evicted

    assert retrieval.cache_stats()["evictions"] == 1
    kayak.refresh_from_db()
    assert kayak.flushed_at is None and kayak.embedding is None  # still pending, in the database
    [found] = selectors.memory_query(user=alice, query="What boat did I buy?", top_k=1)
    assert (found["id"], found["metadata"]["flushed"]) == (str(kayak.pk), False)
    assert retrieval.user_memory(alice.pk) is not alice_service

    buffers.flush_pending(user_id=alice.pk)
    kayak.refresh_from_db()
    assert kayak.flushed_at is not None and kayak.embedding is not None


@pytest.mark.django_db
def test_vector_search_is_an_exact_scan_of_the_users_rows_even_for_a_tiny_user(agent):
    """Per-user vector search returns the exact top k of that user's vectors (numpy scan).

    The big user's 1,200 rows all sit next to the query and the tiny user's 3 rows far from
    it: an HNSW search filtered by user afterwards would see only the big user's rows and
    return nothing for the tiny one.
    """
    from django.utils import timezone

    from memory.models import EMBEDDING_DIM, Message

    rng = np.random.default_rng(5)
    query = rng.normal(size=EMBEDDING_DIM).astype(np.float32)
    query /= np.linalg.norm(query)

    def user_with_vectors(name: str, vectors: np.ndarray) -> tuple:
        user = services.user_create(tenant_id=agent.tenant_id, name=name)
        session = services.session_create(user=user, agent=agent, name=f"{name}-chat")
        now = timezone.now()
        rows = Message.objects.bulk_create(
            Message(session=session, user=user, position=i, role="user", content=f"turn {i}", index_text=f"turn {i}",
                    embedding=vector, flushed_at=now, flush_count=1, created_at=now)
            for i, vector in enumerate(vectors)
        )
        return user, [row.pk for row in rows], vectors

    near = query + 0.3 * rng.normal(size=(1200, EMBEDDING_DIM)).astype(np.float32) / np.sqrt(EMBEDDING_DIM)
    big = user_with_vectors("big", near)
    tiny = user_with_vectors("tiny", rng.normal(size=(3, EMBEDDING_DIM)).astype(np.float32) - 2 * query)
    mid = user_with_vectors("mid", rng.normal(size=(60, EMBEDDING_DIM)).astype(np.float32))

    for user, ids, vectors in (tiny, mid, big):
        similarities = vectors @ query / np.linalg.norm(vectors, axis=1)
        exact = [ids[i] for i in np.argsort(-similarities)[:10]]

        served = retrieval.vector_candidates(user_id=user.pk, embedding=query, limit=10)

        assert [key.id for key, _ in served] == exact, user.name
        assert [score for _, score in served] == pytest.approx(sorted(similarities, reverse=True)[:10], abs=1e-5)

    # The premise: the HNSW index, filtered by user afterwards, misses the tiny user's rows.
    from django.db import connection, transaction
    from pgvector import Vector

    with transaction.atomic(), connection.cursor() as cursor:
        for setting in ("hnsw.ef_search = 40", "hnsw.iterative_scan = off", "enable_seqscan = off",
                        "enable_bitmapscan = off", "enable_sort = off"):
            cursor.execute(f"SET LOCAL {setting}")
        cursor.execute(
            "SELECT id FROM memory_message WHERE user_id = %s ORDER BY embedding <=> %s::vector LIMIT 10",
            [tiny[0].pk, Vector._to_db(query)],
        )
        assert len(cursor.fetchall()) < 3
