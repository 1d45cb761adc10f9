"""The operator dashboard (admin page) and its JSON twin GET /api/v1/admin/stats: real figures, operators only."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction

from buffers import services as buffers
from buffers.models import FlushJob, Priority, Reason, State
from memory import retrieval
from memory.facts import worker
from memory.indexing.flush import flush_pending
from memory.services.messages import MessageIn, messages_add
from tests.test_facts import llm_on, llm_server, say  # noqa: F401  (fixtures)


@pytest.fixture
def staff_client(client, db):
    get_user_model().objects.create_superuser("operator", "op@example.com", "pw")
    client.login(username="operator", password="pw")
    return client


@pytest.fixture
def busy_buffers(alice_session, bob_session):
    """Alice: 3 pending messages; bob: 1 pending and a failed flush."""
    messages_add(session=alice_session, messages=[MessageIn(role="user", content=f"note {i}") for i in range(3)])
    messages_add(session=bob_session, messages=[MessageIn(role="user", content="my beagle Pepper")])
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=bob_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    FlushJob.objects.filter(pk=job_id).update(state=State.FAILED, attempts=4, last_error="embedding timed out")
    with transaction.atomic():
        buffers.request_flush(user_id=alice_session.user_id, priority=Priority.LOW, reason=Reason.TIME)
    return job_id


def test_admin_index_links_to_the_dashboard(staff_client):
    """The admin index links to the dashboard."""
    assert 'href="/admin/dashboard/"' in staff_client.get("/admin/").content.decode()


def test_dashboard_shows_pending_messages_and_failed_flushes(staff_client, busy_buffers):
    """The page shows the real pending totals, the top users, the queue and the failed job with its error."""
    page = staff_client.get("/admin/dashboard/")

    assert page.status_code == 200
    html = page.content.decode()
    stats = page.context["stats"]
    assert stats["buffers"]["pending_messages"] == 4 and stats["buffers"]["pending_users"] == 2
    assert [(u["name"], u["pending_messages"]) for u in stats["buffers"]["top_users"]] == [("alice", 3), ("bob", 1)]
    assert stats["buffers"]["queue_depth"] == {"critical": 0, "high": 0, "normal": 0, "low": 1}
    assert stats["buffers"]["jobs"]["failed"] == 1 and stats["buffers"]["failed_jobs"][0]["id"] == busy_buffers
    assert ">4 (2)<" in html and "alice" in html and "embedding timed out" in html
    assert f"#{busy_buffers}" in html and "Retry all 1 failed flush(es)" in html
    assert stats["pool"]["in_use"] >= 1 and "Database pool" in html
    assert f"{stats['process']['ram']['resident_mb']} MB" in html
    assert "Recent query embeddings" in html


def test_dashboard_retries_every_failed_flush(staff_client, busy_buffers):
    """'Retry all' on the dashboard queues the failed flush again."""
    response = staff_client.post("/admin/dashboard/", {"retry_failed": "1"})

    assert response.status_code == 302
    assert FlushJob.objects.get(pk=busy_buffers).state == State.QUEUED


def test_dashboard_is_for_staff_only(client, db):
    """Anonymous and non-staff users are sent to the admin login."""
    get_user_model().objects.create_user("visitor", password="pw")
    assert client.get("/admin/dashboard/").status_code == 302
    client.login(username="visitor", password="pw")
    response = client.get("/admin/dashboard/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_stats_endpoint_shape(staff_client, busy_buffers, alice):
    """GET /api/v1/admin/stats returns the same figures in the envelope."""
    retrieval.user_index(alice.pk)

    body = staff_client.get("/api/v1/admin/stats").json()

    assert (body["status"], body["code"]) == ("success", 200)
    data = body["data"]
    assert set(data) == {"generated_at", "process", "pool", "models", "user_cache", "buffers", "facts"}
    assert {"enabled", "size", "in_use", "idle", "requests_waiting", "requests_errors", "refused_503"} <= set(data["pool"])
    assert {"size", "bytes", "max_bytes", "hits", "misses", "evictions", "hit_rate"} == set(data["user_cache"])
    assert data["user_cache"]["size"] >= 1
    assert set(data["process"]) == {"host", "pid", "ram"}
    assert set(data["process"]["ram"]) == {"resident_mb", "heap_in_use_mb", "heap_free_mb"}
    assert data["process"]["ram"]["resident_mb"] > 0
    assert set(data["models"]) == {
        "embedding", "query_embedding", "background_embedding", "reranker", "recent_embeddings", "active", "reembed"
    }
    assert (data["models"]["active"], data["models"]["reembed"]) == (None, None)  # no reembed ran
    assert data["buffers"]["pending_messages"] == 4 and data["buffers"]["failed_total"] == 1
    assert {"top_users", "jobs", "queue_depth", "failed_jobs", "oldest_pending_age_s", "workers"} <= set(data["buffers"])


def test_stats_endpoint_refuses_non_operators(anonymous_api, api, client, db):
    """Without credentials 401; a tenant key or a non-staff session 404; all in the error envelope."""
    anonymous = anonymous_api.get("/api/v1/admin/stats")
    assert anonymous.status_code == 401 and anonymous.json()["status"] == "error"
    assert anonymous.json()["errors"] == [{"field": None, "message": anonymous.json()["message"]}]
    assert api.get("/api/v1/admin/stats").status_code == 404  # a tenant key is no operator's

    assert api.get("/api/v1/admin/stats").status_code == 404  # a tenant key is no operator's

    get_user_model().objects.create_user("visitor", password="pw")
    client.login(username="visitor", password="pw")
    refused = client.get("/api/v1/admin/stats")
    assert refused.status_code == 404 and refused.json()["code"] == 404


def test_dashboard_shows_the_facts_layer_per_tenant(staff_client, llm_on, alice, alice_session):  # noqa: F811
    """With the facts layer on, the dashboard and admin/stats give each tenant's LLM calls,
    tokens and extraction backlog (the messages a flush queued for extraction); off, neither
    shows a facts section."""
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    waiting = staff_client.get("/admin/dashboard/")
    [row] = waiting.context["stats"]["facts"]
    assert (row["tenant"], row["calls"], row["backlog_jobs"], row["backlog_messages"]) == (alice.tenant.name, 0, 1, 1)
    assert 'id="mf-facts"' in waiting.content.decode()

    assert worker.run_once() == 1
    [row] = staff_client.get("/api/v1/admin/stats").json()["data"]["facts"]
    assert row["calls"] >= 1 and row["prompt_tokens"] > 0 and row["backlog_jobs"] == 0 and row["failures"] == 0


def test_dashboard_has_no_facts_section_while_the_layer_is_off(staff_client, alice):
    """The facts layer off: ``facts`` is null and the page has no facts table."""
    page = staff_client.get("/admin/dashboard/")
    assert page.context["stats"]["facts"] is None and 'id="mf-facts"' not in page.content.decode()
