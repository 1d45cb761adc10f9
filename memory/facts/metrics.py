"""The facts layer's figures (``memory.facts.selectors.facts_stats``) as Prometheus metrics,
per tenant, read at each scrape; nothing while the layer is off."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memory.facts.selectors import facts_stats
from memory.inference import llm

_FIGURES = [
    ("calls", "memfuse_llm_calls_last_hour", "LLM calls of the facts layer in the last hour."),
    (
        "failures",
        "memfuse_llm_failures_last_hour",
        "Failed LLM calls (errors, timeouts, invalid answers) in the last hour.",
    ),
    (
        "prompt_tokens",
        "memfuse_llm_prompt_tokens_last_hour",
        "Prompt tokens in the last hour, as the endpoint counted them.",
    ),
    ("completion_tokens", "memfuse_llm_completion_tokens_last_hour", "Completion tokens in the last hour."),
    ("latency_ms_p50", "memfuse_llm_latency_ms_p50", "Median LLM call latency over the last hour (ms)."),
    ("latency_ms_p95", "memfuse_llm_latency_ms_p95", "95th percentile LLM call latency over the last hour (ms)."),
    ("backlog_jobs", "memfuse_facts_backlog_jobs", "Extraction jobs queued or running (the M1 backlog)."),
    ("backlog_messages", "memfuse_facts_backlog_messages", "Messages in queued or running extraction jobs."),
    ("dead_jobs", "memfuse_facts_dead_jobs", "Extraction jobs that failed every attempt (re-run them in the admin)."),
]


class FactsCollector(Collector):
    """``memfuse_llm_*`` and ``memfuse_facts_*`` gauges labelled by tenant name (one statement per scrape)."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if not llm.enabled():
            return
        stats = facts_stats()
        for key, name, doc in _FIGURES:
            metric = GaugeMetricFamily(name, doc, labels=["tenant"])
            for row in stats:
                metric.add_metric([row["tenant"]], float(row[key]))
            yield metric
