"""The dashboard's charts of the last hour, in a real server, seen in headless Chromium (a screenshot)."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from benchmarks.server import ServerProcess
from memory.models import KeyScope
from memory.services.api_keys import api_key_create
from memory.services.tenants import tenant_create
from tests.subprocesses import subprocess_env

CHROMIUM = Path("/usr/bin/chromium")


def _post(url: str, key: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_charts_adds_queries_latency_backlog_and_flushes(tmp_path):
    """After adds, queries and a flush through a server's API, its dashboard draws them (screenshot taken)."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    tenant = tenant_create(name="charts")
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="charts")
    password = secrets.token_urlsafe(12)
    get_user_model().objects.create_superuser("charts-operator", "op@example.com", password)
    env = subprocess_env(DASHBOARD_SAMPLE_SECONDS="0.5", QUERY_EMBEDDING="thread", FLUSH_INTERVAL_SECONDS="600")
    server = ServerProcess(log_path=tmp_path / "server.log", env=env, args=["--insecure"])
    url = server.start()
    try:
        api = f"{url}/api/v1"
        user = _post(f"{api}/users", key, {"name": "alice"})["user"]["id"]
        agent = _post(f"{api}/agents", key, {"name": "assistant"})["agent"]["id"]
        session = _post(f"{api}/sessions", key, {"user_id": user, "agent_id": agent, "name": "chat"})["session"]["id"]
        for i in range(6):
            messages = [{"role": "user", "content": f"Note {i}: my sister lives in Lisbon and has {i} cats."}]
            _post(f"{api}/sessions/{session}/messages", key, {"messages": messages})
            _post(f"{api}/users/{user}/query", key, {"query": "Where does my sister live?"})
            time.sleep(0.3)
        _post(f"{api}/users/{user}/flush", key, {"wait": True})
        time.sleep(1.5)  # a few more samples: the flush and the emptied backlog
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{url}/admin/login/?next=/admin/dashboard/")
                page.fill("#id_username", "charts-operator")
                page.fill("#id_password", password)
                page.click("input[type=submit]")
                page.wait_for_selector("#mf-history", timeout=30_000)
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                peaks = {
                    key: float(page.get_attribute(f"#mf-chart-{key}", "data-peak"))
                    for key in ("adds_per_s", "queries_per_s", "query_p95_ms", "pending", "flushes_per_s", "errors_per_s")
                }
                lines = page.eval_on_selector_all("#mf-history polyline", "els => els.map(e => e.points.numberOfItems)")
            finally:
                browser.close()
    finally:
        server.stop()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert peaks["adds_per_s"] > 0 and peaks["queries_per_s"] > 0 and peaks["flushes_per_s"] > 0, peaks
    assert peaks["query_p95_ms"] > 0 and peaks["pending"] >= 1 and peaks["errors_per_s"] == 0, peaks
    assert len(lines) == 6 and min(lines) >= 2, lines  # every chart is a line of several points
