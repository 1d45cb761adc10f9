"""Prometheus metrics of events (``prometheus-client``), recorded where they happen.

Requests by route (latency histogram), queries by stage (latency histogram), messages added,
flushes and their duration: module-level ``Counter``/``Histogram`` objects; recording one costs
a few microseconds. ``memory.operator.exposition`` exports them at ``GET /metrics`` with the
snapshot figures read at scrape time. It imports nothing of ``memory``: the rooms that record
(the API, the services, the flush, the query) and ``memory.operator``, which reads them back,
all sit above it.

Several processes (``uvicorn --workers``, ``runworker``): with ``PROMETHEUS_MULTIPROC_DIR``
set (an empty directory, shared by the processes, emptied before they start), the client
library's multiprocess mode writes the events of every process to files there, and a scrape
of any process sums them. Without the variable, they are this process's.
https://prometheus.github.io/client_python/multiprocess/
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

# The events' registry. In multiprocess mode the values live in PROMETHEUS_MULTIPROC_DIR and a
# scrape reads them from there (``scrape``); this registry is then only where they are declared.
EVENTS = CollectorRegistry(auto_describe=True)

# Request latency: the API answers in ~1-50 ms, a query with a reranker or a cold user in
# ~0.1-1 s; the buckets cover 1 ms to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_SECONDS = Histogram(
    "memfuse_http_request_duration_seconds",
    "Latency of REST API requests (s), by route name (memory.api.urls), method and status class.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
    registry=EVENTS,
)
QUERY_STAGE_SECONDS = Histogram(
    "memfuse_query_stage_duration_seconds",
    "Time of each stage of a memory query (s): bm25, embed (waiting for the query embedding), vector, fusion, rerank.",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS),
    registry=EVENTS,
)
QUERY_SECONDS = Histogram(
    "memfuse_query_duration_seconds",
    "Time of a whole memory query (s), REST or WebSocket, from its start to its final results.",
    buckets=LATENCY_BUCKETS,
    registry=EVENTS,
)
QUERIES = Counter("memfuse_queries", "Memory queries answered (REST and WebSocket).", registry=EVENTS)
MESSAGES_ADDED = Counter("memfuse_messages_added", "Messages stored by adds (committed).", registry=EVENTS)
FLUSHES = Counter(
    "memfuse_flushes",
    "Flushes run (memory.indexing.flush.flush_pending), by outcome: ok or error.",
    ["outcome"],
    registry=EVENTS,
)
MESSAGES_FLUSHED = Counter("memfuse_messages_flushed", "Messages embedded and indexed by flushes.", registry=EVENTS)
FLUSH_SECONDS = Histogram(
    "memfuse_flush_duration_seconds",
    "Duration of a flush (s): claim, embed and write of every batch.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=EVENTS,
)


def multiprocess() -> bool:
    """Whether the client library's multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def status_class(status: int) -> str:
    """``"2xx"``, ``"4xx"``, ...: the label of a response status (few values, so few series)."""
    return f"{status // 100}xx"


@contextmanager
def query_stage(stage: str) -> Iterator[None]:
    """Time the block as ``stage`` of a query (``QUERY_STAGE_SECONDS``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        QUERY_STAGE_SECONDS.labels(stage).observe(time.perf_counter() - start)
