"""The tools' commands: bad input to memfuse_bench and admin_screenshot, and memfuse_bench's
query and chat benchmarks end to end on a small file."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from memory.models import Message, User
from tests.locomo_sample import locomo_file


@pytest.mark.parametrize(
    "args, option",
    [
        (["--rate", "0"], "--rate"),
        (["--duration", "-1"], "--duration"),
        (["--burst", "1"], "--burst"),
        (["--clients", "0"], "--clients"),
        (["--url", "http://127.0.0.1:9"], "--api-key"),
    ],
)
def test_memfuse_bench_rejects_bad_options(args, option):
    """Bad benchmark options are command errors naming the option, before any server starts."""
    with pytest.raises(CommandError, match=option):
        call_command("memfuse_bench", "ingest", *args)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--fresh-sizes", "ten"], "--fresh-sizes"),
        (["--fresh-chat-sizes", "0"], "--fresh-chat-sizes"),
        (["--fresh-queries", "0"], "--fresh-queries"),
        (["--skip", "fresh,stale"], "--skip"),
    ],
)
def test_memfuse_bench_chat_rejects_bad_fresh_options(args, option):
    """Bad options of the chat benchmark's fresh phase are command errors naming the option,
    before any dataset is built or database created."""
    with pytest.raises(CommandError, match=option):
        call_command("memfuse_bench", "chat", *args)


def test_admin_screenshot_names_a_missing_browser(tmp_path):
    """admin_screenshot refuses a Chromium path that does not exist, before starting anything."""
    with pytest.raises(CommandError, match="--chromium"):
        call_command("admin_screenshot", "--chromium", str(tmp_path / "no-chromium"), "--out", str(tmp_path / "x.png"))


@pytest.mark.parametrize(
    "args, option",
    [
        (["--users", "0"], "--users"),
        (["--messages-per-user", "0"], "--messages-per-user"),
        (["--rate", "0"], "--rate"),
        (["--closed-duration", "0"], "--closed-duration"),
        (["--data", "/nonexistent.json"], "--data"),
    ],
)
def test_memfuse_bench_query_rejects_bad_options(args, option):
    """Bad query-benchmark options are command errors naming the option, before anything is built."""
    with pytest.raises(CommandError, match=option):
        call_command("memfuse_bench", "query", *args)


@pytest.mark.django_db(transaction=True)
def test_query_dataset_rows_look_flushed_and_are_reused(tmp_path):
    """The bulk-loaded messages look like flushed ones; the same shape is reused, another is rebuilt."""
    from benchmarks.dataset import QueryDataset

    dataset = QueryDataset(tag="t", users=3, per_user=4, path=locomo_file(tmp_path))

    assert dataset.ensure(log=lambda _: None)["reused"] is False
    messages = Message.objects.filter(user__name__startswith="bench-query-t-")
    assert messages.count() == 12
    assert not messages.filter(flushed_at__isnull=True).exists() and set(
        messages.values_list("flush_count", flat=True)
    ) == {1}
    assert (
        not messages.filter(embedding__isnull=True).exists()
        and not messages.filter(search_vector__isnull=True).exists()
    )
    first = messages.get(user__name="bench-query-t-00000", metadata__locomo_dia_id="D2:1")
    assert (
        first.position == 0 and first.index_text == "Ben: I started learning the violin." and first.role == "assistant"
    )
    users = dataset.users()
    assert [u.queries for u in users][0] == ["What is the name of Ann's cat?", "Which instrument is Ben learning?"]

    assert dataset.ensure(log=lambda _: None)["reused"] is True
    bigger = QueryDataset(tag="t", users=4, per_user=4, path=dataset.path)
    assert bigger.ensure(log=lambda _: None)["reused"] is False
    assert User.objects.filter(name__startswith="bench-query-t-").count() == 4
    assert bigger.drop() == 4 and not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_memfuse_bench_query_end_to_end(tmp_path, monkeypatch):
    """A tiny query run over a real server: every phase answers, search is exact, one model, dataset dropped."""
    from tests.subprocesses import subprocess_env

    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    out = tmp_path / "query.json"

    call_command(
        "memfuse_bench",
        "query",
        "--users",
        "3",
        "--messages-per-user",
        "4",
        "--data",
        str(locomo_file(tmp_path)),
        "--rate",
        "10",
        "--duration",
        "1",
        "--closed-duration",
        "1",
        "--clients",
        "2",
        "--exactness-users",
        "2",
        "--hnsw-index",
        "--tag",
        "e2e",
        "--drop",
        "--json",
        str(out),
    )

    report = json.loads(out.read_text())
    assert report["dataset"]["messages"] == 12
    assert report["first_users"]["queries"] == 3 and report["first_users"]["cold_users"] == 3
    for phase in ("first_users", "open_loop", "closed_loop"):
        assert report[phase]["errors"] == 0 and report[phase]["empty_results"] == 0, phase
    assert report["open_loop"]["queries"] == 10 and report["open_loop"]["cold_users"] == 0
    assert report["exactness"]["served_vector_search"]["recall_min"] == 1.0
    assert len(report["exactness"]["filtered_hnsw"]) == 6 and "hnsw" in report["exactness"]["filtered_hnsw_plan"]
    # Its models are in its two inference processes (queries; flushes), one load each: the
    # serving process itself loads none (DOCUMENT_EMBEDDING_INT8, QUERY_EMBEDDING=process).
    assert report["server_memory"]["model_loads_in_server_log"] == 0
    assert report["server_memory"]["inference_process_starts_in_server_log"] == 2
    assert report["dropped_users"] == 3 and not User.objects.exists()


def long_locomo_file(tmp_path, *, turns: int = 80):
    """A LoCoMo-format conversation of ``turns`` turns in four sessions, with two questions."""
    topics = ["kayak", "pottery", "violin", "garden", "glacier", "bakery", "lisbon", "chess"]
    conversation = {"speaker_a": "Ann", "speaker_b": "Ben"}
    per_session = turns // 4
    for session in range(1, 5):
        conversation[f"session_{session}_date_time"] = f"1:56 pm on {session} May, 2023"
        conversation[f"session_{session}"] = [
            {
                "speaker": "Ann" if i % 2 == 0 else "Ben",
                "dia_id": f"D{session}:{i + 1}",
                "text": f"Turn {i} of session {session}: we talked about the {topics[(i + session) % len(topics)]} again.",
            }
            for i in range(per_session)
        ]
    qa = [
        {"question": "What did they say about the kayak?", "answer": "x", "evidence": ["D1:1"], "category": 4},
        {"question": "When did the violin come up?", "answer": "x", "evidence": ["D2:2"], "category": 2},
    ]
    path = tmp_path / "locomo-long.json"
    path.write_text(json.dumps([{"sample_id": "conv-l", "conversation": conversation, "qa": qa}]))
    return path


@pytest.mark.django_db(transaction=True)
def test_memfuse_bench_chat_end_to_end(tmp_path, monkeypatch, settings):
    """A tiny chat run over real servers: every phase answers without errors, the newest
    message of a backlog is found, the many users' server evicts, the long histories are searched through the HNSW index
    with their recall reported, the cold server cached nobody, memory is read, and the fresh
    phase loads its users over REST and by import into a database of its own, then drops it."""
    from tests.subprocesses import subprocess_env

    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    monkeypatch.setenv("ANN_MIN_MESSAGES", "100")  # the bench's servers
    settings.MEMFUSE = {**settings.MEMFUSE, "ANN_MIN_MESSAGES": 100}  # this process's loader
    out = tmp_path / "chat.json"

    call_command(
        "memfuse_bench",
        "chat",
        "--data",
        str(long_locomo_file(tmp_path)),
        "--sizes",
        "40,150",
        "--rounds",
        "3",
        "--backlog-users",
        "2",
        "--backlog-messages",
        "30",
        "--many-users",
        "6",
        "--user-size",
        "20",
        "--zipf",
        "1.0",
        "--rate",
        "4",
        "--duration",
        "1",
        "--closed-duration",
        "1",
        "--many-cache-mb",
        "0.05",
        "--cold-users",
        "2",
        "--cold-size",
        "120",
        "--cold-rate",
        "4",
        "--cold-duration",
        "1",
        "--distinct-size",
        "110",
        "--recall-queries",
        "2",
        "--clients",
        "2",
        "--fresh-sizes",
        "120",
        "--fresh-chat-sizes",
        "40",
        "--fresh-queries",
        "3",
        "--fresh-rounds",
        "2",
        "--tag",
        "e2e",
        "--seed",
        "3",
        "--json",
        str(out),
    )

    report = json.loads(out.read_text())
    assert [point["messages"] for point in report["history"]["curve"]] == [40, 150]
    assert report["history"]["errors"] == 0 and report["history"]["slope_p95_after_add"] is not None
    assert report["backlog"]["errors"] == 0 and report["backlog"]["newest_found"] == 2
    many = report["many_users"]
    assert many["open_loop"]["errors"] == {"query": 0, "add": 0} and many["closed_loop"]["queries_per_s"] > 0
    # Its own server's cache holds about two of the six users: the others are evicted and reloaded.
    assert many["user_cache_mb"] == 0.05 and many["server_cache"]["evictions"] > 0 and many["memory"]["total_mb"] > 0
    # The inference processes share the forkserver's pages: counted once, the total is smaller.
    assert 0 < many["memory"]["total_pss_mb"] < many["memory"]["total_mb"]
    assert {entry["group"] for entry in report["ann_recall"]} == {"history", "distinct", "cold"}
    assert all(entry["recall_at_k_mean"] > 0 for entry in report["ann_recall"])
    cold = report["cold"]
    assert cold["many"]["errors"] == cold["long"]["errors"] == 0 and cold["server_cache"]["size"] == 0
    assert report["memory"]["after_many_users"]["total_mb"] > 0 and report["not_measured"] == []
    fresh = report["fresh"]
    assert [(point["via"], point["messages"], point["errors"]) for point in fresh["first_queries"]] == [
        ("rest", 120, 0),
        ("import", 120, 0),
    ]
    # The flush of the first user's backlog analyzed the new database's messages before its queries.
    assert fresh["first_queries"][1]["tables"]["memory_message"]["analyzed"] is not None
    assert [(point["messages"], point["errors"]) for point in fresh["chat"]] == [(40, 0)]
    assert fresh["backlog"]["errors"] == 0 and fresh["backlog"]["newest_found"] == 2
    with connection.cursor() as cursor:  # the phase's database is gone
        cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [fresh["database"]])
        assert cursor.fetchone()[0] == 0
