"""Costs of the operator's tools, printed as JSON: ``python -m benchmarks.portability <what>``.

- ``export-import``: a user of ``--messages`` flushed messages (bulk-loaded, 500 a session),
  exported with embeddings to a file, deleted, imported back (``memory.portability``):
  messages/s of each, and the peak of Python allocations (``tracemalloc``) of each in a second,
  traced run. The user is deleted afterwards.
- ``metrics``: the cost of one ``GET /metrics`` (view, collection of every figure, text
  exposition) through Django's test client in this process, against the database of
  ``DATABASE_URL``: median and p95 over ``--scrapes`` scrapes, and the response's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")
    import django

    django.setup()


def bench_metrics(scrapes: int) -> dict:
    from django.test import Client

    from memory import services
    from memory.models import ApiKey, KeyScope

    api_key, key = services.api_key_create(scope=KeyScope.OPERATOR, name="benchmarks.portability")
    try:
        client = Client(headers={"Authorization": f"Bearer {key}"})
        client.get("/metrics")  # warm: imports, the first connection
        seconds, size = [], 0
        for _ in range(scrapes):
            start = time.perf_counter()
            response = client.get("/metrics")
            seconds.append(time.perf_counter() - start)
            size = len(response.content)
            assert response.status_code == 200, response.content[:200]
    finally:
        ApiKey.objects.filter(pk=api_key.pk).delete()
    seconds.sort()
    return {
        "benchmark": "metrics",
        "scrapes": scrapes,
        "ms_median": round(statistics.median(seconds) * 1000, 2),
        "ms_p95": round(seconds[int(0.95 * (len(seconds) - 1))] * 1000, 2),
        "bytes": size,
    }


def bench_export_import(messages: int, profile: bool = False) -> dict:
    import tempfile
    import tracemalloc
    from pathlib import Path

    from django.conf import settings

    from memory import services
    from memory.management.bench_dataset import Turn, bulk_load
    from memory.models import User
    from memory.portability import export, importer

    texts = [f"note {i}: the weather in city {i % 37} was {['sunny', 'rainy', 'windy'][i % 3]}" for i in range(200)]
    turns = [
        Turn(
            session=i // 500,
            date=None,
            dia_id=f"D{i}",
            role="user",
            content=texts[i % 200],
            metadata={},
            index_text=texts[i % 200],
        )
        for i in range(messages)
    ]
    loaded = bulk_load(
        tenant_name="bench-portability",
        agent_name=f"bench-portability-{os.getpid()}",
        agent_metadata={},
        users=[(f"bench-portability-{os.getpid()}", {}, turns)],
    )
    user = User.objects.get(pk=loaded["user_ids"][0])
    tenant_id = user.tenant_id
    report: dict = {
        "benchmark": "export-import",
        "messages": messages,
        "ann_min_messages": settings.MEMFUSE["ANN_MIN_MESSAGES"],
    }
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "user.jsonl"

        def run_export() -> float:
            started = time.perf_counter()
            with path.open("wb") as handle:
                for chunk in export.user_export(user=user, embeddings=True):
                    handle.write(chunk)
            return time.perf_counter() - started

        def run_import() -> float:
            started = time.perf_counter()
            importer.memory_import(tenant_id=tenant_id, source=importer.jsonl_source(path))
            return time.perf_counter() - started

        seconds = run_export()
        report["export"] = {
            "seconds": round(seconds, 2),
            "messages_per_s": round(messages / seconds),
            "bytes": path.stat().st_size,
        }
        tracemalloc.start()
        run_export()
        report["export"]["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
        tracemalloc.stop()
        for traced in (False, True):
            user_id = user.pk
            services.user_delete(user=user)
            if traced:
                tracemalloc.start()
            if profile and not traced:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                profiler.enable()
            seconds = run_import()
            if profile and not traced:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            if traced:
                report["import"]["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
                tracemalloc.stop()
            else:
                report["import"] = {"seconds": round(seconds, 2), "messages_per_s": round(messages / seconds)}
            user = User.objects.get(pk=user_id)
    services.user_delete(user=user)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    metrics = sub.add_parser("metrics", help="cost of one GET /metrics")
    metrics.add_argument("--scrapes", type=int, default=200)
    both = sub.add_parser("export-import", help="export and import throughput and memory of one user")
    both.add_argument("--messages", type=int, default=10_000)
    both.add_argument("--profile", action="store_true", help="print a cProfile of the (untraced) import")
    options = parser.parse_args()
    _setup()
    if options.what == "metrics":
        report = bench_metrics(options.scrapes)
    else:
        report = bench_export_import(options.messages, options.profile)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
