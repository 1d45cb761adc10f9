"""The operator admin: list pages render without vectors, failed flushes can be retried, deletes
and edits go through the services (tombstones, memory_version, index text, the lock order)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from buffers import services as buffers
from buffers.models import FlushJob, Priority, Reason, State
from memory import retrieval, selectors
from memory.indexing.flush import flush_pending
from memory.models import Knowledge, Message, Tenant, Tombstone, User
from memory.retrieval import MemoryQuery
from memory.services.knowledge import knowledge_add
from tests.locks import a_backend_waits_for_a_lock


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
    flush_pending(user_id=alice_messages[0].user_id)
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
    flush_pending(user_id=alice_messages[0].user_id)

    pending = staff_client.get("/admin/memory/message/?flushed=no").content.decode()
    flushed = staff_client.get("/admin/memory/message/?flushed=yes").content.decode()

    assert "Pepper" in pending and "Biscuit" not in pending
    assert "Biscuit" in flushed and "Pepper" not in flushed


def _hits(user, query: str) -> list[str]:
    """The ids of the user's messages a BM25-only query finds, best first."""
    user.refresh_from_db()
    config = retrieval.RetrievalConfig.from_settings(vector_weight=0.0)
    found = selectors.memory_query(MemoryQuery(user=user, query=query, top_k=10, config=config))
    return [hit["id"] for hit in found if hit["type"] == "message"]


@pytest.mark.parametrize("how", ["delete page", "delete action"])
def test_an_admin_delete_of_a_message_writes_a_tombstone_and_moves_memory_version(staff_client, alice_messages, how):
    """Deleting a message from the admin (its delete page, or the list's action) goes through
    messages_delete: a tombstone for it and the user's memory_version moved."""
    message = alice_messages[1]
    before = User.objects.get(pk=message.user_id).memory_version

    if how == "delete page":
        response = staff_client.post(f"/admin/memory/message/{message.pk}/delete/", {"post": "yes"})
    else:
        selected = {"action": "delete_selected", "_selected_action": [message.pk], "post": "yes"}
        response = staff_client.post("/admin/memory/message/", selected)

    assert response.status_code == 302
    assert not Message.objects.filter(pk=message.pk).exists()
    assert Tombstone.objects.filter(user_id=message.user_id, kind="message", doc_id=message.pk).exists()
    assert User.objects.get(pk=message.user_id).memory_version > before
    assert Message.objects.filter(user_id=message.user_id).count() == 2


@pytest.mark.parametrize("model", ["session", "agent", "knowledge"])
def test_admin_deletes_of_sessions_agents_and_knowledge_leave_tombstones(staff_client, alice_messages, agent, model):
    """Deleting a session or an agent from the admin leaves a tombstone for each of its
    messages, a knowledge item one for itself, and moves the user's memory_version."""
    user = alice_messages[0].user
    knowledge_add(user=user, contents=["Alice is vegetarian."])
    before = User.objects.get(pk=user.pk).memory_version
    target = {"session": alice_messages[0].session, "agent": agent, "knowledge": Knowledge.objects.get(user=user)}[model]
    gone = {("knowledge", target.pk)} if model == "knowledge" else {("message", row.pk) for row in alice_messages}

    assert staff_client.post(f"/admin/memory/{model}/{target.pk}/delete/", {"post": "yes"}).status_code == 302

    assert set(Tombstone.objects.filter(user=user).values_list("kind", "doc_id")) == gone
    assert User.objects.get(pk=user.pk).memory_version > before


def test_an_admin_edit_of_a_message_reindexes_it_and_makes_it_pending(staff_client, alice_messages):
    """Editing a message's content in the admin goes through messages_update: its index text
    and tsvector hold the new words (a BM25 search finds them, not the old ones, in a cached
    index too), and it is pending again, its old embedding dropped."""
    from django.contrib.postgres.search import SearchQuery

    message = alice_messages[2]  # "My sister lives in Lisbon and works as an architect."
    user = message.user
    flush_pending(user_id=user.pk)
    assert _hits(user, "Lisbon architect")[0] == str(message.pk)  # cached, as a running service has it
    said = "My brother moved to Oslo to study medicine."

    response = staff_client.post(f"/admin/memory/message/{message.pk}/change/", {"role": "user", "content": said, "metadata": "{}"})

    assert response.status_code == 302
    message.refresh_from_db()
    assert (message.content, message.index_text) == (said, said)
    assert message.flushed_at is None and message.embedding is None
    assert Message.objects.filter(pk=message.pk, search_vector=SearchQuery("Oslo", config="english")).exists()
    assert _hits(user, "Oslo medicine")[0] == str(message.pk)
    assert str(message.pk) not in _hits(user, "Lisbon architect")


