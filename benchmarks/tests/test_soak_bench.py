"""``manage.py soak_bench``: its options, its memory slope, and the pool-check figures (the soak itself drives the
restart test's load, ``tests/test_database_restart.py``)."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from benchmarks.soak import _memory
from benchmarks.stats import slope_mb_per_hour
from tests.subprocesses import subprocess_env


def test_memory_slope_is_least_squares_in_mb_per_hour():
    """Samples (s, MB) rising 1 MB per minute give 60 MB/hour; fewer than 3 samples give None."""
    assert slope_mb_per_hour([(0, 100.0), (60, 101.0), (120, 102.0), (180, 103.0)]) == 60.0
    assert slope_mb_per_hour([(0, 100.0), (60, 200.0)]) is None


def test_the_web_process_slope_is_also_given_without_its_per_user_cache():
    """A web process that grows only as its per-user cache fills (1 MB a minute each) has a
    slope of 60 MB/hour, a cache slope of 60 and none without the cache; samples without the
    cache's figure (no operator key) give no such slope. The warm-up is left out."""
    samples = [
        {"t_s": t, "web_rss_mb": 200.0 + t / 60, "inference_rss_mb": 900.0, "user_cache_mb": 10.0 + t / 60}
        for t in (0, 60, 120, 180, 240)
    ]
    samples[0]["web_rss_mb"] = 150.0  # the warm-up

    memory = _memory(samples, warmup=30)

    assert memory["web_rss_mb"]["slope_mb_per_hour"] == 60.0
    assert memory["user_cache_mb"]["slope_mb_per_hour"] == 60.0
    assert memory["web_rss_without_cache_mb"]["slope_mb_per_hour"] == 0.0
    assert memory["inference_rss_mb"]["slope_mb_per_hour"] == 0.0
    without = _memory([{**sample, "user_cache_mb": None} for sample in samples], warmup=30)
    assert without["web_rss_without_cache_mb"]["slope_mb_per_hour"] is None


def test_the_slopes_are_also_fitted_over_windows_after_the_warm_up():
    """A process that rises 2 MB a minute for 10 minutes after its warm-up, then 1 MB, then
    stays level: one slope per 10-minute window (the last, 5 minutes, on its own; a 2-minute
    tail joins the window before it)."""

    def rss(t):
        return 100 + 2 * min(t, 600) / 60 + max(0, min(t, 1200) - 600) / 60

    samples = [{"t_s": t, "web_rss_mb": rss(t), "inference_rss_mb": 900.0} for t in range(0, 1500 + 1, 30)]
    windows = _memory(samples, warmup=0, window=600)["web_rss_mb"]["slopes_by_window"]
    assert windows == [[0, 600, 120.0], [600, 1200, 60.0], [1200, 1500, 0.0]]

    tail = _memory([s for s in samples if s["t_s"] <= 1320], warmup=0, window=600)["web_rss_mb"]["slopes_by_window"]
    assert [window[:2] for window in tail] == [[0, 600], [600, 1320]]


@pytest.mark.parametrize(
    "mode, args, message",
    [
        ("soak", ["--duration", "0"], "--duration"),
        ("soak", ["--url", "http://127.0.0.1:1"], "--api-key"),
        ("soak", ["--server-env", "NOEQUALS"], "NAME=VALUE"),
        ("index-load", ["--sizes", "ten"], "--sizes"),
        ("index-load", ["--sizes", "100,0"], "--sizes"),
        ("index-load", ["--repeats", "0"], "--repeats"),
        ("respawn", ["--repeats", "0"], "--repeats"),
        ("respawn", ["--users", "0"], "--users"),
        ("ws-connections", ["--connections", "0"], "--connections"),
        ("ws-connections", ["--users", "-1"], "--users"),
        ("tenants", ["--abuse", "adds,spam"], "--abuse"),
        ("tenants", ["--abuse-users", "0"], "--abuse-users"),
        ("tenants", ["--keyless-mb", "-1"], "--keyless-mb"),
        ("tenants", ["--url", "http://127.0.0.1:1", "--api-key", "k"], "--url"),
    ],
)
def test_soak_bench_rejects_bad_options(mode, args, message):
    """Bad options are a command error naming the option, before any server starts or user is built."""
    with pytest.raises(CommandError, match=message):
        call_command("soak_bench", mode, *args)


