"""Retrieval stages: tsvector tokens, neighbouring-turn context for BM25 and the vector side, weighted RRF.

The index's own behaviour (incremental updates, snapshots, the cache's bound) is in
test_retrieval_index.py; context embeddings and approximate search in test_retrieval_vector.py.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from memory import retrieval, selectors
from memory.indexing import context
from memory.indexing.flush import flush_pending
from memory.inference import registry
from memory.retrieval import DocKey, MemoryQuery, rrf_fuse, tsvector_tokens, vector
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create
from memory.services.users import user_create


def test_tsvector_tokens_repeat_each_lexeme_per_position():
    """A tsvector's text form becomes its lexemes, once per position, quotes unescaped."""
    assert tsvector_tokens("'group':6,9 'it''s':2 'support':5") == ["group", "group", "it's", "support"]
    assert tsvector_tokens("") == []


def test_doc_key_is_a_value_of_kind_and_id():
    """Keys made from a UUID or from its integer are the same key; the kind tells them apart."""
    import pickle

    doc_id = uuid.uuid4()
    key = DocKey("message", doc_id)

    assert key == DocKey.from_int("message", doc_id.int) and hash(key) == hash(DocKey.from_int("message", doc_id.int))
    assert key != DocKey("knowledge", doc_id) and key != DocKey("message", uuid.uuid4())
    assert (key.kind, key.id, key.int) == ("message", doc_id, doc_id.int)
    assert pickle.loads(pickle.dumps(key)) == key and repr(key) == f"DocKey(kind='message', id={doc_id!r})"


def test_rrf_weights_order_the_fusion():
    """With a heavier weight, a retriever's first hit wins the fused ranking; ranks are reported."""
    a, b = DocKey("message", uuid.uuid4()), DocKey("message", uuid.uuid4())
    lists = {"bm25": [(a, 9.0), (b, 1.0)], "vector": [(b, 0.9), (a, 0.1)]}

    fused = rrf_fuse(lists, {"bm25": 3.0, "vector": 1.0}, k=60)

    assert [key for key, _, _ in fused] == [a, b]
    assert fused[0][2] == {"bm25": {"rank": 1, "score": 9.0}, "vector": {"rank": 2, "score": 0.1}}
    assert [key for key, _, _ in rrf_fuse(lists, {"bm25": 1.0, "vector": 3.0}, k=60)] == [b, a]


def test_rrf_limit_is_the_prefix_of_the_full_fusion():
    """A limited fusion returns the first hits of the full one, scores, ties and retrievers alike."""
    keys = [DocKey("message", uuid.uuid4()) for _ in range(40)]
    bm25 = [(key, float(40 - i)) for i, key in enumerate(keys[:30])]
    vector_list = [(key, 1.0 - i / 100) for i, key in enumerate(reversed(keys[10:]))]  # ties with bm25's ranks
    lists = {"bm25": bm25, "vector": vector_list}
    weights = {"bm25": 1.0, "vector": 1.0}

    full = rrf_fuse(lists, weights, k=60)

    assert len(full) == 40
    assert all(full[i][1] >= full[i + 1][1] for i in range(39))
    for limit in (1, 10, 40, 100):
        assert rrf_fuse(lists, weights, k=60, limit=limit) == full[:limit]


def _trail_conversation(alice_session):
    return messages_add(
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
        MemoryQuery(user=alice, query="Patagonia hiking trail", top_k=3,
                    config=retrieval.RetrievalConfig.from_settings(vector_weight=0.0))
    )

    assert (DocKey("message", answer.pk) in [key for key, _, _ in hits]) is found


