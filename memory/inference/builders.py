"""How each model and batcher the registry holds is built from the settings.

One function per slot of ``ModelRegistry`` (``memory.inference.model_registry``), which calls
it once, under its lock, on first use. Each reads ``settings.MEMFUSE`` when it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

from memory.inference.batcher import EmbeddingBatcher
from memory.inference.encoders import Embedder, QueryEmbedder
from memory.inference.modes import documents_int8, serving_threads
from memory.inference.process import ProcessEmbedder
from memory.inference.reranker import Reranker

logger = logging.getLogger("memory.inference.model_registry")


def load_embedder(path: Path) -> Embedder:
    """The full embedding model at ``path``, on ``serving_threads()`` torch threads."""
    embedder = Embedder(path, batch_size=settings.MEMFUSE["EMBEDDING_BATCH_SIZE"], threads=serving_threads())
    logger.info(
        "embedding model loaded from %s in %.2f s (dimension %d)", path, embedder.stats.load_seconds, embedder.dimension
    )
    return embedder


def spawn_query_process(path: Path) -> ProcessEmbedder:
    """The query model in a child process at normal priority (``QUERY_EMBEDDING="process"``):
    the int8 copy of the model at ``path`` (``QUERY_EMBEDDING_INT8``) or the model itself."""
    config = settings.MEMFUSE
    return ProcessEmbedder(
        path,
        batch_size=config["EMBEDDING_BATCH_SIZE"],
        threads=config["QUERY_TORCH_THREADS"],
        nice=0,
        role="query",
        int8=config["QUERY_EMBEDDING_INT8"],
        concurrency=config["QUERY_EMBEDDING_CONCURRENCY"],
    )


def build_query_embedder(embedder: Embedder) -> QueryEmbedder:
    """The int8 copy of ``embedder`` that embeds queries in this process (``QUERY_EMBEDDING="thread"``)."""
    query = QueryEmbedder(embedder)
    logger.info("int8 query embedder built in %.2f s", query.stats.load_seconds)
    return query


def load_reranker(path: Path) -> Reranker:
    """The cross-encoder at ``path``. Raises ``RerankerLoadError`` when it holds no loadable model."""
    config = settings.MEMFUSE
    reranker = Reranker(
        path,
        batch_size=config["EMBEDDING_BATCH_SIZE"],
        threads=serving_threads(),  # torch's thread count is per process
        max_length=config["RERANK_MAX_TOKENS"],
    )
    logger.info("reranker loaded from %s in %.2f s", path, reranker.stats.load_seconds)
    return reranker


def interactive_batcher(embedder: Embedder) -> EmbeddingBatcher:
    """The batcher of this process's model for ``registry.embed``'s interactive requests."""
    return EmbeddingBatcher(embedder, max_texts=settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"])


def query_batcher(embedder: Embedder | QueryEmbedder | ProcessEmbedder) -> EmbeddingBatcher:
    """The batcher of the query model: one worker a call the query process runs at once."""
    return EmbeddingBatcher(
        embedder,
        max_texts=settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"],
        workers=embedder.concurrency if isinstance(embedder, ProcessEmbedder) else 1,
    )


def background_batcher(path: Path, local_document_embedder: Callable[[], Embedder | QueryEmbedder]) -> EmbeddingBatcher:
    """The flushes' batcher: a niced child process with its own copy of the model at ``path``
    (``BACKGROUND_EMBEDDING="process"``), else ``local_document_embedder()`` on a niced thread."""
    config = settings.MEMFUSE
    int8 = documents_int8()
    in_process = config["BACKGROUND_EMBEDDING"] != "process"
    if in_process:
        embedder = local_document_embedder()
    else:
        # int8 embeds one text per call (QueryEmbedder): a second thread does not help it,
        # and leaves the other core to the requests.
        embedder = ProcessEmbedder(
            path,
            batch_size=config["EMBEDDING_BATCH_SIZE"],
            threads=1 if int8 else config["TORCH_THREADS"],
            nice=config["EMBEDDING_NICE"],
            int8=int8,
        )
    return EmbeddingBatcher(
        embedder,
        max_texts=config["EMBEDDING_MAX_BATCH_TEXTS"],
        nice=config["EMBEDDING_NICE"] if in_process else 0,
        linger_seconds=config["EMBEDDING_LINGER_SECONDS"],
    )
