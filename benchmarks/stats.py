"""Statistics of the benchmarks: open-loop schedules, latency percentiles, recall against an exact scan, slopes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def scheduled_offsets(*, rate: float, duration: float) -> list[float]:
    """Send times of an open-loop run, in seconds after its start: request i at ``i / rate``.

    ``round(rate * duration)`` requests (at least one), so 100/s for 30 s is exactly 3000.
    """
    count = max(1, round(rate * duration))
    return [index / rate for index in range(count)]


def latency_summary(latencies_ms: Sequence[float]) -> dict:
    """``{"p50", "p95", "p99", "max"}`` of latencies in ms, rounded to 0.01 ms.

    Percentiles interpolate linearly between samples (numpy's default); all ``None`` when
    there is no sample.
    """
    if len(latencies_ms) == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    values = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": round(float(values.max()), 2),
    }


def latency_windows(outcomes: list, *, t0: float, seconds: float) -> list[list[float]]:
    """``[[window start s, p50, p99, max], ...]`` of latency (ms) by when each request was
    scheduled (its ``answered_at`` minus its ``latency_ms``), in windows of ``seconds`` from ``t0``."""
    windows: dict[int, list[float]] = {}
    for outcome in outcomes:
        scheduled = outcome.answered_at - outcome.latency_ms / 1000
        windows.setdefault(int((scheduled - t0) // seconds), []).append(outcome.latency_ms)
    rows = []
    for index in sorted(windows):
        summary = latency_summary(windows[index])
        rows.append([index * seconds, summary["p50"], summary["p99"], summary["max"]])
    return rows


def cosine_similarities(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``matrix`` (n, dim) to ``query`` (dim,): shape (n,)."""
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
    return (matrix @ query) / np.where(norms == 0, 1.0, norms)


def recall_at_k(returned: Sequence, similarities: dict, *, k: int) -> float:
    """Share of the exact top ``k`` that ``returned`` holds, counting ties as hits.

    ``similarities`` maps every candidate id to its exact similarity. A returned id counts
    when its similarity is at least the exact k-th best (less 1e-5: float32 rounding), so a
    search that returns one of two identical texts is not penalised for picking the other.
    Denominator ``min(k, number of candidates)``; 1.0 when there is no candidate.
    """
    ranked = sorted(similarities.values(), reverse=True)
    want = min(k, len(ranked))
    if want == 0:
        return 1.0
    threshold = ranked[want - 1] - 1e-5
    hits = sum(1 for doc_id in list(dict.fromkeys(returned))[:want] if similarities.get(doc_id, -np.inf) >= threshold)
    return hits / want


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, MB)`` samples, in MB per hour (``None`` under 3 samples)."""
    if len(samples) < 3:
        return None
    t, mb = np.asarray(samples, dtype=float).T
    return round(float(np.polyfit(t, mb, 1)[0]) * 3600, 1)
