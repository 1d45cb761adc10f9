"""The operator admin: list pages render without vectors, failed flushes can be retried."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction

from buffers import services as buffers
from buffers.models import FlushJob, Priority, Reason, State


@pytest.fixture
def staff_client(client, db):
    get_user_model().objects.create_superuser("operator", "op@example.com", "pw")
    client.login(username="operator", password="pw")
    return client


@pytest.mark.parametrize("model", ["memory/tenant", "memory/apikey", "memory/user", "memory/agent", "memory/session", "memory/message", "memory/knowledge", "buffers/flushjob"])
def test_list_pages_render(staff_client, alice_messages, model):
    """Every model's admin list renders for staff."""
    assert staff_client.get(f"/admin/{model}/").status_code == 200


def test_message_list_shows_flushed_state_and_no_vector(staff_client, alice_messages):
    """The message list says whether each message is flushed and never prints an embedding."""
    buffers.flush_pending(user_id=alice_messages[0].user_id)
    page = staff_client.get("/admin/memory/message/").content.decode()
    assert "Biscuit" in page and "icon-yes" in page
    assert "embedding" not in page.lower().split("<table")[1]


def test_retry_action_requeues_failed_flushes(staff_client, alice_session):
    """The 'retry' admin action puts a failed flush back in the queue with fresh attempts."""
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    FlushJob.objects.filter(pk=job_id).update(state=State.FAILED, attempts=4, last_error="boom")

    response = staff_client.post("/admin/buffers/flushjob/", {"action": "retry_failed", "_selected_action": [job_id]})

    assert response.status_code == 302
    job = FlushJob.objects.get(pk=job_id)
    assert (job.state, job.attempts) == (State.QUEUED, 0)


def test_revoke_action_revokes_keys_for_good(staff_client, tenant_key):
    """The admin's 'revoke' action revokes the selected keys: the API refuses them at once."""
    from memory.models import ApiKey
    from tests.conftest import key_client

    assert key_client(tenant_key).get("/api/v1/users").status_code == 200
    api_key = ApiKey.objects.get(prefix=tenant_key.split(".")[0])

    response = staff_client.post("/admin/memory/apikey/", {"action": "revoke", "_selected_action": [api_key.pk]})

    assert response.status_code == 302
    assert ApiKey.objects.get(pk=api_key.pk).revoked
    assert key_client(tenant_key).get("/api/v1/users").status_code == 401


def test_message_list_filters_pending_and_flushed(staff_client, alice_messages, bob_messages):
    """The 'flushed' filter separates flushed messages from those still pending."""
    buffers.flush_pending(user_id=alice_messages[0].user_id)

    pending = staff_client.get("/admin/memory/message/?flushed=no").content.decode()
    flushed = staff_client.get("/admin/memory/message/?flushed=yes").content.decode()

    assert "Pepper" in pending and "Biscuit" not in pending
    assert "Biscuit" in flushed and "Pepper" not in flushed
