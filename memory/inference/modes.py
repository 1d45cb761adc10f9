"""Where this process's models run and what embeds stored documents, read from the settings.

Plain functions of ``settings.MEMFUSE``, read at each call (tests change the settings):
whether documents are embedded by the int8 model (``documents_int8``), whether the query
model's embedding is the one a flush writes (``queries_embed_documents``), the torch threads
of the process's own model (``serving_threads``), the reranker's path (``reranker_path``) and
whether a serving process needs the full model itself (``needs_own_model``).
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings


def documents_int8() -> bool:
    """Whether stored documents are embedded by the int8 model (``DOCUMENT_EMBEDDING_INT8``),
    each text alone, as queries are: then a pending message embedded on demand by the query
    model has exactly the embedding its flush writes."""
    return settings.MEMFUSE["DOCUMENT_EMBEDDING_INT8"]


def queries_embed_documents() -> bool:
    """Whether the query model gives exactly the embedding a flush writes (the same int8
    model, one text per call: ``DOCUMENT_EMBEDDING_INT8`` and ``QUERY_EMBEDDING_INT8``). Then
    a pending message a query embedded for read-your-writes need not be embedded again by
    its flush."""
    return documents_int8() and settings.MEMFUSE["QUERY_EMBEDDING_INT8"]


def serving_threads() -> int:
    """torch threads of this process's model: ``QUERY_TORCH_THREADS`` when flushes embed in the
    background process (this model then embeds a few texts at a time: queries with
    ``QUERY_EMBEDDING="thread"``, pending messages on demand; a second thread barely helps
    there and, on a busy machine, makes one encode many times slower), else ``TORCH_THREADS``
    (it embeds the flushes' batches too)."""
    config = settings.MEMFUSE
    return config["QUERY_TORCH_THREADS"] if config["BACKGROUND_EMBEDDING"] == "process" else config["TORCH_THREADS"]


def reranker_path() -> Path | None:
    """The configured ``RERANKER_MODEL_PATH``, or ``None``: reranking is off without one."""
    configured = settings.MEMFUSE["RERANKER_MODEL_PATH"]
    return Path(configured) if configured else None


def needs_own_model() -> bool:
    """Whether a serving process needs the full model itself: when queries or flushes are
    embedded in the process (``"thread"`` modes), or documents by the full model (knowledge
    items are embedded where the add runs). Otherwise its models are in child processes."""
    config = settings.MEMFUSE
    in_process = config["QUERY_EMBEDDING"] == "thread" or config["BACKGROUND_EMBEDDING"] == "thread"
    return in_process or not documents_int8() or not config["QUERY_EMBEDDING_INT8"]
