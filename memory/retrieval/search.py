"""Hybrid search over one user's messages and knowledge: BM25 and vector, fused, reranked.

The query is embedded (in the query process) while BM25 runs; BM25's top documents move
the vector side's query (``memory.retrieval.vector``); the two lists (and the named
speaker's turns) are fused (``memory.retrieval.fusion``); a configured cross-encoder
reorders the fused top. Every statement reads one user's rows only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime

from django.db import DataError, connection

from memory import embedding_model, metrics
from memory.inference import registry
from memory.models import Session
from memory.retrieval import fusion, vector
from memory.retrieval.cache import resized, user_index
from memory.retrieval.config import RetrievalConfig
from memory.retrieval.fusion import Hits
from memory.retrieval.keys import DocKey
from memory.retrieval.lexemes import query_tokens
from memory.retrieval.query import MemoryQuery


def _epoch_us(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1_000_000)


def hybrid_search_stages(q: MemoryQuery, *, partial: bool = True) -> Iterator[tuple[str, Hits]]:
    """The search of ``q`` in stages: ``("partial", hits)`` from BM25 alone, then ``("final", hits)``.

    ``hits`` are ``(key, fused_score, retrievers)``, at most ``q.top_k``. BM25 is fast and
    covers pending messages, so a UI can show its ranking before the query is embedded.
    Reads ``q.user``'s ``pk``, ``memory_version`` (the index catches up to it) and
    ``ann_bucket`` (approximate vector search through that index; ``None``: exact).
    ``q.agent_id`` restricts messages to that agent's sessions (knowledge is user-level).
    ``q.since`` / ``q.until`` apply in each retriever before its cut. ``q.session_id`` and
    ``q.layers`` are the selectors' (not read here). With a retriever switched off (weight 0),
    or ``partial=False``, only the final stage comes. Raises
    ``memory.inference.EmbeddingProcessError`` when the query model fails.
    """
    # One generator: the stages share the query's state (index, embedding future, cut), and a
    # split would pass all of it between functions.
    started = time.perf_counter()
    user_id, query, top_k, since, until = q.user.pk, q.query, q.top_k, q.since, q.until
    config = q.config or RetrievalConfig.from_settings()
    sessions = None
    if q.agent_id is not None:
        sessions = list(Session.objects.filter(user_id=user_id, agent_id=q.agent_id).values_list("id", flat=True))
    ranked: dict[str, list] = {}
    # The query is embedded while BM25 runs (its SQL, and a cold user's index load): both are
    # on the critical path, and the model works in its own process.
    if config.vector_weight > 0:
        embedding_model.follow_active_model()
    embedding = registry.submit_query([query], scope=user_id) if config.vector_weight > 0 else None
    entry = user_index(user_id)
    speaker, tokens = None, None
    if config.bm25_weight > 0 or config.speaker_weight > 0:
        tokens = query_tokens(query) if config.bm25_weight > 0 else None
        with entry.lock:
            index = entry.sync(q.user.memory_version)
            has_speakers = bool(index.speakers)
        if tokens is None and config.speaker_weight > 0 and has_speakers:
            tokens = query_tokens(query)
        if tokens is not None:
            with entry.lock:
                index = entry.sync(q.user.memory_version)
                if config.speaker_weight > 0:
                    speaker = index.named_speaker(tokens)
                if config.bm25_weight > 0:
                    with metrics.query_stage("bm25"):
                        ranked["bm25"] = index.search(
                            tokens,
                            limit=config.bm25_candidates,
                            sessions=index.session_codes(sessions) if sessions is not None else None,
                            since_us=_epoch_us(since),
                            until_us=_epoch_us(until),
                        )
        if partial and config.vector_weight > 0 and "bm25" in ranked:
            yield "partial", _fused(ranked, config, entry, speaker, limit=top_k)[:top_k]
    if embedding is not None:
        with metrics.query_stage("embed"):
            query_embedding = embedding.result()[0]
        vector_start = time.perf_counter()
        search = dict(
            user_id=user_id,
            limit=config.vector_candidates,
            ann_bucket=q.user.ann_bucket,
            sessions=sessions,
            since=since,
            until=until,
            feedback=[key for key, _ in ranked.get("bm25", [])[: config.prf_docs]],
            feedback_weight=config.prf_weight,
        )
        try:
            flushed, pending, moved = vector.candidates(embedding=query_embedding, **search)
        except DataError as exc:
            if "different vector dimensions" not in str(exc):
                raise
            # A reembed switched the vectors to a model of another dimension since this
            # process last looked (embedding_model.ACTIVE_MODEL_TTL_SECONDS): follow it now.
            embedding_model.follow_active_model(force=True)
            query_embedding = registry.submit_query([query], scope=user_id).result()[0]
            flushed, pending, moved = vector.candidates(embedding=query_embedding, **search)
        if pending:
            embeddings = vector.pending_embeddings(user_id=user_id, texts=[text for _, _, text, *_ in pending])
            flushed = sorted(flushed + vector.pending_scores(pending, embeddings, moved), key=lambda item: -item[1])
        ranked["vector"] = flushed[: config.vector_candidates]
        metrics.QUERY_STAGE_SECONDS.labels("vector").observe(time.perf_counter() - vector_start)
    resized(entry)  # its index, as it is now
    with metrics.query_stage("fusion"):
        hits = _fused(ranked, config, entry, speaker, limit=max(top_k, config.rerank_top_n) if config.rerank else top_k)
    if config.rerank:
        with metrics.query_stage("rerank"):
            hits = rerank(user_id=user_id, query=query, hits=hits, top_n=config.rerank_top_n)
    metrics.QUERIES.inc()
    metrics.QUERY_SECONDS.observe(time.perf_counter() - started)
    yield "final", hits[:top_k]


def _fused(ranked: dict[str, list], config: RetrievalConfig, entry, speaker: int | None, *, limit: int) -> Hits:
    """``fusion.fuse`` of ``ranked``, with the named speaker's turns when there is one: at
    least the first ``limit`` hits (all of them with a speaker, whose list may lift any)."""
    if speaker is None:
        return fusion.fuse(ranked, config, limit=limit)
    hits = fusion.fuse(ranked, config)
    with entry.lock:
        spoken = fusion.speaker_candidates(hits, entry.index, speaker)
    return fusion.add_speaker(hits, ranked, config, spoken)


def hybrid_search(q: MemoryQuery) -> Hits:
    """The final stage of ``hybrid_search_stages(q)`` (no partial stage is computed)."""
    *_, (_, hits) = hybrid_search_stages(q, partial=False)
    return hits


def document_texts(user_id: uuid.UUID, keys: list[DocKey]) -> dict[DocKey, str]:
    """The indexed text of each of ``keys`` (a message's ``index_text``, a knowledge item's
    content), read from ``user_id``'s rows only; keys not found are absent."""
    message_ids = [key.id for key in keys if key.kind == "message"]
    knowledge_ids = [key.id for key in keys if key.kind == "knowledge"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 'message', id, index_text FROM memory_message WHERE user_id = %(user)s AND id = ANY(%(m)s) "
            "UNION ALL SELECT 'knowledge', id, content FROM memory_knowledge WHERE user_id = %(user)s AND id = ANY(%(k)s)",
            {"user": user_id, "m": message_ids, "k": knowledge_ids},
        )
        return {DocKey(kind, doc_id): text for kind, doc_id, text in cursor.fetchall()}


def rerank(*, user_id: uuid.UUID, query: str, hits: Hits, top_n: int) -> Hits:
    """The first ``top_n`` hits reordered by the cross-encoder's relevance to ``query``.

    Each reranked hit keeps its fused score and gains ``retrievers["reranker"] = {"rank",
    "score"}``; hits after ``top_n`` follow unchanged. Ties keep the fused order. Costs one
    cross-encoder call over ``top_n`` (query, document) pairs. Raises
    ``memory.inference.RerankerLoadError`` when no reranker is configured.
    """
    head, tail = hits[:top_n], hits[top_n:]
    if not head:
        return hits
    texts = document_texts(user_id, [key for key, _, _ in head])
    scores = registry.rerank_scores(query, [texts.get(key, "") for key, _, _ in head])
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    reranked = []
    for rank, i in enumerate(order, start=1):
        key, fused, found = head[i]
        reranked.append((key, fused, {**found, "reranker": {"rank": rank, "score": round(float(scores[i]), 6)}}))
    return reranked + tail