def test_query_stages_stream_bm25_then_the_fused_ranking(alice_session):
    """memory_query_stages yields a BM25-only 'partial' stage, then the 'final' fused one."""
    _trail_conversation(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()

    stages = list(selectors.memory_query_stages(MemoryQuery(user=alice, query="glacier trail", top_k=2)))

    assert [stage for stage, _ in stages] == ["partial", "final"]
    assert all(set(r["metadata"]["retrievers"]) == {"bm25"} for r in stages[0][1])
    assert any("vector" in r["metadata"]["retrievers"] for r in stages[1][1])


# --- the per-user service cache ----------------------------------------------------------------


@pytest.fixture
def tiny_user_cache():
    """A cache of 4 KB: it holds one small user at a time."""
    retrieval.reset_user_cache(max_bytes=4096)
    yield
    retrieval.reset_user_cache()


def test_user_cache_counts_hits_misses_and_evictions(tiny_user_cache):
    """Lookups and evictions are counted; an entry that no longer fits evicts the least recent."""
    first, second = uuid.uuid4(), uuid.uuid4()

    service = retrieval.user_index(first)
    assert retrieval.user_index(first) is service
    retrieval.user_index(second)
    retrieval.user_index(uuid.uuid4())  # three empty entries (1 KB each) fit; hits and misses count

    stats = retrieval.cache_stats()
    assert (stats["size"], stats["hits"], stats["misses"], stats["evictions"]) == (3, 1, 3, 0)
    assert stats["max_bytes"] == 4096 and stats["bytes"] == 3 * service.nbytes


def test_evicting_a_user_with_pending_messages_loses_nothing(alice_session, bob_session):
    """Alice's service is evicted while her messages are pending: they stay pending, are found, then flushed."""

    [kayak] = messages_add(
        session=alice_session, messages=[MessageIn(role="user", content="I bought a red kayak for the lake.")]
    )
    messages_add(
        session=bob_session,
        messages=[MessageIn(role="user", content=f"My dog Pepper chased ball number {i}.") for i in range(20)],
    )
    alice, bob = alice_session.user, bob_session.user
    alice.refresh_from_db()
    bob.refresh_from_db()
    selectors.memory_query(MemoryQuery(user=bob, query="dog", top_k=1))
    selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=1))
    bob_bytes, alice_bytes = retrieval.user_index(bob.pk).nbytes, retrieval.user_index(alice.pk).nbytes
    # Room for bob, not for both: alice is cached first, then bob's entry evicts her.
    retrieval.reset_user_cache(max_bytes=bob_bytes + alice_bytes // 2)
    assert selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=1))[0]["id"] == str(kayak.pk)
    alice_service = retrieval.user_index(alice.pk)
    assert registry.recent_query_embeddings([kayak.index_text], scope=alice.pk)  # her pending message's embedding
    selectors.memory_query(MemoryQuery(user=bob, query="dog", top_k=1))

    assert retrieval.cache_stats()["evictions"] >= 1 and retrieval.cached_user_index(alice.pk) is None
    assert registry.recent_query_embeddings([kayak.index_text], scope=alice.pk)  # not the evicted entry's to lose
    kayak.refresh_from_db()
    assert kayak.flushed_at is None and kayak.embedding is None  # still pending, in the database
    [found] = selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=1))
    assert (found["id"], found["metadata"]["flushed"]) == (str(kayak.pk), False)
    assert retrieval.user_index(alice.pk) is not alice_service

    flush_pending(user_id=alice.pk)
    kayak.refresh_from_db()
    assert kayak.flushed_at is not None and kayak.embedding is not None
    retrieval.reset_user_cache()


def smoothed_cosines(vectors: np.ndarray, query: np.ndarray, *, window: int = 2, own: int = 2) -> np.ndarray:
    """Each turn's (own x its cosine + its neighbours' within ``window``) / their count, for
    turns in one session in order: the vector retriever's score, computed independently."""
    cosines = vectors @ query
    scores = []
    for i in range(len(vectors)):
        around = [cosines[j] for j in range(max(0, i - window), min(len(vectors), i + window + 1)) if j != i]
        scores.append((own * cosines[i] + sum(around)) / (own + len(around)))
    return np.array(scores)


