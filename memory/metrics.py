"""Prometheus metrics (``prometheus-client``): what ``GET /metrics`` exports.

Two kinds of figures:

- Events counted where they happen: requests by route (latency histogram), queries by stage
  (latency histogram), messages added, flushes and their duration. Module-level
  ``Counter``/``Histogram`` objects; recording one costs a few microseconds.
- Snapshots read at scrape time by ``OperatorCollector``, the dashboard's figures
  (``memory.operator_stats``): the database pool, the model registry's counters, the per-user
  cache, the pending messages and the flush jobs.

Several processes (``uvicorn --workers``, ``runworker``): with ``PROMETHEUS_MULTIPROC_DIR``
set (an empty directory, shared by the processes, emptied before they start), the client
library's multiprocess mode writes the events of every process to files there, and a scrape
of any process sums them. The snapshot figures of the pool, the models and the cache are
those of the process that answers the scrape (labelled with its ``pid``); pending messages
and flush jobs are read from the database and so cover every process. Without the variable,
everything is this process's. https://prometheus.github.io/client_python/multiprocess/
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memory.facts.metrics import FactsCollector

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
    "Flushes run (memory.flush.flush_pending), by outcome: ok or error.",
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


class OperatorCollector(Collector):
    """The dashboard's figures (``memory.operator_stats``) as Prometheus metrics, read at each scrape.

    Runs the dashboard's database reads (two aggregate statements on the pending rows, two
    on the flush jobs): a scrape costs what a dashboard refresh costs.
    """

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration: the figures are read at scrape time only

    def collect(self) -> Iterator[Metric]:
        from memory.operator_stats import operator_stats

        stats = operator_stats(top_users=0)
        pid = str(stats["process"]["pid"])
        yield from _pool_metrics(stats["pool"], pid)
        yield from _model_metrics(stats["models"], pid)
        yield from _cache_metrics(stats["user_cache"], pid)
        yield from _buffer_metrics(stats["buffers"], pid)


def _gauge(name: str, doc: str, value: float, pid: str, **labels: str) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(name, doc, labels=["pid", *labels])
    metric.add_metric([pid, *labels.values()], value)
    return metric


def _counter(name: str, doc: str, value: float, pid: str) -> CounterMetricFamily:
    metric = CounterMetricFamily(name, doc, labels=["pid"])
    metric.add_metric([pid], value)
    return metric


def _pool_metrics(pool: dict, pid: str) -> Iterator[Metric]:
    yield _gauge(
        "memfuse_pool_enabled", "1 when this process has a database connection pool.", int(pool["enabled"]), pid
    )
    if pool["enabled"]:
        yield _gauge("memfuse_pool_max_size", "Most connections of the pool.", pool["max_size"], pid)
        yield _gauge("memfuse_pool_size", "Connections open.", pool["size"], pid)
        yield _gauge("memfuse_pool_in_use", "Connections lent out.", pool["in_use"], pid)
        yield _gauge(
            "memfuse_pool_requests_waiting", "Requests waiting for a connection.", pool["requests_waiting"], pid
        )
        yield _counter(
            "memfuse_pool_requests", "Connection requests since the pool opened.", pool["requests_total"], pid
        )
        yield _counter(
            "memfuse_pool_requests_wait_seconds",
            "Time requests waited for a connection (s).",
            pool["requests_wait_ms"] / 1000,
            pid,
        )
        yield _counter(
            "memfuse_pool_requests_errors", "Pool timeouts and queue-full refusals.", pool["requests_errors"], pid
        )
        yield _counter("memfuse_pool_connections_lost", "Connections found broken.", pool["connections_lost"], pid)
    yield _counter("memfuse_pool_refused_503", "Requests answered 503: no pool connection.", pool["refused_503"], pid)
    yield _counter(
        "memfuse_database_unavailable_503", "Requests answered 503: database unreachable.", pool["unavailable_503"], pid
    )


def _model_metrics(models: dict, pid: str) -> Iterator[Metric]:
    calls = CounterMetricFamily("memfuse_model_calls", "Model calls of this process, by role.", labels=["pid", "model"])
    texts = CounterMetricFamily(
        "memfuse_model_texts", "Texts (or pairs) given to the model, by role.", labels=["pid", "model"]
    )
    seconds = CounterMetricFamily(
        "memfuse_model_inference_seconds", "Time in model inference (s), by role.", labels=["pid", "model"]
    )
    for role, model in models.items():
        if model and "calls" in model:
            calls.add_metric([pid, role], model["calls"])
            texts.add_metric([pid, role], model["texts"])
            seconds.add_metric([pid, role], model["inference_seconds"])
    yield from (calls, texts, seconds)


def _cache_metrics(cache: dict, pid: str) -> Iterator[Metric]:
    yield _gauge("memfuse_user_cache_bytes", "Bytes held by the per-user cache.", cache["bytes"], pid)
    yield _gauge(
        "memfuse_user_cache_max_bytes", "Bound of the per-user cache (USER_CACHE_MB).", cache["max_bytes"], pid
    )
    yield _gauge("memfuse_user_cache_users", "Users held by the per-user cache.", cache["size"], pid)
    yield _counter("memfuse_user_cache_hits", "Per-user cache hits.", cache["hits"], pid)
    yield _counter("memfuse_user_cache_misses", "Per-user cache misses.", cache["misses"], pid)
    yield _counter("memfuse_user_cache_evictions", "Users evicted from the per-user cache.", cache["evictions"], pid)


def _buffer_metrics(buffers: dict, pid: str) -> Iterator[Metric]:
    # From the database: every process's, so no pid label.
    yield GaugeMetricFamily(
        "memfuse_pending_messages", "Messages not flushed yet (all users).", value=buffers["pending_messages"]
    )
    yield GaugeMetricFamily("memfuse_pending_users", "Users with pending messages.", value=buffers["pending_users"])
    yield GaugeMetricFamily(
        "memfuse_oldest_pending_age_seconds",
        "Age of the oldest pending message (s).",
        value=buffers["oldest_pending_age_s"],
    )
    jobs = GaugeMetricFamily("memfuse_flush_jobs", "Flush jobs by state.", labels=["state"])
    for state, count in buffers["jobs"].items():
        jobs.add_metric([state], count)
    yield jobs
    waiting = GaugeMetricFamily(
        "memfuse_flush_jobs_waiting", "Queued or retrying flush jobs by priority.", labels=["priority"]
    )
    for priority, count in buffers["queue_depth"].items():
        waiting.add_metric([priority], count)
    yield waiting
    workers = buffers.get("workers")
    if workers:
        yield _gauge("memfuse_flush_workers", "Flush workers of this process.", workers["workers"], pid)
        yield _gauge("memfuse_flush_workers_busy", "Flush workers of this process running a job.", workers["busy"], pid)


def scrape() -> bytes:
    """The text exposition of every metric (Prometheus text format), read now.

    In multiprocess mode the events are summed over the files of every process; otherwise
    they are this process's. Raises what the database raises (the buffers' figures).
    """
    registry = CollectorRegistry()
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.MultiProcessCollector(registry)
    else:
        registry.register(_Events())
    registry.register(OperatorCollector())
    registry.register(FactsCollector())  # the facts layer's, per tenant (nothing while it is off)
    return generate_latest(registry)


class _Events(Collector):
    """This process's events registry, as one collector of the scrape's registry."""

    def collect(self) -> Iterator[Metric]:
        return EVENTS.collect()
