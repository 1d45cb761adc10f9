"""Tier 1: model inference, one registry of models per process.

- ``encoders``: the embedding model (``Embedder``), its int8 query copy (``QueryEmbedder``) and
  that copy's TorchScript trace (``TracedEncoder``);
- ``process``: a model in a child process (``ProcessEmbedder``) and the child's main;
- ``batcher``: one model call for the requests of many callers (``EmbeddingBatcher``);
- ``reranker``: the cross-encoder (``Reranker``);
- ``modes``: where the models run and what embeds stored documents, from the settings;
- ``builders``: how each model and batcher is built from the settings;
- ``model_registry``: ``registry``, the process's ``ModelRegistry``, which holds each of them,
  built once, and is what the rest of the service calls (``registry.embed``,
  ``registry.submit_query``, ``registry.rerank_scores``, ``registry.stats``).
"""

from memory.inference.batcher import BACKGROUND, INTERACTIVE, EmbeddingBatcher
from memory.inference.encoders import (
    Embedder,
    ModelStats,
    QueryEmbedder,
    TracedEncoder,
    default_model_path,
    model_dimension_from_config,
    model_name,
)
from memory.inference.model_registry import ModelRegistry, document_model, registry
from memory.inference.modes import documents_int8, queries_embed_documents, reranker_path
from memory.inference.process import EmbeddingProcessError, ProcessEmbedder
from memory.inference.reranker import Reranker, RerankerLoadError

__all__ = [
    "BACKGROUND",
    "INTERACTIVE",
    "EmbeddingBatcher",
    "EmbeddingProcessError",
    "Embedder",
    "ModelRegistry",
    "ModelStats",
    "ProcessEmbedder",
    "QueryEmbedder",
    "Reranker",
    "RerankerLoadError",
    "TracedEncoder",
    "default_model_path",
    "model_dimension_from_config",
    "model_name",
    "document_model",
    "documents_int8",
    "queries_embed_documents",
    "registry",
    "reranker_path",
]
