"""Several processes behind one database: two web servers and a flush worker, over Redis.

An add answered by one web process is found by a query to the other at once (its cached
index catches up from the database), with the same scores, before and after the worker
flushes it; edits and deletes made through one are seen by the other too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from django.conf import settings

from benchmarks.server import ServerProcess
from memory.models import KeyScope, Message
from memory.services.api_keys import api_key_create
from memory.services.tenants import tenant_create
from tests.subprocesses import subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def _call(method: str, url: str, key: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _ranked(url: str, key: str, user_id: str, query: str) -> list[tuple[str, float, dict]]:
    status, body = _call("POST", f"{url}/api/v1/users/{user_id}/query", key, {"query": query, "top_k": 5})
    assert status == 200, body
    return [(r["id"], r["score"], r["metadata"]["retrievers"]) for r in body["data"]["results"]]


def test_two_web_processes_see_each_others_writes_at_once_with_the_same_scores(tmp_path):
    """Adds, an edit and a delete through web process A; queries to A and B agree, pending and flushed."""
    prefix = f"memfuse-processes-{os.getpid()}"
    env = subprocess_env(
        REDIS_URL="redis://127.0.0.1:6379", CHANNEL_LAYER_PREFIX=prefix, CACHE_KEY_PREFIX=prefix,
        API_RATE_LIMIT="100000/minute", QUERY_EMBEDDING="thread",
    )
    tenant = tenant_create(name="processes")
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="processes")
    servers = [ServerProcess(log_path=tmp_path / f"web-{name}.log", env=env, kind="uvicorn") for name in "ab"]
    worker = None
    try:
        a, b = (server.start() for server in servers)

        def post(url, path, body, expect=201):
            status, answer = _call("POST", f"{url}/api/v1{path}", key, body)
            assert status == expect, answer
            return answer["data"]

        user = post(a, "/users", {"name": "alice"})["user"]["id"]
        agent = post(a, "/agents", {"name": "assistant"})["agent"]["id"]
        session = post(a, "/sessions", {"user_id": user, "agent_id": agent, "name": "chat"})["session"]["id"]
        post(a, f"/sessions/{session}/messages", {"messages": [
            {"role": "user", "content": "My sister lives in Lisbon and works as an architect."},
            {"role": "assistant", "content": "Lisbon is lovely; what does she design?"},
        ]})
        assert _ranked(a, key, user, "Where does my sister live?") == _ranked(b, key, user, "Where does my sister live?")
        [kayak] = post(a, f"/sessions/{session}/messages", {"messages": [
            {"role": "user", "content": "I bought a red kayak for the lake."}]})["message_ids"]

        on_b = _ranked(b, key, user, "What boat did I buy?")  # B cached alice before this add
        assert on_b[0][0] == kayak and on_b == _ranked(a, key, user, "What boat did I buy?")

        worker = subprocess.Popen(
            [sys.executable, "manage.py", "runworker", settings.BUFFERS["CHANNEL"]], cwd=settings.BASE_DIR, env=env,
            stdout=open(tmp_path / "worker.log", "ab"), stderr=subprocess.STDOUT,
        )
        post(a, f"/sessions/{session}/flush", {}, expect=202)
        deadline = time.monotonic() + 90
        while Message.objects.filter(session_id=session, flushed_at__isnull=True).exists():
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.2)
        flushed_b = _ranked(b, key, user, "What boat did I buy?")
        assert flushed_b[0][0] == kayak and flushed_b == _ranked(a, key, user, "What boat did I buy?")

        status, answer = _call(
            "PUT", f"{a}/api/v1/sessions/{session}/messages", key,
            {"message_ids": [kayak], "new_messages": [{"role": "user", "content": "I bought a green canoe."}]},
        )
        assert status == 200, answer
        assert _ranked(b, key, user, "green canoe")[0][0] == kayak
        status, answer = _call("DELETE", f"{a}/api/v1/sessions/{session}/messages", key, {"message_ids": [kayak]})
        assert status == 200, answer
        assert kayak not in [hit[0] for hit in _ranked(b, key, user, "green canoe")]
    finally:
        for server in servers:
            server.stop()
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