def flushed_user(agent, name: str, vectors: np.ndarray, texts: list[str] | None = None) -> tuple:
    """A user with one session of flushed messages holding ``vectors`` (unit rows), context
    embeddings computed as a flush computes them: ``(user, message ids)``."""
    from django.db import connection
    from django.utils import timezone

    from memory.models import Message

    user = user_create(tenant_id=agent.tenant_id, name=name)
    session = session_create(user=user, agent=agent, name=f"{name}-chat")
    now = timezone.now()
    texts = texts or [f"turn {i}" for i in range(len(vectors))]
    rows = Message.objects.bulk_create(
        Message(session=session, user=user, position=i, role="user", content=text, index_text=text,
                embedding=embedding, flushed_at=now, flush_count=1, created_at=now)
        for i, (embedding, text) in enumerate(zip(vectors, texts))
    )
    with connection.cursor() as cursor:
        context.context_refresh_all(cursor, user_id=user.pk)
        cursor.execute("UPDATE memory_session SET next_position = %s WHERE id = %s", [len(rows), session.pk])
    return user, [row.pk for row in rows]


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.django_db
def test_vector_search_is_an_exact_scan_of_the_users_rows_even_for_a_tiny_user(agent):
    """Per-user vector search returns the exact top k of that user's smoothed scores (numpy).

    The big user's 1,200 rows all sit next to the query and the tiny user's 3 rows far from
    it: an HNSW search over everyone's rows filtered by user afterwards would see only the big
    user's rows and return nothing for the tiny one.
    """
    from memory.models import EMBEDDING_DIM

    rng = np.random.default_rng(5)
    query = unit(rng.normal(size=EMBEDDING_DIM))

    def user_with_vectors(name: str, vectors: np.ndarray) -> tuple:
        vectors = unit(vectors)
        user, ids = flushed_user(agent, name, vectors)
        return user, ids, vectors

    near = query + 0.3 * rng.normal(size=(1200, EMBEDDING_DIM)).astype(np.float32) / np.sqrt(EMBEDDING_DIM)
    big = user_with_vectors("big", near)
    tiny = user_with_vectors("tiny", rng.normal(size=(3, EMBEDDING_DIM)).astype(np.float32) - 2 * query)
    mid = user_with_vectors("mid", rng.normal(size=(60, EMBEDDING_DIM)).astype(np.float32))

    for user, ids, vectors in (tiny, mid, big):
        similarities = smoothed_cosines(vectors, query)
        exact = [ids[i] for i in np.argsort(-similarities)[:10]]

        served, _, _ = vector.candidates(user_id=user.pk, embedding=query, limit=10)

        assert [key.id for key, _ in served] == exact, user.name
        assert [score for _, score in served] == pytest.approx(sorted(similarities, reverse=True)[:10], abs=1e-5)

    # The premise, and why the schema has no HNSW index (migration 0006): an HNSW index,
    # filtered by user afterwards, misses the tiny user's rows.
    from django.db import connection, transaction
    from pgvector import Vector

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no deferred FK checks pending: CREATE INDEX
        cursor.execute("CREATE INDEX test_hnsw ON memory_message USING hnsw (embedding vector_cosine_ops)")
        for setting in ("hnsw.ef_search = 40", "hnsw.iterative_scan = off", "enable_seqscan = off",
                        "enable_bitmapscan = off", "enable_sort = off"):
            cursor.execute(f"SET LOCAL {setting}")
        cursor.execute(
            "SELECT id FROM memory_message WHERE user_id = %s ORDER BY embedding <=> %s::vector LIMIT 10",
            [tiny[0].pk, Vector._to_db(query)],
        )
        assert len(cursor.fetchall()) < 3


# --- the cross-encoder reranking stage -----------------------------------------------------------