def test_an_admin_edit_of_a_message_is_validated_as_the_api_validates_it(staff_client, alice_messages):
    """The admin refuses a message the API would refuse (metadata not an object), naming the
    field, and changes nothing."""
    message = alice_messages[0]

    response = staff_client.post(f"/admin/memory/message/{message.pk}/change/", {"role": "user", "content": "x", "metadata": "[1]"})

    assert response.status_code == 200 and "metadata" in response.context["adminform"].form.errors
    message.refresh_from_db()
    assert message.content.startswith("I adopted")


def test_messages_and_knowledge_cannot_be_added_and_knowledge_not_edited_in_the_admin(staff_client, alice_messages):
    """Messages and knowledge are added through the API only; a knowledge item's page is read-only."""
    user = alice_messages[0].user
    knowledge_add(user=user, contents=["Alice is vegetarian."])
    item = Knowledge.objects.get(user=user)

    assert staff_client.get("/admin/memory/message/add/").status_code == 403
    assert staff_client.get("/admin/memory/knowledge/add/").status_code == 403
    assert staff_client.post(f"/admin/memory/knowledge/{item.pk}/change/", {"content": "changed"}).status_code == 403
    assert Knowledge.objects.get(pk=item.pk).content == "Alice is vegetarian."


def test_a_tenant_delete_page_counts_what_goes_and_lists_no_message(staff_client, tenant, alice_messages, bob_messages):
    """The delete confirmation of a tenant counts its users, sessions and messages instead of
    loading and listing every row."""
    page = staff_client.get(f"/admin/memory/tenant/{tenant.pk}/delete/").content.decode()

    assert "Users: 2" in page and "Sessions: 2" in page and "Messages: 5" in page
    assert "Biscuit" not in page and "Pepper" not in page


def test_a_running_flush_job_cannot_be_edited_or_deleted_in_the_admin(staff_client, alice_session):
    """Flush jobs change only through buffers' services: no edit form, and a waiting or running
    job is not deleted (a finished one is)."""
    with transaction.atomic():
        running = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    FlushJob.objects.filter(pk=running).update(state=State.RUNNING)
    done = FlushJob.objects.create(user_id=alice_session.user_id, priority=Priority.NORMAL, reason=Reason.MANUAL, state=State.DONE)

    edit = staff_client.post(f"/admin/buffers/flushjob/{running}/change/", {"state": State.FAILED, "priority": Priority.LOW})
    single = staff_client.post(f"/admin/buffers/flushjob/{running}/delete/", {"post": "yes"})
    both = staff_client.post("/admin/buffers/flushjob/", {"action": "delete_selected", "_selected_action": [running, done.pk], "post": "yes"})
    assert FlushJob.objects.count() == 2
    finished = staff_client.post("/admin/buffers/flushjob/", {"action": "delete_selected", "_selected_action": [done.pk], "post": "yes"})

    assert (edit.status_code, single.status_code, both.status_code, finished.status_code) == (403, 403, 403, 302)
    assert list(FlushJob.objects.values_list("pk", "state")) == [(running, State.RUNNING)]


@pytest.mark.django_db(transaction=True)
def test_deleting_a_tenant_while_its_flush_writes_neither_deadlocks_nor_fails(staff_client, tenant, alice_messages, bob_messages, monkeypatch):
    """A tenant deleted from the admin while a flush of one of its users is writing waits for
    that write (every user row first: the lock order), then deletes all; the flush ends
    without an error. Django's cascade would delete the messages first and deadlock with it."""
    from memory.indexing import flush as memory_flush
    from memory.models import EMBEDDING_DIM

    alice = alice_messages[0].user
    holds, may_go = threading.Event(), threading.Event()
    real_lock = memory_flush.lock_context_writes

    def pausing(cursor, *, user_id):
        real_lock(cursor, user_id=user_id)
        holds.set()  # the user row FOR KEY SHARE and the context-write lock held, no message row yet
        may_go.wait(20)

    monkeypatch.setattr(memory_flush, "lock_context_writes", pausing)
    unit = np.full(EMBEDDING_DIM, EMBEDDING_DIM**-0.5, dtype=np.float32)
    monkeypatch.setattr(memory_flush, "_embed_claimed", lambda user_id, claimed: np.stack([unit] * len(claimed)))
    results = {}

    def run(name, work):
        try:
            results[name] = work()
        except BaseException as exc:
            results[name] = exc
        finally:
            connection.close()

    flusher = threading.Thread(target=run, args=("flush", lambda: flush_pending(user_id=alice.pk)))
    flusher.start()
    assert holds.wait(10)
    delete = lambda: staff_client.post(f"/admin/memory/tenant/{tenant.pk}/delete/", {"post": "yes"}).status_code  # noqa: E731
    deleter = threading.Thread(target=run, args=("delete", delete))
    deleter.start()
    waited = a_backend_waits_for_a_lock()
    may_go.set()
    flusher.join(30)
    deleter.join(30)

    assert waited  # the delete waited for the flush's write
    assert results == {"flush": 3, "delete": 302}
    assert not Tenant.objects.filter(pk=tenant.pk).exists()
    assert not Message.objects.exists() and not User.objects.exists()

