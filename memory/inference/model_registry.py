"""The process-wide model registry: ``registry``, the one ``ModelRegistry`` of the process.

One embedding model per process, and optionally one cross-encoder reranker
(``RERANKER_MODEL_PATH``), each loaded once under the registry's lock and shared by every user
and request. A serving process fills the registry at its start-up, before its first request
(``preload``, from ``memory.startup.load_models`` once its entry point declared what the
process serves: ``runtime.roles``); other processes (``migrate``, ``check``, tests) load a model on
its first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import numpy as np
from django.conf import settings

from memory.inference import builders
from memory.inference.batcher import BACKGROUND, INTERACTIVE, EmbeddingBatcher
from memory.inference.encoders import Embedder, QueryEmbedder, default_model_path, model_name
from memory.inference.modes import documents_int8, needs_own_model, queries_embed_documents, reranker_path
from memory.inference.process import ProcessEmbedder
from memory.inference.recent import RecentEmbeddings
from memory.inference.reranker import Reranker, RerankerLoadError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The registry's slots: each holds one lazily built object, or None.
SLOTS = (
    "_embedder",
    "_query_embedder",
    "_batcher",
    "_query_batcher",
    "_background_batcher",
    "_local_document_embedder",
    "_recent",
    "_reranker",
)


def document_model() -> dict:
    """``registry.document_model()``: the model stored embeddings come from."""
    return registry.document_model()


class ModelRegistry:
    """The models of this process, each built once on first use (or by ``preload``).

    Thread-safe: every slot is filled under one re-entrant lock (a slot's builder may need
    another slot, e.g. the batcher its model). Embeddings are ``(n, dim)`` float32 arrays of
    L2-normalised rows. ``INTERACTIVE`` and ``BACKGROUND`` are the priorities of ``embed`` and
    ``submit_query``: interactive requests (queries) go before background ones (flushes).
    """

    INTERACTIVE = INTERACTIVE
    BACKGROUND = BACKGROUND

    # Read by callers that only hold the registry (``registry.queries_embed_documents()``).
    documents_int8 = staticmethod(documents_int8)
    queries_embed_documents = staticmethod(queries_embed_documents)

    def __init__(self) -> None:
        self._lock = threading.RLock()
        for slot in SLOTS:
            setattr(self, slot, None)
        # The model of the active ``EmbeddingModel`` row, once ``use_embedding_model`` followed
        # it: ``(path, dimension)``; ``None``: the configured model (``default_model_path``).
        self._active_model: tuple[Path, int] | None = None

    def reset(self) -> None:
        """Forget every model (for tests): the next use builds them again from the settings of
        that moment. Child processes this registry started are stopped; batcher threads of
        the old models stay idle on their empty queues."""
        with self._lock:
            held = [getattr(self, slot) for slot in SLOTS]
            for slot in SLOTS:
                setattr(self, slot, None)
            self._active_model = None
        self._close(held)

    @staticmethod
    def _close(held: list) -> None:
        for item in held:
            embedder = item.embedder if isinstance(item, EmbeddingBatcher) else item
            if isinstance(embedder, ProcessEmbedder):
                embedder.close()

    # --- the embedding model in use ----------------------------------------------------------

    def serving_model_path(self) -> Path:
        """The model this process embeds with: the one ``use_embedding_model`` switched to, else
        ``default_model_path()``."""
        return self._active_model[0] if self._active_model is not None else default_model_path()

    def use_embedding_model(self, path: Path, dimension: int) -> bool:
        """Embed with the model at ``path`` (``dimension`` outputs) from now on: after a
        ``reembed`` switched the stored vectors to it (``memory.embedding_model``). Drops the
        embedding models, their batchers and child processes (not the reranker); the next call
        loads ``path``. Requests in flight on the old model finish on it (their callers then see
        the new model's vectors stored: ``memory.embedding_guard.ModelChanged``). Returns
        whether anything changed.
        """
        with self._lock:
            if self.serving_model_path() == path:
                if self._active_model is None or self._active_model[0] != path:
                    self._active_model = (path, dimension)
                return False
            self._active_model = (path, dimension)
            held = [getattr(self, slot) for slot in SLOTS if slot != "_reranker"]
            for slot in SLOTS:
                if slot != "_reranker":
                    setattr(self, slot, None)
        self._close(held)
        logger.info("embedding model switched to %s (dimension %d)", path, dimension)
        return True

    def document_model(self) -> dict:
        """The model stored embeddings come from: ``{"model": name, "dimension": n}``.

        ``name`` is ``model_name`` of the serving model's directory, with ``+int8`` when
        documents are embedded by the int8 copy (``DOCUMENT_EMBEDDING_INT8``): its vectors
        differ slightly from the full model's. ``dimension`` is ``EMBEDDING_DIM``, or the
        model's once this process followed a ``reembed`` (``use_embedding_model``). Loads
        nothing. What an export records next to its embeddings and an import compares
        (``memory.portability``).
        """
        name = model_name(self.serving_model_path())
        if documents_int8():
            name += "+int8"
        active = self._active_model
        return {"model": name, "dimension": active[1] if active is not None else settings.MEMFUSE["EMBEDDING_DIM"]}

    def _slot(self, slot: str, build: Callable[[], T]) -> T:
        """The object in ``slot``, built by ``build()`` under the lock when the slot is empty."""
        value = getattr(self, slot)
        if value is None:
            with self._lock:
                value = getattr(self, slot)
                if value is None:
                    value = build()
                    setattr(self, slot, value)
        return value

    # --- models -----------------------------------------------------------------------------

    def get_embedder(self) -> Embedder:
        """The process's embedding model, loaded on first use."""
        return self._slot("_embedder", lambda: builders.load_embedder(self.serving_model_path()))

    def loaded_embedder(self) -> Embedder | None:
        """The embedding model if this process has loaded it, without loading it."""
        return self._embedder

    def get_query_embedder(self) -> Embedder | QueryEmbedder | ProcessEmbedder:
        """What embeds queries. ``QUERY_EMBEDDING="process"`` (default): a ``ProcessEmbedder``
        child at normal priority holding the int8 ``QueryEmbedder`` (``QUERY_EMBEDDING_INT8``)
        or the full model; ``"thread"``: the int8 ``QueryEmbedder`` built once from this
        process's model, else the model itself. The child is spawned here and may still be
        loading: its first ``embed`` (or ``wait_ready``) waits for it."""
        config = settings.MEMFUSE
        if config["QUERY_EMBEDDING"] == "process":
            return self._slot("_query_embedder", lambda: builders.spawn_query_process(self.serving_model_path()))
        if not config["QUERY_EMBEDDING_INT8"]:
            return self.get_embedder()
        return self._slot("_query_embedder", lambda: builders.build_query_embedder(self.get_embedder()))

    def local_document_embedder(self) -> Embedder | QueryEmbedder:
        """This process's own copy of the document model (tools that bulk-load rows as flushes
        write them): the int8 ``QueryEmbedder`` built from this process's model, or the model."""
        if not documents_int8():
            return self.get_embedder()
        return self._slot("_local_document_embedder", lambda: QueryEmbedder(self.get_embedder()))

    def get_reranker(self) -> Reranker | None:
        """The process's cross-encoder, loaded on first use; ``None`` when none is configured.

        Raises ``RerankerLoadError`` when the configured path holds no loadable model.
        """
        path = reranker_path()
        if path is None:
            return None
        return self._slot("_reranker", lambda: builders.load_reranker(path))

    # --- inference --------------------------------------------------------------------------

    def embed(self, texts: list[str], *, priority: int = INTERACTIVE) -> np.ndarray:
        """Embed ``texts``: ``(n, dim)`` float32, L2-normalised rows.

        ``INTERACTIVE`` requests go to the process's model through its ``EmbeddingBatcher``, so
        concurrent callers share model calls. ``BACKGROUND`` requests (flushes) go to the
        background batcher: by default (``BACKGROUND_EMBEDDING="process"``) a niced child
        process with its own copy of the model (``ProcessEmbedder``); with ``"thread"``, the
        process's model on a niced thread. Raises ``EmbeddingProcessError`` when the
        background process fails.
        """
        if priority == BACKGROUND:
            return self._get_background_batcher().embed(texts, priority=priority)
        batcher = self._slot("_batcher", lambda: builders.interactive_batcher(self.get_embedder()))
        return batcher.embed(texts, priority=priority)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Embed search queries: ``(n, dim)`` float32, L2-normalised rows.

        Through ``get_query_embedder()`` (int8 by default) and its own ``EmbeddingBatcher``, so
        concurrent queries share model calls, and a query never waits behind the embedding of
        pending documents. Documents go through ``embed``. Raises ``EmbeddingProcessError``
        when the query process fails.
        """
        return self.submit_query(texts).result()

    def submit_query(self, texts: list[str], *, priority: int = INTERACTIVE, scope: object = None) -> Future:
        """``embed_query`` without waiting: a ``Future`` of the rows (the caller works meanwhile).

        ``BACKGROUND``: texts that may wait behind every query (pending messages embedded ahead
        of the queries that will need them: ``read_ahead``).
        With a ``scope`` (the user's id), one text that the query model embedded a moment ago
        for that scope, or is embedding now, is not embedded again (``RecentEmbeddings``): the
        future of that call is returned, promoted to query priority when ``INTERACTIVE``. In
        the chat pattern the turn's query is the user's message that the next add stores, and
        with ``queries_embed_documents()`` that message's embedding is the query's. Scoped by user, so that one tenant's texts never make
        another's queries faster (a timing channel between tenants).
        """
        return self._submit_query(texts, priority=priority, scope=scope)

    def _submit_query(self, texts: list[str], *, priority: int, scope: object, bounds: tuple = ()) -> Future:
        batcher = self._slot("_query_batcher", lambda: builders.query_batcher(self.get_query_embedder()))
        recent = self._recent_embeddings() if scope is not None and len(texts) == 1 else None
        if recent is not None:
            future = recent.get(scope, texts[0])
            # A query must not wait behind read-ahead; one cancelled meanwhile (past its bound)
            # is asked for again.
            if future is not None and (priority != INTERACTIVE or batcher.promote(future, texts)):
                return future
        future = batcher.submit(texts, priority=priority, bounds=bounds)
        if recent is not None:
            recent.put(scope, texts[0], future)
        return future

    def read_ahead(self, text: str, *, user_id: object, tenant_id: object) -> Future:
        """Start the query model on ``text``, a pending message of ``user_id`` that a query will
        soon want (read your writes: ``memory.services.messages._start_embeddings``; the query
        finds it in ``RecentEmbeddings``, ``memory.retrieval.vector.pending_embeddings``):
        ``submit_query([text], priority=BACKGROUND, scope=user_id)``, bounded. At most
        ``PENDING_EMBED_MAX`` read-ahead requests of a user stay queued (a query only ever
        asks for the user's newest that many) and ``READ_AHEAD_MAX`` of a
        tenant (a tenant's many users share it; tenants are few, made by operators). Past a
        bound the oldest is cancelled and never embedded: a query that then needs it embeds
        it on demand. A request a query promoted is never cancelled. The future may come out
        cancelled: treat it as absent.
        """
        config = settings.MEMFUSE
        bounds = ((("user", user_id), config["PENDING_EMBED_MAX"]), (("tenant", tenant_id), config["READ_AHEAD_MAX"]))
        return self._submit_query([text], priority=BACKGROUND, scope=user_id, bounds=bounds)

    def cancel_read_ahead(self, future: Future) -> bool:
        """Cancel a ``read_ahead`` request no query waits for, if it is still queued (a user's
        pending embedding that is not wanted any more); returns whether it was."""
        batcher = self._query_batcher
        return batcher.cancel(future) if batcher is not None else False

    def read_ahead_queued(self, *, user_id: object = None, tenant_id: object = None) -> int:
        """``read_ahead`` requests of ``user_id`` (else of ``tenant_id``) still queued."""
        batcher = self._query_batcher
        if batcher is None:
            return 0
        return batcher.queued(("user", user_id) if user_id is not None else ("tenant", tenant_id))

    def recent_query_embeddings(self, texts: list[str], *, scope: object, wait_seconds: float = 0.0) -> dict[str, np.ndarray]:
        """The query model's embeddings of those of ``texts`` it computed a moment ago for
        ``scope``, or is computing (``RecentEmbeddings``): ``{text: (dim,) float32}``. Calls
        still under way are waited for up to ``wait_seconds`` in all; those that fail or are
        not done by then are left out."""
        return self._recent_embeddings().embeddings(scope, texts, wait_seconds=wait_seconds)

    def forget_recent_embeddings(self, scope: Hashable) -> None:
        """Drop what ``RecentEmbeddings`` holds for ``scope`` (a user deleted or replaced)."""
        recent = self._recent
        if recent is not None:
            recent.forget(scope)

    def _recent_embeddings(self) -> RecentEmbeddings:
        # A slot: forgotten with the query model (reset, use_embedding_model), whose vectors it
        # holds. That is how pending embeddings follow a model change.
        config = settings.MEMFUSE
        return self._slot(
            "_recent", lambda: RecentEmbeddings(config["RECENT_EMBEDDINGS"], config["RECENT_EMBEDDINGS_PER_USER"])
        )

    def promote_query(self, future: Future, texts: list[str]) -> bool:
        """A ``submit_query(texts, priority=BACKGROUND)`` (or ``read_ahead``) request that a
        query now waits for: queued again at query priority (``EmbeddingBatcher.promote``), and
        never cancelled from now on. ``False`` when it was cancelled already: ask again."""
        batcher = self._query_batcher
        if batcher is not None:
            return batcher.promote(future, texts)
        return not future.cancelled()

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        """Embed documents now, at query priority (a knowledge item, whose add waits for it),
        with the model flushes use: ``(n, dim)`` float32, L2-normalised rows. With
        ``DOCUMENT_EMBEDDING_INT8`` that is the query model (the same int8 model, text by
        text), else this process's model. Raises ``EmbeddingProcessError`` when the model's
        process fails.
        """
        if queries_embed_documents():
            return self.submit_query(texts).result()
        if documents_int8():
            return self._get_background_batcher().embed(texts)
        return self.embed(texts)

    def rerank_scores(self, query: str, texts: list[str]) -> np.ndarray:
        """Cross-encoder relevance of ``texts`` to ``query`` (``(n,)`` float32, higher is better).

        Raises ``RerankerLoadError`` when no reranker is configured or it cannot be loaded.
        """
        reranker = self.get_reranker()
        if reranker is None:
            raise RerankerLoadError("no reranker is configured (RERANKER_MODEL_PATH)")
        return reranker.score(query, texts)

    def _get_background_batcher(self) -> EmbeddingBatcher:
        return self._slot(
            "_background_batcher",
            lambda: builders.background_batcher(self.serving_model_path(), self.local_document_embedder),
        )

    def start_background_embedder(self) -> None:
        """Start the background inference now rather than at the first flush (serving
        processes), and wait for its model: a failure to load it is raised (and logged) here."""
        embedder = self._get_background_batcher().embedder
        if isinstance(embedder, ProcessEmbedder):
            embedder.wait_ready()

    # --- start and statistics ---------------------------------------------------------------

    def preload(self, *, queries: bool = True, documents: bool = False) -> None:
        """Load what this serving process needs now, not at its first request: the query model
        (``queries``), the flushes' model (``documents``: this process flushes), its own full
        model only when ``needs_own_model()``, and the reranker. Child processes load theirs
        side by side. Idempotent. Raises ``EmbeddingProcessError`` or ``RerankerLoadError``
        when a model fails to load.
        """
        query = self.get_query_embedder() if queries else None
        background = self._get_background_batcher().embedder if documents else None
        if needs_own_model():
            self.get_embedder()  # the child processes load their models meanwhile
        for embedder in (query, background):
            if isinstance(embedder, ProcessEmbedder):
                embedder.wait_ready()
        self.get_reranker()

    def stats(self) -> dict:
        """Statistics for operators: which models are loaded and their counters.

        ``{"embedding", "query_embedding", "background_embedding", "reranker"}``, each ``None``
        when not loaded, else a dict of the model's ``ModelStats`` (seconds, calls, texts), and
        ``"recent_embeddings"``: ``RecentEmbeddings.stats()`` (the query model's recent calls,
        pending messages' embeddings among them), ``None`` before the first.
        """
        embedder, reranker, query = self._embedder, self._reranker, self._query_embedder
        background = self._background_batcher.embedder if self._background_batcher is not None else None
        result: dict = {"embedding": None, "query_embedding": None, "background_embedding": None, "reranker": None}
        if embedder is not None:
            result["embedding"] = {"path": str(embedder.path), "dimension": embedder.dimension, **embedder.stats.as_dict()}
        if isinstance(query, ProcessEmbedder):
            result["query_embedding"] = {
                "mode": "process", "pid": query.pid, "int8": query.int8, "torchscript": query.traced,
                "concurrency": query.concurrency, **query.stats.as_dict()
            }  # fmt: skip
        elif query is not None:
            result["query_embedding"] = {"mode": "thread", "int8": True, "torchscript": query.traced, **query.stats.as_dict()}
        if isinstance(background, ProcessEmbedder):
            result["background_embedding"] = {"mode": "process", "pid": background.pid, **background.stats.as_dict()}
        elif background is not None:
            result["background_embedding"] = {"mode": "thread"}
        if reranker is not None:
            result["reranker"] = {"path": str(reranker.path), **reranker.stats.as_dict()}
        recent = self._recent
        result["recent_embeddings"] = recent.stats() if recent is not None else None
        return result


registry = ModelRegistry()