GARDEN = [
    "I planted tomatoes in the garden today.",
    "The garden needs rain, the basil is dry.",
    "We had a picnic in the botanical garden.",
    "My garden gnome collection keeps growing.",
    "A fox walked through the garden at night.",
]


def _cross_encoder_order(path, query: str, texts: list[str]) -> list[int]:
    """Indices of ``texts`` by the model's logit, best first: computed with transformers
    directly, independently of the code under test."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        batch = tokenizer([query] * len(texts), texts, padding=True, truncation=True, return_tensors="pt")
        logits = model(**batch).logits[:, 0].tolist()
    return sorted(range(len(texts)), key=lambda i: -logits[i])


def _garden(alice_session):
    rows = messages_add(session=alice_session, messages=[MessageIn(role="user", content=t) for t in GARDEN])
    alice = alice_session.user
    alice.refresh_from_db()
    return alice, {row.pk: row.index_text for row in rows}


def _search(alice, query, **overrides):
    return retrieval.hybrid_search(
        MemoryQuery(user=alice, query=query, top_k=5,
                    config=retrieval.RetrievalConfig.from_settings(**overrides))
    )


def test_reranked_order_follows_the_cross_encoders_scores(alice_session, reranker_path):
    """With rerank on, the fused top N come in the cross-encoder's order, each with its reranker rank."""
    alice, texts = _garden(alice_session)
    fused = [key for key, _, _ in _search(alice, "garden", rerank=False)]

    hits = _search(alice, "garden", rerank=True, rerank_top_n=5)

    order = _cross_encoder_order(reranker_path, "garden", [texts[key.id] for key in fused])
    assert [key for key, _, _ in hits] == [fused[i] for i in order]
    assert [key for key, _, _ in hits] != fused  # this model does reorder them: the test can fail
    assert [found["reranker"]["rank"] for _, _, found in hits] == [1, 2, 3, 4, 5]


def test_reranker_off_leaves_the_fused_order_and_loads_no_model(alice_session, reranker_path, settings):
    """RERANK off (model configured): the fused order, no reranker ranks, and the model is never loaded."""
    alice, _ = _garden(alice_session)
    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": ""}
    without_model = _search(alice, "garden")
    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": str(reranker_path), "RERANK": False}

    hits = _search(alice, "garden")

    assert [key for key, _, _ in hits] == [key for key, _, _ in without_model]
    assert all("reranker" not in found for _, _, found in hits)
    assert registry.stats()["reranker"] is None


def test_rerank_reorders_only_the_top_n(alice_session, reranker_path):
    """Hits after rerank_top_n keep their fused order and carry no reranker rank."""
    alice, _ = _garden(alice_session)
    fused = _search(alice, "garden", rerank=False)

    hits = retrieval.rerank(user_id=alice.pk, query="garden", hits=fused, top_n=2)

    assert {key for key, _, _ in hits[:2]} == {key for key, _, _ in fused[:2]}
    assert hits[2:] == fused[2:]
    assert all("reranker" in found for _, _, found in hits[:2])


def test_rerank_defaults_follow_the_configuration(settings, reranker_path):
    """rerank is on by default only with a model configured and RERANK set; overrides win."""
    assert retrieval.RetrievalConfig.from_settings().rerank is True
    assert retrieval.RetrievalConfig.from_settings(rerank=False).rerank is False
    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": ""}
    assert retrieval.RetrievalConfig.from_settings().rerank is False


def test_document_texts_reads_only_the_users_rows(alice_session, bob_messages):
    """The reranker's texts come from the querying user's rows: another user's ids give nothing."""
    alice, texts = _garden(alice_session)
    keys = [DocKey("message", pk) for pk in texts] + [DocKey("message", bob_messages[0].pk)]

    found = retrieval.document_texts(alice.pk, keys)

    assert found == {DocKey("message", pk): text for pk, text in texts.items()}


