"""Costs of the operator's tools, printed as JSON: ``python -m benchmarks.portability <what>``.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    metrics = sub.add_parser("metrics", help="cost of one GET /metrics")
    metrics.add_argument("--scrapes", type=int, default=200)
    options = parser.parse_args()
    _setup()
    if options.what == "metrics":
        report = bench_metrics(options.scrapes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
