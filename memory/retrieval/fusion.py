"""Fusion of the retrievers' ranked lists: weighted reciprocal rank fusion, or a convex sum.

**RRF** (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet and
individual Rank Learning Methods", SIGIR 2009): ``score(d) = sum_r w_r / (k + rank_r(d))``,
ranks from 1, ``k = 60`` (the paper's value). The weights are configuration
(``BM25_WEIGHT``, ``VECTOR_WEIGHT``); docs/retrieval.md has the measurements behind them.

**The named speaker's turns** (``speaker_candidates``, ``add_speaker``): when the query names one of the
conversation's speakers, that speaker's turns, in the fused order, are a third list.
"""

from __future__ import annotations

from operator import itemgetter

from memory.retrieval.bm25 import BM25Index
from memory.retrieval.config import RetrievalConfig
from memory.retrieval.keys import DocKey

Ranked = list[tuple[DocKey, float]]
Hits = list[tuple[DocKey, float, dict]]


def rrf_fuse(ranked_lists: dict[str, Ranked], weights: dict[str, float], k: int, *, limit: int | None = None) -> Hits:
    """Weighted reciprocal rank fusion of ranked lists (see the module docstring).

    ``ranked_lists[name]`` is ``[(key, retriever_score), ...]`` best first. Returns
    ``[(key, fused_score, {name: {"rank": r, "score": s}})]`` sorted by fused score, ties
    broken by the first list's order; only the first ``limit`` of them with a ``limit``.
    """
    # Scores first, the retrievers' dicts only for the hits returned: this runs on every
    # query, over a few hundred candidates of which a caller keeps ``top_k``.
    fused: dict[DocKey, float] = {}
    for name, ranked in ranked_lists.items():
        weight = weights.get(name, 1.0)
        for rank, (key, _) in enumerate(ranked, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    ordered = sorted(fused.items(), key=itemgetter(1), reverse=True)  # stable: ties keep insertion order
    if limit is not None:
        ordered = ordered[:limit]
    positions = {name: {key: (rank, score) for rank, (key, score) in enumerate(ranked, start=1)} for name, ranked in ranked_lists.items()}
    hits = []
    for key, score in ordered:
        found = {}
        for name, where in positions.items():
            position = where.get(key)
            if position is not None:
                found[name] = {"rank": position[0], "score": round(position[1], 6)}
        hits.append((key, score, found))
    return hits


def convex_fuse(ranked_lists: dict[str, Ranked], weights: dict[str, float]) -> Hits:
    """Convex combination of min-max normalised scores: ``sum_r w_r / W * norm_r(d)``.

    An alternative to RRF (Bruch, Gai & Ingber, "An Analysis of Fusion Functions for Hybrid
    Retrieval", ACM TOIS 2023): it uses how far apart the scores are, not only the ranks.
    Each list's scores are scaled to [0, 1] by its own min and max (a list of one scores 1);
    a document missing from a list gets 0 there. Same input and output shapes as
    ``rrf_fuse``.
    """
    total = sum(weights.get(name, 1.0) for name in ranked_lists) or 1.0
    fused: dict[DocKey, float] = {}
    found: dict[DocKey, dict] = {}
    for name, ranked in ranked_lists.items():
        if not ranked:
            continue
        weight = weights.get(name, 1.0) / total
        scores = [score for _, score in ranked]
        low, span = min(scores), max(scores) - min(scores)
        for rank, (key, score) in enumerate(ranked, start=1):
            normalised = (score - low) / span if span > 0 else 1.0
            fused[key] = fused.get(key, 0.0) + weight * normalised
            found.setdefault(key, {})[name] = {"rank": rank, "score": round(score, 6)}
    ordered = sorted(fused.items(), key=lambda item: -item[1])
    return [(key, score, found[key]) for key, score in ordered]


def fuse(ranked_lists: dict[str, Ranked], config: RetrievalConfig, *, limit: int | None = None) -> Hits:
    """The ranked lists fused as ``config.fusion`` says (``rrf_fuse`` or ``convex_fuse``);
    only the first ``limit`` hits with a ``limit``."""
    weights = {"bm25": config.bm25_weight, "vector": config.vector_weight, "speaker": config.speaker_weight}
    if config.fusion == "convex":
        return convex_fuse(ranked_lists, weights)[:limit]
    return rrf_fuse(ranked_lists, weights, config.rrf_k, limit=limit)


def speaker_candidates(hits: Hits, index: BM25Index, speaker: int) -> Ranked:
    """The ``hits`` spoken by ``speaker`` (a code of ``index``), in their order, as ``(key, fused score)``.

    The third ranked list of the fusion when the query names one of the conversation's
    speakers (``BM25Index.named_speaker``): a question about a person is mostly answered by
    that person's own turns (in the LoCoMo development file, 96.5% of the evidence turns of
    questions naming one speaker are that speaker's), while BM25's context windows and the
    vector side's neighbour smoothing rank both sides of an exchange alike. As one more list
    of the RRF, not a filter: the other speaker's turns keep their place when both
    retrievers agree on them. Hits the index does not hold are left out. Caller holds the
    index's lock.
    """
    spoken = index.spoken_by([key for key, _, _ in hits], speaker)
    return [(key, score) for (key, score, _), said in zip(hits, spoken) if said]


def add_speaker(hits: Hits, ranked: dict[str, Ranked], config: RetrievalConfig, spoken: Ranked) -> Hits:
    """``hits`` (``fuse`` of ``ranked``) with ``spoken`` (the named speaker's hits among them,
    ``speaker_candidates``) as a third list.

    Under RRF the third list only adds ``speaker_weight / (k + rank)`` to its documents' fused
    scores, so it is added in one pass over the hits; convex fusion renormalises every list,
    so it fuses again.
    """
    if config.fusion == "convex":
        return fuse({**ranked, "speaker": spoken}, config)
    ranks = {key: rank for rank, (key, _) in enumerate(spoken, start=1)}
    rescored = []
    for key, score, found in hits:
        rank = ranks.get(key)
        if rank is not None:
            found = {**found, "speaker": {"rank": rank, "score": round(score, 6)}}
            score += config.speaker_weight / (config.rrf_k + rank)
        rescored.append((key, score, found))
    rescored.sort(key=lambda hit: -hit[1])
    return rescored
