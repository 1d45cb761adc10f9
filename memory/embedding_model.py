"""Which embedding model the stored vectors come from, and how serving processes follow it.

The active ``EmbeddingModel`` row names the model of the vectors in ``memory_message`` and
``memory_knowledge``; without one they are the configured model's. ``reembed``
(``memory.indexing.reembed``) replaces them and the row in one transaction; every process that
embeds (web, ``runworker``, their inference children) reads the row at most every
``ACTIVE_MODEL_TTL_SECONDS`` (one indexed read) and reloads when it changed
(``registry.use_embedding_model``).

A vector must never be written by one model into columns that hold another's: every write
of embeddings (a flush's, a knowledge item's) runs ``memory.embedding_guard.guard_write``
in its transaction. It takes a shared transaction-level advisory lock, which the switch takes
exclusively, and checks that the active model is still the one that embedded; if not it raises
``ModelChanged`` and the caller embeds again with the new model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.db import connection

from memory import inference
from memory.inference import registry
from memory.models import EmbeddingModel

# How stale a process's idea of the active model may be (s): the window in which a query
# embedded by the old model may meet the new model's vectors after a switch. A dimension
# mismatch in that window is caught and retried at once (memory.retrieval.search).
ACTIVE_MODEL_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class ActiveModel:
    """The active ``EmbeddingModel`` row: ``id`` (``None``: no row, the configured model),
    model directory ``path`` and output ``dimension``."""

    id: int | None
    path: Path
    dimension: int | None


_lock = threading.Lock()
_cached: tuple[float, ActiveModel] | None = None


def active_model(*, max_age: float = ACTIVE_MODEL_TTL_SECONDS) -> ActiveModel:
    """The active model, read from the database at most every ``max_age`` seconds."""
    global _cached
    now = time.monotonic()
    cached = _cached
    if cached is not None and now - cached[0] < max_age:
        return cached[1]
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, path, dimension FROM memory_embeddingmodel WHERE state = 'active'")
        row = cursor.fetchone()
    model = ActiveModel(row[0], Path(row[1]), row[2]) if row else ActiveModel(None, inference.default_model_path(), None)
    with _lock:
        _cached = (now, model)
    return model


def forget_active_model() -> None:
    """Drop the cached row: the next ``active_model`` reads it."""
    global _cached
    with _lock:
        _cached = None


def follow_active_model(*, force: bool = False) -> int | None:
    """Make this process embed with the active model (loading it on the next embedding if
    it changed; the query model's recent calls, pending messages' embeddings among them, are
    dropped with the old model: ``registry.use_embedding_model``). Returns the active row's
    id, what ``guard_write`` compares. ``force``: read the row now.
    """
    model = active_model(max_age=0.0 if force else ACTIVE_MODEL_TTL_SECONDS)
    if model.id is None and registry.serving_model_path() == model.path:
        return None
    dimension = model.dimension or inference.model_dimension_from_config(model.path) or 0
    registry.use_embedding_model(model.path, dimension)
    return model.id


def embedding_models_overview() -> dict:
    """For the operator dashboard: ``{"active": row or None, "reembed": row or None}``, each
    ``{"name", "path", "dimension", "phase", "done", "total", "texts_per_second",
    "raw_texts_per_second", "updated_at" (ISO 8601)}``: the model of the stored vectors (no
    row: the configured one) and an unfinished ``reembed`` run's progress."""
    rows = {
        row.state: row
        for row in EmbeddingModel.objects.filter(state__in=[EmbeddingModel.State.ACTIVE, EmbeddingModel.State.BUILDING])
    }

    def as_dict(row):
        if row is None:
            return None
        return {
            "name": row.name,
            "path": row.path,
            "dimension": row.dimension,
            "phase": row.phase,
            "done": row.done,
            "total": row.total,
            "texts_per_second": row.texts_per_second,
            "raw_texts_per_second": row.raw_texts_per_second,
            "updated_at": row.updated_at.isoformat(),
        }

    return {"active": as_dict(rows.get("active")), "reembed": as_dict(rows.get("building"))}
