"""A PostgreSQL restart under load: only successes and 503s with Retry-After, nothing acknowledged
lost or duplicated, full service within 5 s of the database's return, and quiet flush workers.

The test starts a PostgreSQL of its own (pgserver's, with pgvector, in a temporary folder) so
that no other test is disturbed, and the production server (uvicorn) on it as the embedded
default: the server migrates it and writes the development tenant's key there. Mixed load
(``benchmarks.soak.MixedLoad``: REST adds and queries, WebSocket adds and queries) runs while the
database restarts with ``pg_ctl restart -m fast``, which terminates every connection
("terminating connection due to administrator command").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import requests
from django.conf import settings

from benchmarks.server import free_loopback_port, uvicorn_command
from benchmarks.soak import MixedLoad, Target
from runtime.embedded_pg import DATABASE_NAME, ensure_server, restart_server, stop_server

LOAD_BEFORE = 2.5  # s of load before the restart
LOAD_AFTER = 8.0  # s of load after the database is back
RECOVERY = 5.0  # s: full service again within this of the database's return
SUCCESS = {"add": 201, "query": 200, "ws_add": 201, "ws_query": 200, "ws_connect": 101}


@pytest.fixture
def own_postgres():
    """A PostgreSQL 16 + pgvector of this test only (pgserver), stopped and deleted at the end: ``(data_dir, server)``.

    Not under pytest's ``tmp_path``: run as root, pgserver runs PostgreSQL as its own user,
    which must traverse the folder's parents, and a pytest session starting meanwhile (another
    run on the machine) makes ``/tmp/pytest-of-root`` private again.
    """
    folder = Path(tempfile.mkdtemp(prefix="memfuse-restart-"))
    data_dir = folder / "pg"
    try:
        server = ensure_server(data_dir)
        yield data_dir, server
    finally:
        stop_server(data_dir)
        shutil.rmtree(folder, ignore_errors=True)


def restart(data_dir: Path) -> None:
    """``pg_ctl restart -m fast``: terminates every session, waits until the server accepts connections."""
    restart_server(data_dir)


def serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """uvicorn on the embedded default in ``data_dir`` (no DATABASE_URL, no SECRET_KEY); waits for health."""
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "SECRET_KEY", "RUN_MAIN"}}
    env.update(
        DJANGO_SETTINGS_MODULE="memfuse_project.settings",
        EMBEDDED_PG_DIR=str(data_dir),
        # Inference in the server's own threads: the restart is about the database, and the
        # inference processes would cost the suite a second of start and ~1 GB each.
        BACKGROUND_EMBEDDING="thread",
        QUERY_EMBEDDING="thread",
        QUERY_EMBEDDING_INT8="0",
        TORCH_THREADS="1",
        FLUSH_WORKERS="2",
        DB_POOL_MAX_SIZE="6",
        DB_POOL_TIMEOUT="2",
        API_RATE_LIMIT="1000000/minute",
        # All the load is one tenant's: on a slow host its requests in progress pass its share of
        # the process (API_TENANT_CONCURRENCY, tests/test_admission.py) and get that bound's 429,
        # which is not the restart's answer this test is about.
        API_TENANT_CONCURRENCY="0",
        LOG_LEVEL="INFO",
    )
    port = free_loopback_port()
    process = subprocess.Popen(uvicorn_command(port), cwd=settings.BASE_DIR, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/api/v1/health", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.3)


def make_targets(url: str, key: str, count: int) -> list[Target]:
    headers = {"Authorization": f"Bearer {key}"}

    def post(path: str, body: dict) -> dict:
        response = requests.post(f"{url}/api/v1{path}", json=body, headers=headers, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()["data"]

    agent = post("/agents", {"name": "restart"})["agent"]
    targets = []
    for index in range(count):
        user = post("/users", {"name": f"user-{index}"})["user"]
        session = post("/sessions", {"user_id": user["id"], "agent_id": agent["id"], "name": "chat"})["session"]
        targets.append(Target(user_id=user["id"], session_id=session["id"]))
    return targets


def test_database_restart_under_load_answers_only_success_or_503(own_postgres, tmp_path):
    """pg_ctl restart under adds, queries and WebSocket frames: success or 503 + Retry-After, all acked rows once, service back in 5 s."""
    data_dir, pg = own_postgres
    log = tmp_path / "server.log"
    server, url = serve(data_dir, log)
    try:
        key = (data_dir / "local-api-key").read_text().strip()
        load = MixedLoad(url, key, make_targets(url, key, 4), add_rate=20, query_rate=4, ws_clients=2, ws_frames=10_000, ws_pause=0.1)
        load.start()
        try:
            time.sleep(LOAD_BEFORE)
            restart_began = time.monotonic()
            restart(data_dir)
            back = time.monotonic()
            time.sleep(LOAD_AFTER)
        finally:
            load.stop()
        outcomes = load.recorder.snapshot()

        counts = Counter((o.kind, o.status) for o in outcomes)
        refused = [o for o in outcomes if o.status != SUCCESS[o.kind]]
        figures = {
            "restart_s": round(back - restart_began, 2),
            "last_refusal_sent_after_back_s": round(max(o.sent for o in refused) - back, 2) if refused else None,
            "answers": {f"{k} {s}": n for (k, s), n in sorted(counts.items())},
        }
        print(json.dumps(figures))  # pytest -s shows it
        assert {(o.kind, o.status) for o in refused} <= {(kind, 503) for kind in SUCCESS} | {("ws_connect", 4503)}, (refused[:5], log.read_text()[-5000:])
        assert all(o.retry_after == "1" for o in refused if o.kind in ("add", "query")), refused[:5]
        assert not [o for o in refused if o.sent > back + RECOVERY], "503s more than 5 s after the database was back"
        # Served after that: adds over both protocols, and queries (the slowest: each embeds the
        # user's pending messages, which pile up while the flush is held up, on the model the
        # flush shares in this server).
        late = Counter(o.kind for o in outcomes if o.sent > back + RECOVERY)
        assert late["add"] and late["ws_add"] and late["query"] + late["ws_query"], late

        acknowledged = [message_id for o in outcomes if o.status == 201 for message_id in o.message_ids]
        with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname=DATABASE_NAME, autocommit=True) as db:
            deadline = time.monotonic() + 90
            while db.execute("SELECT count(*) FROM memory_message WHERE flushed_at IS NULL").fetchone()[0]:
                assert time.monotonic() < deadline, "the flush did not catch up after the restart"
                time.sleep(0.5)
            rows = db.execute(
                "SELECT id::text, flush_count, embedding IS NOT NULL FROM memory_message WHERE id = ANY(%s::uuid[])", [acknowledged]
            ).fetchall()
            duplicated = db.execute("SELECT count(*) FROM (SELECT content FROM memory_message GROUP BY content HAVING count(*) > 1) d").fetchone()[0]
        assert len(acknowledged) > 200
        assert len(rows) == len(acknowledged) == len(set(acknowledged))
        assert {(count, embedded) for _, count, embedded in rows} == {(1, True)}
        assert duplicated == 0

        # A restart while the server is idle leaves its pooled connections closed: the pool's
        # check drops them when they are taken, so not even the first requests after it fail.
        restart(data_dir)
        statuses = [requests.get(f"{url}/api/v1/users", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code for _ in range(8)]
        assert statuses == [200] * 8

        # The database down: the admin (Django's own error path, not DRF's) and the API answer
        # 503 with Retry-After, each logged as one line, no traceback (asserted below).
        stop_server(data_dir)
        try:
            session = {"sessionid": "a" * 32}  # makes the admin look the session up in the database
            admin = requests.get(f"{url}/admin/", cookies=session, timeout=10, allow_redirects=False)
            api = requests.get(f"{url}/api/v1/users", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        finally:
            restart(data_dir)
        assert (admin.status_code, api.status_code) == (503, 503), (admin.text, api.text)
        assert admin.headers.get("Retry-After") and api.headers.get("Retry-After")
        # Back within RECOVERY s of the database's return (the pool reconnects with a backoff).
        deadline = time.monotonic() + RECOVERY
        while (status := requests.get(f"{url}/admin/", cookies=session, timeout=10, allow_redirects=False).status_code) != 302:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.2)
        # The flush workers say so once they have worked again for a while (QUIET_SECONDS).
        deadline = time.monotonic() + RECOVERY
        while (text := log.read_text()).count("database reachable again") < text.count("database unavailable"):
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Service Unavailable: /admin/" in text
    assert text.count("database unavailable") <= 2 and text.count("database reachable again") == text.count("database unavailable")
    assert (data_dir / "secret-key").stat().st_mode & 0o777 == 0o600  # the embedded default made its SECRET_KEY
