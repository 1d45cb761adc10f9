"""GET /metrics: the Prometheus text format, for operators and a scrape token; counters that move."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from prometheus_client.parser import text_string_to_metric_families

from memory.indexing.flush import flush_pending
from memory.inference import registry
from memory.models import KeyScope
from memory.services.api_keys import api_key_create
from tests.conftest import key_client
from tests.subprocesses import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

SCRAPE_TOKEN = "scrape-token-for-tests-0123456789"


@pytest.fixture
def scrape_token(settings) -> str:
    settings.MEMFUSE = {**settings.MEMFUSE, "METRICS_TOKEN": SCRAPE_TOKEN}
    return SCRAPE_TOKEN


@pytest.fixture
def operator_key(db) -> str:
    return api_key_create(scope=KeyScope.OPERATOR, name="prometheus")[1]


def scrape(client) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels without pid): value}`` of one scrape, parsed by the client library."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_metrics_refuses_anyone_but_operators_and_the_scraper(anonymous_api, api, client, scrape_token, db):
    """401 without credentials or with a wrong token, 404 for a tenant key or a non-staff session."""
    assert anonymous_api.get("/metrics").status_code == 401
    assert key_client("not-the-token").get("/metrics").status_code == 401
    response = api.get("/metrics")
    assert response.status_code == 404 and response.json()["status"] == "error"
    get_user_model().objects.create_user("visitor", "v@example.com", "pw")
    client.login(username="visitor", password="pw")
    assert client.get("/metrics").status_code == 404


def test_metrics_for_a_scrape_token_an_operator_key_and_a_staff_session(client, scrape_token, operator_key):
    """Each of the three credentials reads the metrics."""
    assert "memfuse_pending_messages" in str(scrape(key_client(scrape_token)))
    assert scrape(key_client(operator_key))[("memfuse_pending_messages", ())] == 0
    get_user_model().objects.create_superuser("operator", "op@example.com", "pw")
    client.login(username="operator", password="pw")
    assert ("memfuse_pool_enabled", ()) in scrape(client)


def moved(after: dict, before: dict, name: str, **labels: str) -> float:
    """How much sample ``name`` with ``labels`` grew from ``before`` to ``after`` (absent: 0)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_counters_move_after_an_add_a_query_and_a_flush(
    api, alice, alice_session, operator_key, django_capture_on_commit_callbacks
):
    """An add, a query and a flush move their counters, the route histogram, the stage histograms and the gauges."""
    scraper = key_client(operator_key)
    before = scrape(scraper)

    messages = [{"role": "user", "content": "My cat Miso likes tuna"}, {"role": "user", "content": "I live in Oslo"}]
    with django_capture_on_commit_callbacks(execute=True):
        added = api.post(f"/api/v1/sessions/{alice_session.pk}/messages", {"messages": messages}, format="json")
    assert added.status_code == 201, added.content
    after_add = scrape(scraper)
    assert moved(after_add, before, "memfuse_messages_added_total") == 2
    assert after_add[("memfuse_pending_messages", ())] == 2
    assert after_add[("memfuse_oldest_pending_age_seconds", ())] >= 0
    route = {"route": "session-messages", "method": "POST", "status": "2xx"}
    assert moved(after_add, before, "memfuse_http_request_duration_seconds_count", **route) == 1

    query = api.post(f"/api/v1/users/{alice.pk}/query", {"query": "what does Miso eat?"}, format="json")
    assert query.status_code == 200
    after_query = scrape(scraper)
    assert moved(after_query, after_add, "memfuse_queries_total") == 1
    for stage in ("bm25", "embed", "vector", "fusion"):
        assert moved(after_query, after_add, "memfuse_query_stage_duration_seconds_count", stage=stage) == 1, stage
    for role, model in registry.stats().items():  # the dashboard's figures, whichever models this process holds
        if model and "calls" in model:
            assert after_query[("memfuse_model_calls_total", (("model", role),))] == model["calls"], role

    assert flush_pending(user_id=alice.pk) == 2
    after_flush = scrape(scraper)
    assert moved(after_flush, after_query, "memfuse_flushes_total", outcome="ok") == 1
    assert moved(after_flush, after_query, "memfuse_messages_flushed_total") == 2
    assert moved(after_flush, after_query, "memfuse_flush_duration_seconds_count") == 1
    assert after_flush[("memfuse_pending_messages", ())] == 0
    assert after_flush[("memfuse_flush_jobs", (("state", "failed"),))] == 0


COUNT_ADDS = "import sys; from memory import metrics; metrics.MESSAGES_ADDED.inc(int(sys.argv[1]))"
SCRAPE = (
    "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.settings'); django.setup(); "
    "from memory.operator.exposition import scrape; print(scrape().decode())"
)


@pytest.mark.django_db(transaction=True)
def test_multiprocess_mode_sums_the_events_of_every_process(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, a scrape of one process counts the adds of two others."""
    env = subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for count in ("3", "4"):
        subprocess.run([sys.executable, "-c", COUNT_ADDS, count], env=env, cwd=ROOT, check=True, timeout=60)
    text = subprocess.run(
        [sys.executable, "-c", SCRAPE], env=env, cwd=ROOT, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert values["memfuse_messages_added_total"] == 7
    assert values["memfuse_pending_messages"] == 0
