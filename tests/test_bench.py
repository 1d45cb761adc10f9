"""Pure helpers of ``memfuse_bench``: the open-loop schedule, latency percentiles, chat rounds.

No timing here: the benchmark itself is run by hand (``manage.py memfuse_bench ingest``).
"""

from __future__ import annotations

import random

import pytest

from memory.management.commands.memfuse_bench import (
    chat_rounds,
    generated_turn_texts,
    latency_summary,
    scheduled_offsets,
)


def test_schedule_is_evenly_spaced_at_the_offered_rate():
    """Add i is scheduled at i / rate, for rate × duration adds."""
    offsets = scheduled_offsets(rate=100, duration=30)
    assert len(offsets) == 3000
    assert offsets[:3] == [0.0, 0.01, 0.02]
    assert offsets[-1] == pytest.approx(29.99)


def test_schedule_has_at_least_one_add():
    """A rate too low for the duration still sends one add."""
    assert scheduled_offsets(rate=0.1, duration=1) == [0.0]


def test_latency_summary_percentiles_and_max():
    """p50/p95/p99 interpolate linearly between samples; max is the largest sample."""
    summary = latency_summary([float(ms) for ms in range(1, 101)])
    assert summary == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0}


def test_latency_summary_without_samples_is_null():
    """No successful add: every figure is None, not a misleading 0."""
    assert latency_summary([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_chat_rounds_pair_consecutive_turns_and_cycle():
    """A round is two consecutive turns; the text list wraps around."""
    assert chat_rounds(["a", "b", "c"], count=3, start=1) == [("b", "c"), ("a", "b"), ("c", "a")]


def test_chat_rounds_need_two_texts():
    """One text cannot make a round."""
    with pytest.raises(ValueError):
        chat_rounds(["only"], count=1, start=0)


def test_generated_texts_are_reproducible_from_the_seed():
    """The fallback generator gives the same turns for the same seed."""
    assert generated_turn_texts(random.Random(7), count=10) == generated_turn_texts(random.Random(7), count=10)
    assert len(generated_turn_texts(random.Random(7), count=10)) == 10

