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

    from memory.models import ApiKey, KeyScope
    from memory.services.api_keys import api_key_create

    api_key, key = api_key_create(scope=KeyScope.OPERATOR, name="benchmarks.portability")
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
    """Export then import a bulk-loaded user of ``messages`` notes: messages/s and, in a second
    traced run, the peak of Python allocations (MB) of each; ``profile`` prints a cProfile of
    the untraced import. The user is deleted afterwards."""
    import tempfile
    from pathlib import Path

    from django.conf import settings

    from benchmarks.dataset import notes_user
    from memory.services.users import user_delete

    user = notes_user(
        tenant_name="bench-portability",
        agent_name=f"bench-portability-{os.getpid()}",
        user_name=f"bench-portability-{os.getpid()}",
        messages=messages,
        distinct=200,
    )
    report: dict = {
        "benchmark": "export-import",
        "messages": messages,
        "ann_min_messages": settings.MEMFUSE["ANN_MIN_MESSAGES"],
    }
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "user.jsonl"
        report["export"] = _measure_export(user, path, messages)
        user, report["import"] = _measure_import(user, path, messages, profile)
    user_delete(user=user)
    return report


def _export(user, path) -> float:
    from memory.portability import export

    started = time.perf_counter()
    with path.open("wb") as handle:
        for chunk in export.user_export(user=user, embeddings=True):
            handle.write(chunk)
    return time.perf_counter() - started


def _measure_export(user, path, messages: int) -> dict:
    import tracemalloc

    seconds = _export(user, path)
    report = {"seconds": round(seconds, 2), "messages_per_s": round(messages / seconds), "bytes": path.stat().st_size}
    tracemalloc.start()
    _export(user, path)
    report["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
    tracemalloc.stop()
    return report


def _measure_import(user, path, messages: int, profile: bool) -> tuple:
    """Delete the user and import it back, twice (untraced, then traced): ``(user, report)``."""
    import tracemalloc

    from memory.models import User
    from memory.portability import importer
    from memory.services.users import user_delete

    tenant_id = user.tenant_id
    report: dict = {}
    for traced in (False, True):
        user_id = user.pk
        user_delete(user=user)
        if traced:
            tracemalloc.start()
        if profile and not traced:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
        started = time.perf_counter()
        importer.memory_import(tenant_id=tenant_id, source=importer.jsonl_source(path))
        seconds = time.perf_counter() - started
        if profile and not traced:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        if traced:
            report["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
            tracemalloc.stop()
        else:
            report = {"seconds": round(seconds, 2), "messages_per_s": round(messages / seconds)}
        user = User.objects.get(pk=user_id)
    return user, report


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
