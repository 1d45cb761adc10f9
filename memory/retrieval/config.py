"""The knobs of one query (``RetrievalConfig``), with defaults from ``settings.MEMFUSE``."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class RetrievalConfig:
    """Knobs of one query; defaults from ``settings.MEMFUSE``.

    ``bm25_candidates`` / ``vector_candidates``: the most documents each retriever
    contributes to the fusion (a query asking for more than their sum gets fewer).
    ``rerank``: whether the fused top ``rerank_top_n`` go through the cross-encoder (only
    possible with ``RERANKER_MODEL_PATH``). A weight of 0 switches its retriever off.
    ``prf_docs`` / ``prf_weight``: the vector retriever's query moves toward BM25's top
    ``prf_docs`` documents (``memory.retrieval.vector``; 0 docs: off). ``fusion``: ``"rrf"``
    or ``"convex"`` (``memory.retrieval.fusion``). ``speaker_weight``: the RRF weight of the
    named speaker's turns (0: off).

    How many neighbouring turns smooth each side is not a per-query knob: BM25's window
    (``BM25_CONTEXT_TURNS``) is applied by the index at query time from the settings, and the
    vector side's (``VECTOR_CONTEXT_TURNS``) is stored in each message's context embedding.
    """

    rrf_k: int
    bm25_weight: float
    vector_weight: float
    bm25_candidates: int
    vector_candidates: int
    rerank: bool
    rerank_top_n: int
    prf_docs: int = 0
    prf_weight: float = 0.0
    fusion: str = "rrf"
    speaker_weight: float = 0.0

    @classmethod
    def from_settings(cls, **overrides) -> RetrievalConfig:
        """The configured defaults with ``overrides`` (``None`` values ignored) applied."""
        config = settings.MEMFUSE
        values = {
            "rrf_k": config["RRF_K"],
            "bm25_weight": config["BM25_WEIGHT"],
            "vector_weight": config["VECTOR_WEIGHT"],
            "bm25_candidates": config["BM25_CANDIDATES"],
            "vector_candidates": config["VECTOR_CANDIDATES"],
            "rerank": bool(config["RERANK"] and config["RERANKER_MODEL_PATH"]),
            "rerank_top_n": config["RERANK_TOP_N"],
            "prf_docs": config["VECTOR_PRF_DOCS"],
            "prf_weight": config["VECTOR_PRF_WEIGHT"],
            "fusion": config["FUSION"],
            "speaker_weight": config["SPEAKER_WEIGHT"],
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