@pytest.mark.django_db(transaction=True)
def test_index_load_loads_each_user_in_fresh_processes(tmp_path, monkeypatch):
    """index-load builds users of the sizes asked (once: a second run reuses them) and loads
    each one's whole index from its snapshot in fresh processes, a time and a peak per process."""
    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    out = tmp_path / "load.json"
    first = io.StringIO()
    call_command("soak_bench", "index-load", "--sizes", "40,90", "--repeats", "2", "--json", str(out), stdout=first)

    report = json.loads(out.read_text())
    users = report["users"]
    assert [
        (user["messages"], user["documents"], len(user["load_ms"]), len(user["peak_rise_mb"])) for user in users
    ] == [
        (40, 40, 2, 2),
        (90, 90, 2, 2),
    ]
    assert (
        0 < users[0]["snapshot_bytes"] < users[1]["snapshot_bytes"]
        and 0 < users[0]["index_bytes"] < users[1]["index_bytes"]
    )
    assert all(user["load_ms_median"] > 0 and user["peak_rise_mb_median"] >= 0 for user in users)
    assert "building" in first.getvalue()
    again = io.StringIO()
    call_command("soak_bench", "index-load", "--sizes", "40,90", "--repeats", "1", stdout=again)
    assert "building" not in again.getvalue()


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_respawn_reports_start_memory_by_process_and_a_killed_query_process_back(tmp_path, monkeypatch):
    """respawn starts a server, reads each of its processes' memory, and kills its query
    process: queries answer 200 again after at most one 503, from a new process that only
    loaded its model (the forkserver had imported torch), which shares pages with the others."""
    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    out = tmp_path / "respawn.json"
    call_command("soak_bench", "respawn", "--repeats", "1", "--users", "2", "--json", str(out), stdout=io.StringIO())

    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["start_s"] > 0 and report["start_s_median"] == run["start_s"]
    processes = {process["role"]: process for process in run["memory"]["processes"]}
    assert {"web", "query", "background", "forkserver"} <= processes.keys(), processes
    # Pages of the forkserver's imports are mapped by it and both inference processes: each
    # one's proportional share is well under its resident size.
    for role in ("query", "background", "forkserver"):
        assert processes[role]["uss"] < processes[role]["pss"] < processes[role]["rss"], processes[role]
    total = run["memory"]["total_mb"]
    assert total["pss"] < total["rss"] and total == report["total_mb_median"]
    respawned = run["respawn"]
    assert respawned["seconds"] > 0 and set(respawned["answers_before"]) <= {"503"}, respawned
    assert sum(respawned["answers_before"].values()) <= 1, respawned


