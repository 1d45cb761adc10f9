"""The last hour of this process's figures, for the dashboard's charts.

A daemon thread (``start``, in web processes: ``memfuse_project.serving``) samples every ``DASHBOARD_SAMPLE_SECONDS``
the counters of ``memory.metrics`` (adds, queries and their latency histogram, flushes,
errors) and the pending backlog (one count on the partial index of pending rows); ``charts``
turns consecutive samples into rates per second, the query p95 of each interval (from the
histogram's buckets: the upper bound of the bucket holding the 95th percentile) and the
backlog, drawn as inline SVG (no script, no CDN). The counters are this process's (the
dashboard's process); the backlog covers every process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from django.conf import settings
from django.db import connection

from memory import metrics

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 3600
CHART_WIDTH, CHART_HEIGHT = 300, 60  # SVG user units


@dataclass(frozen=True)
class Sample:
    """Counter values at ``at`` (``time.time()``): totals since the process started."""

    at: float
    adds: float
    queries: float
    flushes: float
    errors: float
    query_buckets: tuple[tuple[float, float], ...]  # (upper bound s, cumulative count)
    pending: int


_samples: deque[Sample] = deque()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _counter_total(metric, **labels) -> float:
    """Sum of ``metric``'s ``_total`` (or ``_count``) samples whose labels include ``labels``."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count")) and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _buckets(metric) -> tuple[tuple[float, float], ...]:
    return tuple(
        (float(sample.labels["le"]), sample.value)
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket")
    )


def sample() -> Sample:
    """Read the figures now and keep them (the oldest beyond the hour are dropped)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_message WHERE flushed_at IS NULL")
        pending = cursor.fetchone()[0]
    now = time.time()
    taken = Sample(
        at=now,
        adds=_counter_total(metrics.MESSAGES_ADDED),
        queries=_counter_total(metrics.QUERIES),
        flushes=_counter_total(metrics.FLUSHES),
        errors=_counter_total(metrics.REQUEST_SECONDS, status="5xx") + _counter_total(metrics.FLUSHES, outcome="error"),
        query_buckets=_buckets(metrics.QUERY_SECONDS),
        pending=pending,
    )
    with _lock:
        _samples.append(taken)
        while _samples and _samples[0].at < now - WINDOW_SECONDS:
            _samples.popleft()
    return taken


def _p95_ms(before: tuple, after: tuple) -> float | None:
    """The 95th percentile (ms) of the queries between two bucket readings, or ``None`` without any."""
    deltas = [(bound, a - b) for (bound, a), (_, b) in zip(after, before)]
    total = deltas[-1][1] if deltas else 0
    if total <= 0:
        return None
    for bound, count in deltas:
        if count >= 0.95 * total:
            return bound * 1000 if bound != float("inf") else deltas[-2][0] * 1000
    return None


def series() -> dict[str, list[tuple[float, float | None]]]:
    """``{name: [(time, value)]}`` of the last hour, one point per interval between samples:
    ``adds_per_s``, ``queries_per_s``, ``query_p95_ms`` (``None`` without queries),
    ``pending``, ``flushes_per_s``, ``errors_per_s`` (HTTP 5xx answers and failed flushes)."""
    with _lock:
        samples = list(_samples)
    result: dict[str, list] = {
        name: [] for name in ("adds_per_s", "queries_per_s", "query_p95_ms", "pending", "flushes_per_s", "errors_per_s")
    }
    for before, after in zip(samples, samples[1:]):
        seconds = max(after.at - before.at, 1e-9)
        result["adds_per_s"].append((after.at, (after.adds - before.adds) / seconds))
        result["queries_per_s"].append((after.at, (after.queries - before.queries) / seconds))
        result["query_p95_ms"].append((after.at, _p95_ms(before.query_buckets, after.query_buckets)))
        result["pending"].append((after.at, float(after.pending)))
        result["flushes_per_s"].append((after.at, (after.flushes - before.flushes) / seconds))
        result["errors_per_s"].append((after.at, (after.errors - before.errors) / seconds))
    return result


TITLES = {
    "adds_per_s": ("Adds", "messages/s"),
    "queries_per_s": ("Queries", "/s"),
    "query_p95_ms": ("Query p95", "ms"),
    "pending": ("Pending backlog", "messages"),
    "flushes_per_s": ("Flushes", "/s"),
    "errors_per_s": ("Errors (5xx, failed flushes)", "/s"),
}


def span_seconds() -> float:
    """The time the charts cover: since the oldest sample, at least a minute, at most the hour
    (a process that just started fills the width instead of a sliver at its right edge)."""
    with _lock:
        oldest = _samples[0].at if _samples else time.time()
    return min(max(time.time() - oldest, 60.0), WINDOW_SECONDS)


def charts() -> list[dict]:
    """One chart a series: ``{"key", "title", "unit", "latest", "peak", "points"}``; ``points``
    is an SVG polyline (``"x,y x,y ..."``) over ``span_seconds()`` up to now, scaled to the
    series' peak."""
    now, span = time.time(), span_seconds()
    result = []
    for key, points in series().items():
        values = [value for _, value in points if value is not None]
        peak = max(values, default=0.0)
        scale = peak if peak > 0 else 1.0
        polyline = " ".join(
            f"{CHART_WIDTH * (1 - (now - at) / span):.1f},{CHART_HEIGHT * (1 - value / scale):.1f}"
            for at, value in points
            if value is not None
        )
        title, unit = TITLES[key]
        latest = next((value for _, value in reversed(points) if value is not None), None)
        result.append({"key": key, "title": title, "unit": unit, "latest": latest, "peak": peak, "points": polyline})
    return result


def _run(interval: float) -> None:
    while True:
        try:
            sample()
        except Exception:  # the database restarting: the chart has a gap, the thread goes on
            logger.debug("dashboard sample failed", exc_info=True)
        finally:
            connection.close()  # this thread's connection back to the pool between samples
        time.sleep(interval)


def start() -> None:
    """Start sampling in this process (once), every ``DASHBOARD_SAMPLE_SECONDS``."""
    global _thread
    with _lock:
        if _thread is None:
            interval = settings.MEMFUSE["DASHBOARD_SAMPLE_SECONDS"]
            _thread = threading.Thread(target=_run, args=(interval,), name="memfuse-dashboard-sampler", daemon=True)
            _thread.start()