@pytest.mark.parametrize("weights", [{"bm25_candidates": 1}, {"vector_candidates": 1}])
def test_candidates_cap_each_retrievers_contribution(alice_session, weights):
    """bm25_candidates / vector_candidates cap how many documents that retriever ranks."""
    alice, _ = _garden(alice_session)

    hits = _search(alice, "garden", **weights)

    name = "bm25" if "bm25_candidates" in weights else "vector"
    assert sum(1 for _, _, found in hits if name in found) == 1


# --- pseudo-relevance feedback for the vector side; convex fusion ------------------------------


def test_convex_fusion_weighs_normalised_scores_not_ranks():
    """Convex fusion uses score gaps: b, a near-tie in BM25 and a clear win in the vector list, goes first."""
    a, b, c = (DocKey("message", uuid.uuid4()) for _ in range(3))
    lists = {"bm25": [(a, 10.0), (b, 9.9), (c, 0.0)], "vector": [(b, 0.9), (a, 0.1), (c, 0.05)]}

    fused = retrieval.convex_fuse(lists, {"bm25": 1.0, "vector": 1.0})

    assert [key for key, _, _ in fused] == [b, a, c]
    assert fused[0][1] == pytest.approx(0.5 * 0.99 + 0.5 * 1.0)
    assert fused[0][2] == {"bm25": {"rank": 2, "score": 9.9}, "vector": {"rank": 1, "score": 0.9}}
    # RRF sees a first and a second place for both a and b: a tie, kept in BM25's order.
    assert [key for key, _, _ in rrf_fuse(lists, {"bm25": 1.0, "vector": 1.0}, k=60)] == [a, b, c]


def vector_scores(user_id, query: np.ndarray, **kwargs) -> dict:
    """The vector retriever's scores as the search computes them, flushed and pending: ``{id: score}``."""
    flushed, pending, moved = vector.candidates(user_id=user_id, embedding=query, limit=100, **kwargs)
    if pending:
        texts = [text for _, _, text, *_ in pending]
        flushed += vector.pending_scores(pending, vector.pending_embeddings(user_id=user_id, texts=texts), moved)
    return {key.id: score for key, score in flushed}


def test_prf_scores_against_the_query_moved_toward_the_feedback_documents(alice_session, settings):
    """Rocchio: every document (flushed or pending) is scored by its cosine to
    normalise(q + 0.75 * mean(feedback embeddings)); pending feedback documents are skipped.
    (No neighbour smoothing here: each score is the document's own cosine.)"""
    from memory.indexing.flush import flush_pending

    settings.MEMFUSE = {**settings.MEMFUSE, "VECTOR_CONTEXT_TURNS": 0}
    rows = messages_add(session=alice_session, messages=[MessageIn(role="user", content=t) for t in GARDEN])
    flush_pending(user_id=alice_session.user_id)
    pending = messages_add(session=alice_session, messages=[MessageIn(role="user", content="Not flushed.")])
    documents = registry.embed_documents([row.index_text for row in rows + pending])
    query = registry.embed(["weather forecast"])[0]
    moved = query + 0.75 * documents[:2].mean(axis=0)
    moved /= np.linalg.norm(moved)

    def scores(feedback):
        return vector_scores(alice_session.user_id, query, feedback=feedback, feedback_weight=0.75)

    with_feedback = scores([DocKey("message", rows[0].pk), DocKey("message", rows[1].pk)])
    assert [with_feedback[row.pk] for row in rows + pending] == pytest.approx(list(documents @ moved), abs=1e-5)
    assert with_feedback[rows[0].pk] > float(documents[0] @ query) + 0.1
    only_pending = scores([DocKey("message", pending[0].pk)])
    assert [only_pending[row.pk] for row in rows + pending] == pytest.approx(list(documents @ query), abs=1e-5)