def test_pool_check_reports_the_cost_of_the_connection_check(db, tmp_path):
    """pool-check times getconn+putconn with and without check_connection on this database."""
    out = tmp_path / "pool.json"
    call_command("soak_bench", "pool-check", "--iterations", "200", "--json", str(out))

    figures = json.loads(out.read_text())
    assert figures["check_connection"]["median_us"] > figures["no_check"]["median_us"] > 0
    assert figures["check_cost_us"] == round(
        figures["check_connection"]["median_us"] - figures["no_check"]["median_us"], 1
    )


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_ws_connections_holds_connections_open_on_the_server_it_starts(tmp_path, monkeypatch):
    """ws-connections opens every connection, each with a query answered, on a server started
    with --server-env: uvicorn's permessage-deflate turned off there is no extension accepted."""
    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    out = tmp_path / "ws.json"
    call_command(
        "soak_bench", "ws-connections", "--connections", "40", "--users", "3",
        "--server-env", "UVICORN_WS_PER_MESSAGE_DEFLATE=false", "--json", str(out), stdout=io.StringIO(),
    )  # fmt: skip

    report = json.loads(out.read_text())
    assert (report["connections"], report["users"], report["extension"]) == (40, 3, None)
    assert (
        report["server"]["env"] == {"UVICORN_WS_PER_MESSAGE_DEFLATE": "false"}
        and report["server"]["log_error_lines"] == 0
    )
    # Readings of a live Python process with Django and the models' clients imported.
    assert all(reading > 100 for reading in report["web_rss_mb"].values()), report["web_rss_mb"]
    assert report["open_seconds"] > 0


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_tenants_runs_the_well_behaved_tenants_alone_then_beside_the_abuser(tmp_path, monkeypatch):
    """tenants runs three tenants' chat alone, then beside an abuser doing every kind of abuse,
    on a server started with --server-env: each run counts the well-behaved answers, their
    latency and flush lag; the abuser's answers are counted per kind (a body with no key is
    never taken, its backlog past the limit is a 503), and every acknowledged message is stored."""
    monkeypatch.setenv("DATABASE_URL", subprocess_env()["DATABASE_URL"])
    out = tmp_path / "tenants.json"
    env = ["FLUSH_INTERVAL_SECONDS=1", "FLUSH_SHUTDOWN_SECONDS=1", "MAX_BACKLOG_MESSAGES=1500"]
    call_command(
        "soak_bench", "tenants", "--duration", "3", "--warmup", "0", "--users", "1", "--add-rate", "3",
        "--abuse", "adds,flush-waits,imports,keyless,backlog", "--abuse-users", "2", "--abuse-add-rate", "200",
        "--flush-waits", "2", "--import-mb", "0.05", "--keyless-mb", "1", "--drain-timeout", "20",
        *[arg for item in env for arg in ("--server-env", item)], "--json", str(out), stdout=io.StringIO(),
    )  # fmt: skip

    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"alone", "with_abuser"} and "abuser" not in report["runs"]["alone"]
    for run in report["runs"].values():
        well_behaved = run["well_behaved"]
        assert set(well_behaved["answers"]) == {"add", "query"}, well_behaved["answers"]
        adds = sum(well_behaved["answers"]["add"].values())
        assert adds >= 3 and sum(well_behaved["answers"]["query"].values()) >= 3, well_behaved["answers"]
        assert set(well_behaved["by_tenant"]) == {"0", "1", "2"} and isinstance(well_behaved["first_errors"], list)
        assert set(well_behaved["latency_ms"]["query"]) == {"p50", "p95", "p99", "max"}
        assert well_behaved["flush_lag_s"]["messages"] == 2 * well_behaved["answers"]["add"].get("201", 0)
        assert run["server_memory_mb"]["web_rss"]["max"] > 100, run["server_memory_mb"]
    abuser = report["runs"]["with_abuser"]["abuser"]
    assert {
        "adds",
        "backlog",
        "flush-waits",
        "imports",
        "keyless_import",
        "keyless_import_chunked",
        "keyless_add",
    } <= set(abuser)
    for kind in ("keyless_import", "keyless_import_chunked", "keyless_add"):
        assert set(abuser[kind]["answers"]) <= {"401", "413"}, abuser[kind]
    assert "503" in abuser["backlog"]["answers"] and abuser["backlog"]["errors"]["503"], abuser["backlog"]
    acknowledged = report["acknowledged"]
    assert acknowledged["messages"] > 0 and acknowledged["lost"] == 0, acknowledged
    assert set(report["goals"]) == {"well_behaved_only_2xx", "query_p95_ratio", "flush_lag_p95_s", "nothing_lost"}
    assert report["goals"]["nothing_lost"]["met"] is True
    assert report["server"]["env"] == dict(item.split("=") for item in env)
