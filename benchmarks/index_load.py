"""``manage.py soak_bench index-load``: what loading one user's lexical index costs a process.

A process that has not cached a user loads their index from its snapshot
(``memory.retrieval.store.load``): on a cold start, after an eviction, and for each query when
the cache is smaller than the active users. The load's peak is what it adds to the process's
resident memory, for the allocator keeps what it once held.

For each size in ``--sizes`` (default 10,000, 30,000 and 100,000 messages), one user of that
many cycled LoCoMo turns (``benchmarks.chat_dataset.cycled_turns``), written as flushed
messages with their snapshot (``benchmarks.dataset.bulk_load``) in tenant
``bench-index-load``, built once and reused while the sizes match. Each load runs
``--repeats`` times, each time in a fresh Python process that has connected to the database
first; it reports the rise of the process's peak resident memory (``VmHWM``: not
``ru_maxrss``, which a process started by another inherits from it), the time of the load,
the snapshot's bytes and the index's own (``BM25Index.nbytes``), with the medians.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError

TENANT = "bench-index-load"

# Run in a fresh process: django.setup(), a first query (the connection and its buffers), then
# one load. Prints one JSON line.
_CHILD = """
import json, sys, time, uuid
import django
django.setup()
from django.db import connection
from memory.retrieval import store

def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
before = status_kb("VmHWM")
started = time.perf_counter()
index = store.load(uuid.UUID(sys.argv[1]))
seconds = time.perf_counter() - started
rise_kb = status_kb("VmHWM") - before  # before to_bytes below, which holds the snapshot whole
print(json.dumps({"documents": len(index), "index_bytes": index.nbytes, "snapshot_bytes": len(index.to_bytes()),
                  "peak_rise_mb": round(rise_kb / 1024, 1), "load_ms": round(seconds * 1000, 1)}))
"""


def index_load(sizes: list[int], repeats: int, *, log) -> dict:
    """The loads of users of ``sizes`` messages, ``repeats`` fresh processes each; the report.

    Raises ``CommandError`` when a size or the repeats are not positive, or a load fails.
    """
    if not sizes or min(sizes) <= 0 or repeats <= 0:
        raise CommandError("--sizes must be positive message counts and --repeats positive")
    users = _ensure_users(sizes, log=log)
    report = {"sizes": sizes, "repeats": repeats, "users": []}
    for size, user_id in zip(sizes, users):
        runs = []
        for _ in range(repeats):
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, str(user_id)],
                cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if child.returncode:
                raise CommandError(f"the load of the {size}-message user failed: {child.stderr.strip()[-2000:]}")
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        log(f"{size} messages: {runs}")
        rises, times = [run["peak_rise_mb"] for run in runs], [run["load_ms"] for run in runs]
        report["users"].append({
            "messages": size,
            "documents": runs[0]["documents"],
            "snapshot_bytes": runs[0]["snapshot_bytes"],
            "index_bytes": runs[0]["index_bytes"],
            "peak_rise_mb": rises,
            "peak_rise_mb_median": float(np.median(rises)),
            "load_ms": times,
            "load_ms_median": round(float(np.median(times)), 1),
        })  # fmt: skip
    return report


def _ensure_users(sizes: list[int], *, log) -> list:
    """The ids of the users of ``sizes`` messages, built unless the tenant holds exactly them."""
    from benchmarks.chat_dataset import cycled_turns
    from benchmarks.dataset import bulk_load, load_conversations, tenant_drop
    from benchmarks.texts import LOCOMO_DEV
    from memory.models import Agent, IndexSnapshot, User

    agent = Agent.objects.filter(tenant__name=TENANT, name=TENANT).first()
    if agent is not None and agent.metadata.get("sizes") == sizes:
        by_name = dict(User.objects.filter(tenant__name=TENANT).values_list("name", "id"))
        ids = [by_name.get(f"{TENANT}-{size}") for size in sizes]
        if None not in ids and IndexSnapshot.objects.filter(user_id__in=ids).count() == len(ids):
            return ids
    tenant_drop(TENANT)
    conversations = load_conversations(Path(LOCOMO_DEV))
    log(f"building users of {sizes} messages ...")
    result = bulk_load(
        tenant_name=TENANT, agent_name=TENANT, agent_metadata={"sizes": sizes},
        users=[(f"{TENANT}-{size}", {}, cycled_turns(conversations, size)) for size in sizes], log=log,
    )  # fmt: skip
    return result["user_ids"]
