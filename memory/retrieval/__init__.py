"""Hybrid retrieval over one user's messages and knowledge: BM25 and vector, fused by weighted RRF.

One module per concern:

- ``bm25``: the lexical index, updated in place as documents change (``BM25Index``);
- ``bm25_scoring``: BM25's scores and the index's queries (a base class of ``BM25Index``);
- ``bm25_snapshot``: the index's snapshot format, written and read in parts;
- ``store``: that index and the database (built, loaded from a snapshot, caught up);
- ``vector``: the vector retriever (context embeddings in PostgreSQL, exact or HNSW search);
- ``fusion``: RRF, convex fusion, the named speaker's list;
- ``cache``: the per-user services in an LRU cache bounded in bytes (tier 2);
- ``query``: what one query asks (``MemoryQuery``);
- ``search``: the query itself (``hybrid_search``), and the optional reranking.

docs/retrieval.md describes the pipeline and its measurements.
"""

from memory.retrieval.bm25 import BM25Index
from memory.retrieval.cache import UserIndex, cache_stats, cached_user_index, reset_user_cache, user_index
from memory.retrieval.config import RetrievalConfig
from memory.retrieval.fusion import convex_fuse, rrf_fuse
from memory.retrieval.keys import DocKey
from memory.retrieval.lexemes import query_tokens, tsvector_tokens
from memory.retrieval.query import MemoryQuery
from memory.retrieval.search import document_texts, hybrid_search, hybrid_search_stages, rerank

__all__ = [
    "BM25Index",
    "DocKey",
    "MemoryQuery",
    "RetrievalConfig",
    "UserIndex",
    "cache_stats",
    "cached_user_index",
    "convex_fuse",
    "document_texts",
    "hybrid_search",
    "hybrid_search_stages",
    "query_tokens",
    "rerank",
    "reset_user_cache",
    "rrf_fuse",
    "tsvector_tokens",
    "user_index",
]