def test_prf_brings_bm25s_top_document_up_the_vector_ranking(alice_session):
    """With PRF on, the vector retriever ranks BM25's top hit higher than without (or first either way)."""
    from memory.indexing.flush import flush_pending

    alice, _ = _garden(alice_session)
    flush_pending(user_id=alice.pk)
    alice.refresh_from_db()

    def vector_rank_of_bm25_top(**overrides):
        hits = _search(alice, "gnome collection", **overrides)
        bm25_top = next(key for key, _, found in hits if found.get("bm25", {}).get("rank") == 1)
        return next(found["vector"]["rank"] for key, _, found in hits if key == bm25_top)

    without, with_prf = vector_rank_of_bm25_top(prf_docs=0), vector_rank_of_bm25_top(prf_docs=1, prf_weight=5.0)

    assert with_prf == 1
    assert with_prf <= without


# --- neighbouring turns on the vector side ---------------------------------------------------------


PATAGONIA = [
    "Which hiking trail did you pick in Patagonia?",
    "The one along the glacier, it took three days.",
    "Hiking in Patagonia sounds wonderful, send pictures.",
]
ELSEWHERE = ["My sister adopted a cat.", "I watched a documentary about Patagonia.", "The bakery was closed on Sunday."]


def _vector_ranking(alice, query, **overrides):
    hits = retrieval.hybrid_search(
        MemoryQuery(user=alice, query=query, top_k=10,
                    config=retrieval.RetrievalConfig.from_settings(bm25_weight=0.0, **overrides))
    )
    return [key for key, _, _ in hits], {key: found["vector"]["score"] for key, _, found in hits}


@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("context_turns", [2, 0])
def test_vector_retriever_finds_an_answer_through_its_neighbours(alice, agent, settings, flushed, context_turns):
    """With context, an answer turn unlike the query outranks a lone look-alike turn elsewhere;
    without, it does not: flushed (context embeddings) and pending (scored on demand) alike."""
    from memory.indexing.flush import flush_pending

    settings.MEMFUSE = {**settings.MEMFUSE, "VECTOR_CONTEXT_TURNS": context_turns, "VECTOR_OWN_WEIGHT": 2}
    trip, other = (session_create(user=alice, agent=agent, name=name) for name in ("trip", "other"))
    _, answer, _ = messages_add(session=trip, messages=[MessageIn(role="user", content=t) for t in PATAGONIA])
    _, lookalike, _ = messages_add(
        session=other, messages=[MessageIn(role="user", content=t) for t in ELSEWHERE]
    )
    if flushed:
        flush_pending(user_id=alice.pk)
    alice.refresh_from_db()

    ranking, _ = _vector_ranking(alice, "What trail did they hike in Patagonia?")

    answer, lookalike = DocKey("message", answer.pk), DocKey("message", lookalike.pk)
    assert (ranking.index(answer) < ranking.index(lookalike)) is bool(context_turns)


def test_vector_context_score_is_the_weighted_mean_of_the_sessions_neighbours(alice, agent, settings):
    """A turn's vector score is (own_weight x its cosine + its session neighbours' cosines) / their count."""
    from memory.indexing.flush import flush_pending

    settings.MEMFUSE = {**settings.MEMFUSE, "VECTOR_CONTEXT_TURNS": 1, "VECTOR_OWN_WEIGHT": 2}
    trip, other = (session_create(user=alice, agent=agent, name=name) for name in ("trip", "other"))
    rows = messages_add(session=trip, messages=[MessageIn(role="user", content=t) for t in PATAGONIA])
    rows += messages_add(session=other, messages=[MessageIn(role="user", content=t) for t in ELSEWHERE])
    flush_pending(user_id=alice.pk)
    alice.refresh_from_db()
    query = "glacier hike"
    cosines = registry.embed_documents([row.index_text for row in rows]) @ registry.embed_query([query])[0]

    _, scores = _vector_ranking(alice, query)

    # Turn 0 of each session has one neighbour (turn 1), turn 1 two: sessions do not mix.
    for first in (0, 3):
        c0, c1, c2 = cosines[first : first + 3]
        assert scores[DocKey("message", rows[first].pk)] == pytest.approx((2 * c0 + c1) / 3, abs=1e-5)
        assert scores[DocKey("message", rows[first + 1].pk)] == pytest.approx((2 * c1 + c0 + c2) / 4, abs=1e-5)


