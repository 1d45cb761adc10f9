"""Pure helpers of the benchmarks (``benchmarks/``): the open-loop schedule, latency percentiles, chat rounds,
recall against an exact scan, the query dataset's slices of LoCoMo conversations.

No timing here: the benchmark itself is run by hand (``manage.py memfuse_bench ingest``).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from benchmarks.chat import ChatBench
from benchmarks.dataset import SLICE_STRIDE, answerable_questions, load_conversations, user_slice
from benchmarks.server import BENCH_RATE_LIMIT, bench_rate_limit
from benchmarks.stats import cosine_similarities, latency_summary, recall_at_k, scheduled_offsets
from benchmarks.texts import chat_rounds, generated_turn_texts


def test_bench_server_rate_limit_is_raised_unless_the_environment_sets_one(monkeypatch):
    """One tenant key sends every bench query: the default 100/s would throttle a faster server."""
    monkeypatch.delenv("API_RATE_LIMIT", raising=False)
    assert bench_rate_limit() == BENCH_RATE_LIMIT == "1000000/minute"
    monkeypatch.setenv("API_RATE_LIMIT", "50/second")
    assert bench_rate_limit() == "50/second"


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


def test_recall_counts_the_exact_top_k_and_forgives_ties():
    """Recall@k is the share of the exact top k returned; an equal-scored stand-in counts."""
    similarities = {"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.1}
    assert recall_at_k(["a", "b"], similarities, k=2) == 1.0
    assert recall_at_k(["a", "c"], similarities, k=2) == 1.0  # c ties with b
    assert recall_at_k(["a", "d"], similarities, k=2) == 0.5
    assert recall_at_k(["d", "d"], similarities, k=2) == 0.0  # a repeated id counts once
    assert recall_at_k(["a"], {"a": 0.5}, k=10) == 1.0  # fewer candidates than k
    assert recall_at_k([], {}, k=10) == 1.0


def test_cosine_similarities_ignore_length_and_survive_zero_rows():
    """Cosine of rows to the query, scale-free; an all-zero row scores 0, not NaN."""
    matrix = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    similarities = cosine_similarities(matrix, np.array([5.0, 0.0], dtype=np.float32))
    assert similarities == pytest.approx([1.0, 0.0, np.sqrt(0.5), 0.0])


def test_user_slices_are_contiguous_and_spread_over_conversations():
    """User i holds conversation i % C from a start that moves by the stride and leaves room for a whole slice."""
    counts = [10, 30]
    assert user_slice(0, turn_counts=counts, per_user=5) == (0, 0)
    assert user_slice(1, turn_counts=counts, per_user=5) == (1, 0)
    assert user_slice(2, turn_counts=counts, per_user=5) == (0, SLICE_STRIDE % 6)
    assert all(
        start + 5 <= counts[c] for c, start in (user_slice(i, turn_counts=counts, per_user=5) for i in range(50))
    )
    with pytest.raises(ValueError):
        user_slice(0, turn_counts=counts, per_user=11)


def test_locomo_conversations_keep_turns_and_answerable_questions(tmp_path):
    """Turns become messages as locomo_eval stores them; a question is asked only of users holding its evidence."""
    path = tmp_path / "locomo.json"
    path.write_text(
        json.dumps(
            [
                {
                    "sample_id": "c1",
                    "conversation": {
                        "speaker_a": "Ann",
                        "speaker_b": "Ben",
                        "session_1_date_time": "1:56 pm on 8 May, 2023",
                        "session_1": [
                            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Miso."},
                            {"speaker": "Ben", "dia_id": "D1:2", "text": "Cute!", "blip_caption": "a kitten"},
                            {"speaker": "Ann", "dia_id": "D1:3", "text": "She is orange."},
                        ],
                    },
                    "qa": [
                        {"question": "Cat's name?", "evidence": ["D1:1"], "category": 4},
                        {"question": "Colour?", "evidence": ["D1:3"], "category": 1},
                        {"question": "Dog's name?", "evidence": ["D1:1"], "category": 5},
                    ],
                }
            ]
        )
    )

    (conversation,) = load_conversations(path)

    assert [t.role for t in conversation.turns] == ["user", "assistant", "user"]
    assert conversation.turns[1].index_text == "Ben: Cute! [image: a kitten]"
    assert answerable_questions(conversation, conversation.turns[:2]) == ["Cat's name?"]
    assert answerable_questions(conversation, conversation.turns) == ["Cat's name?", "Colour?"]


@pytest.mark.parametrize(
    ("skip", "built"),
    [
        (set(), (100, 4)),
        ({"many"}, (100, 4)),  # the cold phase queries the many users too
        ({"many", "cold"}, (7, 0)),  # the backlog phase takes only its users
        ({"many", "cold", "backlog"}, (0, 0)),
        ({"history", "backlog", "many", "cold", "fresh"}, (0, 0)),
    ],
)
def test_chat_dataset_builds_only_the_users_the_phases_run(skip, built):
    """The chat benchmark's dataset holds the many users only for the phases that run: all of
    them for the many-users and cold phases, the backlog's users for the backlog phase alone,
    none otherwise; the long histories only for the cold phase."""
    options = {"skip_set": skip, "many_users": 100, "backlog_users": 7, "cold_users": 4}
    assert ChatBench.dataset_users(options) == built
