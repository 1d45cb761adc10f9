"""The Prometheus text exposition of ``GET /metrics``: the events and the operator's snapshot.

Two kinds of figures:

- Events counted where they happen (``memory.metrics``).
- Snapshots read at scrape time by ``OperatorCollector``, the dashboard's figures
  (``memory.operator.stats``): the database pool, the model registry's counters, the per-user
  cache, the pending messages and the flush jobs.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) a scrape of any process sums the
events of every process. The snapshot figures of the pool, the models and the cache are
those of the process that answers the scrape (labelled with its ``pid``); pending messages
and flush jobs are read from the database and so cover every process.
https://prometheus.github.io/client_python/multiprocess/
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memory.facts.metrics import FactsCollector
from memory.metrics import EVENTS, multiprocess
from memory.operator.stats import operator_stats


class OperatorCollector(Collector):
    """The dashboard's figures (``memory.operator.stats``) as Prometheus metrics, read at each scrape.

    Runs the dashboard's database reads (two aggregate statements on the pending rows, two
    on the flush jobs): a scrape costs what a dashboard refresh costs.
    """

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration: the figures are read at scrape time only

    def collect(self) -> Iterator[Metric]:
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
        prometheus_multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Events())
    registry.register(OperatorCollector())
    registry.register(FactsCollector())  # the facts layer's, per tenant (nothing while it is off)
    return generate_latest(registry)


class _Events(Collector):
    """This process's events registry, as one collector of the scrape's registry."""

    def collect(self) -> Iterator[Metric]:
        return EVENTS.collect()