def test_bm25_index_keys_round_trip_through_its_arrays(alice_session):
    """Every document's key maps to its row and back, whatever its id's bytes (one ends in
    zero bytes, which a fixed-width bytes array would strip); the kind is part of the key."""
    from django.utils import timezone

    from memory.models import Knowledge, Message

    now = timezone.now()
    ids = [uuid.UUID("12345678-1234-4234-8234-000000000000"), uuid.uuid4(), uuid.UUID(int=1 << 120)]
    Message.objects.bulk_create(
        Message(id=doc_id, session=alice_session, user_id=alice_session.user_id, position=i, role="user",
                content=f"kayak trip {i}", index_text=f"kayak trip {i}", created_at=now)
        for i, doc_id in enumerate(ids)
    )
    fact = Knowledge.objects.create(user_id=alice_session.user_id, content="Alice owns a kayak")
    alice_session.user.refresh_from_db()

    entry = retrieval.user_index(alice_session.user_id)
    with entry.lock:
        index = entry.sync(alice_session.user.memory_version + 1)
        keys = [DocKey("message", doc_id) for doc_id in ids] + [DocKey("knowledge", fact.pk)]
        rows = [index.row(key) for key in keys]
        assert sorted(rows) == [0, 1, 2, 3] and [index.key(row) for row in rows] == keys
        assert index.row(DocKey("knowledge", ids[0])) is None and index.row(DocKey("message", uuid.uuid4())) is None
        assert {key for key, _ in index.search(["kayak"], limit=10)} == set(keys)
        index.compact()  # renumbered and sorted: the same answers
        assert [index.key(index.row(key)) for key in keys] == keys
        assert {key for key, _ in index.search(["kayak"], limit=10)} == set(keys)


# --- the named speaker's turns ------------------------------------------------------------------


def _pottery_exchange(session):
    """Melanie's turns match the words of a question about Caroline better than Caroline's
    own answer, which is out of their context window (positions 0 and 5)."""
    melanie = ["Pottery class! The pottery class today was a pottery marathon.", "My hands are still covered in clay.",
               "Next week we glaze the bowls.", "Then they go in the kiln for a day."]
    turns = [(text, "Melanie") for text in melanie] + [
        ("Will you bring one to the picnic?", "Will"),
        ("I loved the class, the teacher was so patient.", "Caroline"),
    ]
    return messages_add(
        session=session,
        messages=[MessageIn(role="user", content=text, metadata={"speaker": speaker}) for text, speaker in turns],
    )


