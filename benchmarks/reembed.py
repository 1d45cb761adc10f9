"""Throughput of ``reembed`` against its model's, printed as JSON:
``python -m benchmarks.reembed [--messages 2000] [--model PATH]``.

Bulk-loads a user of ``--messages`` flushed messages (200 a session) into the database of
``DATABASE_URL``, then re-embeds everything there with ``--model`` (default: the configured
model again, so the dimension stays) and switches to it (``memory.indexing.reembed``). Reports the
fill's texts/s of wall time, the model's texts/s in the same run's embedding calls (the
document model as flushes use it), and ``SentenceTransformer.encode`` of the full model
over the same texts in batches of ``EMBEDDING_BATCH_SIZE``. The run changes the schema (a
switch): use a database of its own. The user is deleted afterwards and the old columns
dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")
    import django

    django.setup()


def bench_reembed(messages: int, model: Path | None, batch_size: int) -> dict:
    from django.conf import settings
    from sentence_transformers import SentenceTransformer

    from benchmarks.dataset import Turn, bulk_load
    from memory.indexing.reembed import reembed_run
    from memory.inference import default_model_path, registry
    from memory.models import Message, User
    from memory.services.users import user_delete

    model = model or default_model_path()
    topics = ["the weather", "a trip", "dinner plans", "a book", "the garden", "work", "a concert"]
    texts = [f"note {i}: talking about {topics[i % 7]} with friend {i % 53} on day {i % 365}" for i in range(messages)]
    turns = [
        Turn(session=i // 200, date=None, dia_id=f"D{i}", role="user", content=text, metadata={}, index_text=text)
        for i, text in enumerate(texts)
    ]
    loaded = bulk_load(
        tenant_name="bench-reembed",
        agent_name=f"bench-reembed-{os.getpid()}",
        agent_metadata={},
        users=[(f"bench-reembed-{os.getpid()}", {}, turns)],
    )
    user = User.objects.get(pk=loaded["user_ids"][0])
    stored = Message.objects.filter(flushed_at__isnull=False).count()
    try:
        stats = reembed_run(model_path=model, batch_size=batch_size, drop_old=True)
    finally:
        user_delete(user=user)
    encoder = SentenceTransformer(str(model), device="cpu", local_files_only=True)
    encoder.encode(texts[:64], batch_size=settings.MEMFUSE["EMBEDDING_BATCH_SIZE"])  # warm
    started = time.perf_counter()
    encoder.encode(texts, batch_size=settings.MEMFUSE["EMBEDDING_BATCH_SIZE"], normalize_embeddings=True)
    encode_seconds = time.perf_counter() - started
    return {
        "benchmark": "reembed",
        "model": str(model),
        "messages": stored,
        "batch_size": batch_size,
        "document_embedding_int8": registry.documents_int8(),
        "torch_threads": settings.MEMFUSE["TORCH_THREADS"],
        "embedded": stats.embedded,
        "fill_seconds": round(stats.fill_seconds, 2),
        "reembed_texts_per_s": round(stats.texts_per_second, 1),
        "model_in_run_texts_per_s": round(stats.raw_texts_per_second, 1),
        "encode_full_model_texts_per_s": round(len(texts) / encode_seconds, 1),
        "switched": stats.switched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--model", type=Path, help="the new model (default: the configured one)")
    parser.add_argument("--batch-size", type=int, default=256)
    options = parser.parse_args()
    _setup()
    print(json.dumps(bench_reembed(options.messages, options.model, options.batch_size), indent=2))


if __name__ == "__main__":
    main()
