"""The operator's figures: one selector for the admin dashboard and ``GET /api/v1/admin/stats``."""

from __future__ import annotations

import os
import socket

from django.utils import timezone

from buffers import workers
from buffers.selectors import buffers_overview
from memory import retrieval
from memory.embedding_model import embedding_models_overview
from memory.facts.selectors import facts_stats
from memory.inference import llm, registry
from runtime.heap import heap_stats
from runtime.pool import pool_stats


def operator_stats(*, top_users: int = 10) -> dict:
    """Live figures of this process and of the shared database.

    ``{"generated_at" (ISO 8601), "process": {"host", "pid", "ram": runtime.heap.heap_stats()}, "pool": runtime.pool.pool_stats(),
    "models": memory.inference.registry.stats() with memory.embedding_model.embedding_models_overview()
    ("active": the stored vectors' model, "reembed": a run's progress), "user_cache": memory.retrieval.cache_stats(),
    "buffers": buffers.selectors.buffers_overview() plus "workers": {"workers", "busy",
    "jobs_done", "jobs_failed"} or None when this process runs no flush workers,
    "facts": memory.facts.selectors.facts_stats() (the facts layer per tenant: LLM calls,
    tokens, latency and failures over the last hour, the extraction backlog, dead jobs), or
    None while the layer is off}``.
    Pool, models, cache and workers are per process; the buffers and facts parts are read
    from the database and so cover every process.
    """
    buffers = buffers_overview(top_users=top_users)
    buffers["workers"] = workers.local_pool_status()
    return {
        "generated_at": timezone.now().isoformat(),
        "process": {"host": socket.gethostname(), "pid": os.getpid(), "ram": heap_stats()},
        "pool": pool_stats(),
        "models": {**registry.stats(), **embedding_models_overview()},
        "user_cache": retrieval.cache_stats(),
        "buffers": buffers,
        "facts": facts_stats() if llm.enabled() else None,
    }