@pytest.mark.parametrize(
    "query, named",
    [
        ("What did Caroline think of the pottery class?", "Caroline"),
        ("What is Caroline's favourite class?", "Caroline"),  # the possessive has the name's lexeme
        ("What did Caroline tell Melanie about pottery?", None),  # two speakers named
        ("What did they think of the pottery class?", None),
        ("What will happen next week?", None),  # "Will" is a stop word: never named
    ],
)
def test_a_query_names_a_speaker_by_a_lexeme_of_their_name(alice_session, query, named):
    """``named_speaker`` finds the only speaker whose name's lexemes occur in the query."""
    _pottery_exchange(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()
    entry = retrieval.user_index(alice.pk)
    with entry.lock:
        index = entry.sync(alice.memory_version)

    code = index.named_speaker(retrieval.query_tokens(query))

    assert index.speakers == ["Melanie", "Will", "Caroline"] and len(index.speaker_lexemes) == 3
    assert sorted(set(index.speaker[: index.n].tolist())) == [0, 1, 2]
    assert code == (None if named is None else index.speakers.index(named))


@pytest.mark.parametrize("speaker_weight", [1.0, 0.0])
def test_the_named_speakers_turns_are_a_third_list_of_the_fusion(alice_session, speaker_weight):
    """A question about Caroline ranks her answer above Melanie's better-matching turn, through
    the 'speaker' list; with its weight at 0, the other retrievers' order stands."""
    rows = _pottery_exchange(alice_session)
    melanie, caroline = rows[0], rows[5]
    alice = alice_session.user
    alice.refresh_from_db()

    hits = retrieval.hybrid_search(
        MemoryQuery(user=alice, query="What did Caroline think of the pottery class?",
                    top_k=3, config=retrieval.RetrievalConfig.from_settings(speaker_weight=speaker_weight))
    )

    keys = [key for key, _, _ in hits]
    melanie, caroline = DocKey("message", melanie.pk), DocKey("message", caroline.pk)
    if speaker_weight:
        assert keys[0] == caroline and hits[0][2]["speaker"]["rank"] == 1
        assert all("speaker" not in found for key, _, found in hits if key != caroline)
    else:
        assert keys.index(melanie) < keys.index(caroline)
        assert all("speaker" not in found for _, _, found in hits)


def test_no_speaker_list_when_the_query_names_both_speakers(alice_session):
    """Naming two speakers adds no third list: the fusion is BM25's and the vector side's alone."""
    _pottery_exchange(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()

    hits = retrieval.hybrid_search(
        MemoryQuery(user=alice, query="Did Caroline and Melanie like the pottery class?", top_k=3)
    )

    assert hits and all(set(found) <= {"bm25", "vector"} for _, _, found in hits)


def test_convex_fusion_takes_the_speaker_list_too(alice_session):
    """Under convex fusion the named speaker's turns are a third list as well (fused again)."""
    rows = _pottery_exchange(alice_session)
    alice = alice_session.user
    alice.refresh_from_db()

    hits = retrieval.hybrid_search(
        MemoryQuery(user=alice, query="What did Caroline think of the pottery class?",
                    top_k=6, config=retrieval.RetrievalConfig.from_settings(fusion="convex"))
    )

    with_list = {key for key, _, found in hits if "speaker" in found}
    assert with_list == {DocKey("message", rows[5].pk)}
    assert all(0.0 <= score <= 1.0 for _, score, _ in hits)


def test_pending_messages_of_one_text_share_a_call_and_a_failed_call_is_asked_again(monkeypatch):
    """Read your writes: pending messages of one text cost one model call, which the query
    model's recent calls of the user keep for the next query; a failed call is forgotten,
    and the next query asks again."""
    from memory.inference import EmbeddingBatcher

    calls, failing = [], {"broken"}

    class Counting:
        dimension = 3

        def embed(self, texts):
            calls.append(list(texts))
            if failing & set(texts):
                raise RuntimeError("model failed")
            return np.array([[len(text), 1.0, 0.0] for text in texts], dtype=np.float32)

    monkeypatch.setattr(registry, "_query_batcher", EmbeddingBatcher(Counting(), max_texts=1))
    monkeypatch.setattr(registry, "_recent", None)
    user_id = uuid.uuid4()

    first = vector.pending_embeddings(user_id=user_id, texts=["same", "same", "other"])
    again = vector.pending_embeddings(user_id=user_id, texts=["other", "same"])
    with pytest.raises(RuntimeError):
        vector.pending_embeddings(user_id=user_id, texts=["broken"])
    failing.clear()
    recovered = vector.pending_embeddings(user_id=user_id, texts=["broken"])

    assert calls == [["same"], ["other"], ["broken"], ["broken"]]
    assert first[:, 0].tolist() == [4, 4, 5] and again[:, 0].tolist() == [5, 4]
    assert recovered[:, 0].tolist() == [6]
