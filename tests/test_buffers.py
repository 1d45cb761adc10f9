"""Write-behind buffers: triggers, the priority queue, retries, idempotent flushes, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from benchmarks.server import free_loopback_port, uvicorn_command
from buffers import recovery
from buffers import services as buffers
from buffers.models import FlushJob, FlushTurn, Priority, Reason, State
from buffers.workers import FlushWorkerPool
from memory import selectors
from memory.indexing import flush
from memory.indexing.flush import flush_pending
from memory.inference import registry
from memory.models import Message, User
from memory.retrieval import MemoryQuery, store
from memory.services.messages import MessageIn, messages_add, messages_update
from memory.services.sessions import session_create
from memory.services.users import user_create
from tests.envelopes import assert_error, assert_success
from tests.subprocesses import subprocess_env


def add(session, n: int, text: str = "message") -> list[Message]:
    return messages_add(
        session=session, messages=[MessageIn(role="user" if i % 2 == 0 else "assistant", content=f"{text} {i}") for i in range(n)]
    )


# --- triggers ------------------------------------------------------------------------------------


def test_add_below_size_threshold_queues_no_flush(alice_session):
    """Fewer pending messages than FLUSH_SIZE_MESSAGES: stored, pending, and no job queued."""
    add(alice_session, settings.BUFFERS["SIZE_MESSAGES"] - 1)

    assert Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).count() == settings.BUFFERS["SIZE_MESSAGES"] - 1
    assert not FlushJob.objects.exists()


def test_size_trigger_queues_one_normal_flush(alice_session):
    """Passing the size threshold queues one normal-priority 'size' job; more adds do not add jobs."""
    add(alice_session, settings.BUFFERS["SIZE_MESSAGES"])
    add(alice_session, 3)

    [job] = FlushJob.objects.all()
    assert (job.user_id, job.priority, job.reason, job.state) == (alice_session.user_id, Priority.NORMAL, Reason.SIZE, State.QUEUED)


def test_token_size_trigger(alice_session):
    """A few long messages pass the token threshold (characters / 4) and queue a flush."""
    long_text = "word " * (settings.BUFFERS["SIZE_TOKENS"] * 4 // 5 + 1)
    messages_add(session=alice_session, messages=[MessageIn(role="user", content=long_text)])

    assert FlushJob.objects.get().reason == Reason.SIZE


def test_time_trigger_flushes_old_pending_messages_at_low_priority(alice_session, bob_session):
    """recover() queues a low 'time' job for a user whose oldest pending change is older than the interval."""
    add(alice_session, 2)
    add(bob_session, 2)
    old = timezone.now() - timedelta(seconds=settings.BUFFERS["INTERVAL_SECONDS"] + 1)
    Message.objects.filter(user=alice_session.user).update(updated_at=old)

    assert recovery.recover() == 1

    [job] = FlushJob.objects.all()
    assert (job.user_id, job.priority, job.reason) == (alice_session.user_id, Priority.LOW, Reason.TIME)


def test_manual_flush_endpoints_queue_high_priority_jobs(api, alice_session):
    """POST users/{id}/flush and sessions/{id}/flush answer 202 and queue high-priority manual jobs."""
    add(alice_session, 2)

    user_job = assert_success(api.post(f"/api/v1/users/{alice_session.user_id}/flush", {}, format="json"), 202)
    session_job = assert_success(api.post(f"/api/v1/sessions/{alice_session.pk}/flush"), 202)

    jobs = {job.pk: job for job in FlushJob.objects.all()}
    assert jobs[user_job["job_id"]].session_id is None
    assert jobs[session_job["job_id"]].session_id == alice_session.pk
    assert {(j.priority, j.reason) for j in jobs.values()} == {(Priority.HIGH, Reason.MANUAL)}


def test_manual_flush_upgrades_a_waiting_size_job(alice_session):
    """A manual request while a size job waits raises that job to high priority instead of adding one."""
    add(alice_session, settings.BUFFERS["SIZE_MESSAGES"])
    with transaction.atomic():
        buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)

    [job] = FlushJob.objects.all()
    assert (job.priority, job.reason) == (Priority.HIGH, Reason.MANUAL)


def test_flush_endpoint_rejects_bad_input(api, alice_session):
    """Unknown ids (flush, buffer) answer 404 and a non-boolean 'wait' 400 naming it; no job is queued."""
    response = api.post("/api/v1/users/00000000-0000-0000-0000-000000000000/flush", {}, format="json")
    assert response.status_code == 404
    response = api.get("/api/v1/users/not-a-uuid/buffer")
    assert response.status_code == 404 and response.json()["errors"][0]["field"] == "user_id"
    response = api.post(f"/api/v1/sessions/{alice_session.pk}/flush", {"wait": "soon"}, format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "wait"
    assert not FlushJob.objects.exists()


def test_buffer_endpoint_reports_pending_messages(api, alice_session):
    """GET users/{id}/buffer counts the user's pending messages, and zero after a flush."""
    add(alice_session, 3)
    assert assert_success(api.get(f"/api/v1/users/{alice_session.user_id}/buffer"))["pending_messages"] == 3

    flush_pending(user_id=alice_session.user_id)
    assert assert_success(api.get(f"/api/v1/users/{alice_session.user_id}/buffer"))["pending_messages"] == 0


# --- the queue -----------------------------------------------------------------------------------


def test_jobs_of_one_tenant_run_by_priority_then_fifo(alice, bob, agent, settings):
    """Within a tenant, claim_next_job takes critical > high > normal > low, and the oldest first within a priority."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_RUNNING_PER_TENANT": 0}  # every job claimed, none run
    sessions = [session_create(user=user, agent=agent) for user in (alice, bob, alice, bob, bob, bob)]
    priorities = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.LOW, Priority.CRITICAL, Priority.HIGH]
    created = []
    for priority, session in zip(priorities, sessions):
        with transaction.atomic():
            created.append(
                (priority, buffers.request_flush(user_id=session.user_id, session_id=session.pk, priority=priority, reason=Reason.MANUAL))
            )

    taken = []
    while job := buffers.claim_next_job(worker="test"):
        taken.append(job.pk)
    expected = [job_id for _, job_id in sorted(created, key=lambda item: item[0])]  # stable: FIFO within a priority
    assert taken == expected


def queue_session_flushes(user, agent, priorities: list[int]) -> list[int]:
    """A manual flush job per priority, each of a new session of ``user``; their ids, in order."""
    ids = []
    for priority in priorities:
        session = session_create(user=user, agent=agent)
        with transaction.atomic():
            ids.append(buffers.request_flush(user_id=user.pk, session_id=session.pk, priority=priority, reason=Reason.MANUAL))
    return ids


def test_claims_take_turns_over_tenants(alice, bob, agent, globex_alice, globex_agent, settings):
    """Acme's four queued high jobs do not all run before globex's later low ones: claims alternate
    between the tenants (the one served least recently first), then acme's rest."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_RUNNING_PER_TENANT": 0}
    acme = queue_session_flushes(alice, agent, [Priority.HIGH] * 2) + queue_session_flushes(bob, agent, [Priority.HIGH] * 2)
    globex = queue_session_flushes(globex_alice, globex_agent, [Priority.LOW] * 2)

    taken = []
    while job := buffers.claim_next_job(worker="test"):
        taken.append(job.pk)

    assert taken == [acme[0], globex[0], acme[1], globex[1], acme[2], acme[3]]
    assert set(FlushTurn.objects.values_list("tenant_id", flat=True)) == {alice.tenant_id, globex_alice.tenant_id}


def test_critical_jobs_go_before_every_tenants_turn(alice, agent, globex_alice, globex_agent, settings):
    """A critical job (the shutdown drain) is claimed first even when its tenant was served last."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_RUNNING_PER_TENANT": 0}
    [globex_low] = queue_session_flushes(globex_alice, globex_agent, [Priority.LOW])
    [acme_high, acme_critical] = queue_session_flushes(alice, agent, [Priority.HIGH, Priority.CRITICAL])

    taken = [buffers.claim_next_job(worker="test").pk for _ in range(3)]

    assert taken == [acme_critical, globex_low, acme_high]


def test_a_process_runs_at_most_its_bound_of_one_tenants_jobs(alice, agent, globex_alice, globex_agent, settings):
    """FLUSH_MAX_RUNNING_PER_TENANT: past it, a process's claims skip that tenant (another
    tenant's jobs still go; another process may take the tenant's), until one of its jobs ends."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_RUNNING_PER_TENANT": 2}
    acme = queue_session_flushes(alice, agent, [Priority.HIGH] * 4)
    [globex] = queue_session_flushes(globex_alice, globex_agent, [Priority.LOW])

    taken = [job.pk for _ in range(4) if (job := buffers.claim_next_job(worker="p/0", process="p"))]
    elsewhere = buffers.claim_next_job(worker="q/0", process="q")
    FlushJob.objects.filter(pk=acme[0]).update(state=State.DONE)
    after_one_ended = buffers.claim_next_job(worker="p/0", process="p")

    assert taken == [acme[0], globex, acme[1]]
    assert elsewhere.pk == acme[2]
    assert after_one_ended.pk == acme[3]


@pytest.mark.parametrize("workers, bound", [(None, 2), ("1", 1)], ids=["default", "one-worker"])
def test_by_default_a_process_runs_two_flush_jobs_of_one_tenant_at_most(workers, bound):
    """FLUSH_MAX_RUNNING_PER_TENANT defaults to two (no more than FLUSH_WORKERS): enough to keep
    the background model busy, no more concurrent writes of one tenant than that."""
    extra = {"FLUSH_WORKERS": workers} if workers else {}
    env = subprocess_env(DJANGO_SETTINGS_MODULE="memfuse_project.settings", SECRET_KEY="s3cret-" * 8, **extra)
    for name in ("FLUSH_MAX_RUNNING_PER_TENANT", *(() if workers else ("FLUSH_WORKERS",))):
        env.pop(name, None)
    code = "import django; django.setup(); from django.conf import settings; print(settings.BUFFERS['MAX_RUNNING_PER_TENANT'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120)

    assert done.stdout.split()[-1:] == [str(bound)], done.stderr[-2000:]


def job_row_version(job_id: int) -> tuple[str, str, str]:
    """``(ctid, xmin, xmax)`` of the job's row: a new version, or a row lock, changes them."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT ctid::text, xmin::text, xmax::text FROM buffers_flushjob WHERE id = %s", [job_id])
        return cursor.fetchone()


def test_repeated_session_flush_requests_merge_into_one_waiting_job(api, alice_session):
    """POST sessions/{id}/flush twice: one waiting job, whose id both answers carry; a request of
    a higher priority raises it, one asking no more leaves its row as it was (no new version, no
    lock). Another session's request is a job of its own."""
    other = session_create(user=alice_session.user, agent=alice_session.agent)
    with transaction.atomic():
        queued = buffers.request_flush(
            user_id=alice_session.user_id, session_id=alice_session.pk, priority=Priority.LOW, reason=Reason.TIME
        )

    first = assert_success(api.post(f"/api/v1/sessions/{alice_session.pk}/flush"), 202)
    raised = job_row_version(queued)
    second = assert_success(api.post(f"/api/v1/sessions/{alice_session.pk}/flush"), 202)
    elsewhere = assert_success(api.post(f"/api/v1/sessions/{other.pk}/flush"), 202)

    assert first["job_id"] == second["job_id"] == queued != elsewhere["job_id"]
    assert job_row_version(queued) == raised
    job = FlushJob.objects.get(pk=queued)
    assert (job.priority, job.reason, job.state) == (Priority.HIGH, Reason.MANUAL, State.QUEUED)
    assert FlushJob.objects.filter(session=alice_session).count() == 1
    assert job.tenant_id == alice_session.user.tenant_id


def test_failing_store_is_retried_then_failed_then_retried_by_hand(alice_session, monkeypatch):
    """A flush whose store fails retries with growing backoff, ends 'failed', and an operator retry succeeds."""
    add(alice_session, 3)
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)

    def broken_write(**kwargs):
        raise ConnectionError("store unavailable")

    monkeypatch.setattr(flush, "_write", broken_write)
    delays = []
    for attempt in range(1, settings.BUFFERS["MAX_ATTEMPTS"] + 1):
        FlushJob.objects.filter(pk=job_id).update(next_attempt_at=timezone.now())  # skip the wait
        job = buffers.claim_next_job(worker="test")
        assert job.pk == job_id and job.attempts == attempt
        before = timezone.now()
        buffers.run_job(job)
        job.refresh_from_db()
        assert "store unavailable" in job.last_error
        if attempt < settings.BUFFERS["MAX_ATTEMPTS"]:
            assert job.state == State.RETRYING
            delays.append((job.next_attempt_at - before).total_seconds())
    assert job.state == State.FAILED
    assert delays == sorted(delays) and delays[-1] > delays[0]  # exponential backoff
    assert Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).count() == 3

    monkeypatch.undo()
    job = buffers.job_retry(job=job)
    assert (job.state, job.attempts) == (State.QUEUED, 0)
    buffers.run_job(buffers.claim_next_job(worker="test"))

    job.refresh_from_db()
    assert (job.state, job.messages_flushed) == (State.DONE, 3)
    assert not Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).exists()


def test_flush_times_out_between_batches(alice_session):
    """A flush past its deadline raises FlushTimeout and leaves the rest pending."""
    add(alice_session, 6)

    with pytest.raises(flush.FlushTimeout):
        flush_pending(user_id=alice_session.user_id, deadline=time.monotonic() - 1, batch_size=2)
    assert Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).count() == 6


def test_a_job_gives_up_its_worker_after_its_time_slice_and_waits_again(alice_session, settings):
    """Past FLUSH_SLICE_SECONDS a flush stops after its batch: the job waits again, its attempt
    given back and its count kept, until a run finds nothing left."""
    settings.BUFFERS = {**settings.BUFFERS, "SLICE_SECONDS": 1e-6, "BATCH_SIZE": 2}
    add(alice_session, 5)
    with transaction.atomic():
        buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)

    runs = []
    while job := buffers.claim_next_job(worker="test"):
        buffers.run_job(job)
        job.refresh_from_db()
        runs.append((job.state, job.attempts, job.messages_flushed))

    assert runs == [(State.QUEUED, 0, 2), (State.QUEUED, 0, 4), (State.DONE, 1, 5)]
    assert not Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).exists()


def test_a_sliced_job_folds_into_the_waiting_one_and_a_wait_follows_it(alice_session, settings):
    """When a job of the same scope was queued while it ran, a job at the end of its slice is done,
    superseded by that one (raised to its priority), and wait_for_job answers with the job that
    finished the flush."""
    settings.BUFFERS = {**settings.BUFFERS, "SLICE_SECONDS": 1e-6, "BATCH_SIZE": 2}
    add(alice_session, 5)
    with transaction.atomic():
        first = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    running = buffers.claim_next_job(worker="test")
    with transaction.atomic():
        later = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.LOW, reason=Reason.TIME)

    buffers.run_job(running)
    folded, waiting = FlushJob.objects.get(pk=first), FlushJob.objects.get(pk=later)
    while job := buffers.claim_next_job(worker="test"):
        buffers.run_job(job)
    answer = buffers.wait_for_job(job_id=first, timeout=5)

    assert (folded.state, folded.superseded_by, folded.messages_flushed) == (State.DONE, later, 2)
    assert (waiting.state, waiting.priority) == (State.QUEUED, Priority.HIGH)
    assert (answer.pk, answer.state, answer.messages_flushed) == (later, State.DONE, 3)


def test_a_late_failure_leaves_the_job_to_the_run_that_holds_it_now(alice_session, monkeypatch):
    """A flush that fails after its job was released (its process taken for dead) and claimed by
    another worker changes nothing of that job; nor does a late release of the first claim."""
    add(alice_session, 3)
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    first = buffers.claim_next_job(worker="dead/0", process="dead")
    taken_over = []

    def write_after_a_takeover(**kwargs):
        # What another process's heartbeat does to a silent process's job, then its worker.
        buffers.job_lost(FlushJob.objects.get(pk=job_id), error="worker process dead died")
        taken_over.append(buffers.claim_next_job(worker="alive/0", process="alive"))
        raise ConnectionError("late failure")

    monkeypatch.setattr(flush, "_write", write_after_a_takeover)
    buffers.run_job(first)
    monkeypatch.undo()
    buffers.job_lost(first, error="released again, late")

    job = FlushJob.objects.get(pk=job_id)
    assert (job.state, job.worker, job.claim_token, job.attempts) == (State.RUNNING, "alive/0", taken_over[0].claim_token, 2)
    assert job.last_error == "worker process dead died"


def test_finished_jobs_are_purged_after_their_retention(alice_session, settings):
    """purge_finished_jobs deletes done jobs past FLUSH_DONE_RETENTION_SECONDS and failed ones past
    FLUSH_FAILED_RETENTION_SECONDS, a batch at a time; newer and unfinished ones stay, and the
    turns of tenants not served for the first."""
    settings.BUFFERS = {**settings.BUFFERS, "DONE_RETENTION_SECONDS": 60, "FAILED_RETENTION_SECONDS": 3600}
    now = timezone.now()

    def job(state: str, age_seconds: float | None) -> int:
        finished = now - timedelta(seconds=age_seconds) if age_seconds is not None else None
        return FlushJob.objects.create(user_id=alice_session.user_id, reason=Reason.MANUAL, state=state, finished_at=finished).pk

    for _ in range(3):
        job(State.DONE, 120)
    kept = {job(State.DONE, 30), job(State.FAILED, 120), job(State.RUNNING, None)}
    job(State.FAILED, 7200)
    FlushTurn.objects.create(tenant_id=alice_session.user.tenant_id, claimed_at=now - timedelta(seconds=120))

    purged = [recovery.purge_finished_jobs(batch=2), recovery.purge_finished_jobs(), recovery.purge_finished_jobs()]

    assert purged == [2, 2, 0]
    assert set(FlushJob.objects.values_list("pk", flat=True)) == kept
    assert not FlushTurn.objects.exists()


# --- waiting for a flush ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_waiting_flush_holds_no_database_connection(alice_session, monkeypatch):
    """Each time wait_for_job sleeps between polls, its thread has given its connection back to the pool."""
    from runtime.pool import pool_stats

    assert pool_stats()["enabled"]
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
    connection.close()  # this thread's connection back to the pool: only the waiter's may be in use
    real_sleep, in_use = time.sleep, []

    def sleep(seconds):
        if threading.current_thread() is waiter:
            in_use.append(pool_stats()["in_use"])
        real_sleep(seconds)

    def wait():
        try:
            buffers.wait_for_job(job_id=job_id, timeout=30)
        finally:
            connection.close()

    monkeypatch.setattr(time, "sleep", sleep)
    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        _wait_for(lambda: len(in_use) >= 3, 10, "three polls")
    finally:
        FlushJob.objects.filter(pk=job_id).update(state=State.DONE, finished_at=timezone.now())
        waiter.join(timeout=10)
        connection.close()

    assert in_use[:3] == [0, 0, 0]


@pytest.mark.django_db(transaction=True)
def test_waits_past_the_tenants_bound_answer_429_and_other_tenants_still_wait(
    api, globex_api, alice_session, globex_session, settings
):
    """With FLUSH_WAIT_MAX_PER_TENANT waits of acme in progress, acme's next {"wait": true} is a 429
    with Retry-After at once, nothing queued; globex's request still waits (here until the flush timeout)."""
    settings.BUFFERS = {**settings.BUFFERS, "WAIT_MAX_PER_TENANT": 1, "TIMEOUT_SECONDS": 0.3}
    tenant_id = alice_session.user.tenant_id
    with transaction.atomic():
        job_id = buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)

    def wait():
        try:
            with buffers.wait_place(tenant_id=tenant_id):
                buffers.wait_for_job(job_id=job_id, timeout=30)
        finally:
            connection.close()

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        _wait_for(lambda: buffers._waits[tenant_id] == 1, 10, "the first wait")
        started = time.monotonic()
        refused = api.post(f"/api/v1/sessions/{alice_session.pk}/flush", {"wait": True}, format="json")
        refused_after = time.monotonic() - started
        waited = globex_api.post(f"/api/v1/sessions/{globex_session.pk}/flush", {"wait": True}, format="json")
    finally:
        FlushJob.objects.filter(pk=job_id).update(state=State.DONE, finished_at=timezone.now())
        waiter.join(timeout=10)

    assert "FLUSH_WAIT_MAX_PER_TENANT" in assert_error(refused, 429, None)["message"]
    assert int(refused["Retry-After"]) >= 1
    assert refused_after < 0.3
    assert not FlushJob.objects.filter(session_id=alice_session.pk).exists()
    assert assert_success(waited, 200)["state"] == State.QUEUED  # waited for, and nothing ran it


# --- idempotence -------------------------------------------------------------------------------


class CountingEmbedder:
    """Wraps registry.embed, counting every text it is asked to embed; slow enough to overlap."""

    def __init__(self, real):
        self.real = real
        self.texts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, texts, **kwargs):
        with self.lock:
            self.texts.extend(texts)
        time.sleep(0.05)
        return self.real(texts, **kwargs)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_flushes_embed_each_message_once(alice_session, monkeypatch):
    """Two flushes of the same user at once claim disjoint rows: every message embedded and written once."""
    rows = add(alice_session, 40, text="concurrent")
    counting = CountingEmbedder(registry.embed)
    monkeypatch.setattr(registry, "embed", counting)
    barrier = threading.Barrier(2)
    flushed = []

    def flush():
        barrier.wait()
        try:
            flushed.append(flush_pending(user_id=alice_session.user_id, batch_size=4))
        finally:
            connection.close()

    threads = [threading.Thread(target=flush) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(flushed) == 40 and min(flushed) > 0  # both took part
    # No text embedded twice (the newest few may come from the add's prefetch, not embedded here).
    assert len(counting.texts) == len(set(counting.texts)) and set(counting.texts) <= {m.index_text for m in rows}
    assert len(counting.texts) >= 40 - settings.MEMFUSE["PENDING_EMBED_MAX"]
    assert set(Message.objects.filter(user=alice_session.user).values_list("flush_count", flat=True)) == {1}


def test_update_during_flush_is_not_overwritten(alice_session, monkeypatch):
    """A message edited after a flush claimed it is re-claimed: only the edited text's embedding is written."""
    import numpy as np

    monkeypatch.setattr("memory.services.messages._start_embeddings", lambda rows: None)  # the flush embeds, and is overtaken
    [message] = add(alice_session, 1, text="original")
    real_embed = registry.embed
    edits = []

    def embed_then_edit(texts, **kwargs):
        vectors = real_embed(texts, **kwargs)
        if not edits:  # the first batch is overtaken by an edit
            edits.append(texts)
            messages_update(session=alice_session, message_ids=[message.pk], new_messages=[MessageIn(role="user", content="edited")])
        return vectors

    monkeypatch.setattr(registry, "embed", embed_then_edit)
    assert flush_pending(user_id=alice_session.user_id) == 1
    monkeypatch.undo()

    message.refresh_from_db()
    assert edits == [["original 0"]]
    assert (message.content, message.flush_count) == ("edited", 1)
    assert np.allclose(message.embedding, registry.embed_documents(["edited"])[0], atol=1e-5)


# --- read your writes ------------------------------------------------------------------------------


def test_query_right_after_add_finds_the_message_with_its_flushed_score(alice_session):
    """A message is found before its flush, with the vector similarity it has after the flush:
    the query model embeds it on demand as the flush does (DOCUMENT_EMBEDDING_INT8)."""
    add(alice_session, 4, text="filler")
    [kayak] = messages_add(
        session=alice_session, messages=[MessageIn(role="user", content="I bought a red kayak for the lake.")]
    )
    alice = alice_session.user
    alice.refresh_from_db()

    before = selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=3))
    flush_pending(user_id=alice.pk)
    alice.refresh_from_db()
    after = selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=3))

    assert before[0]["id"] == after[0]["id"] == str(kayak.pk)
    assert before[0]["metadata"]["flushed"] is False and after[0]["metadata"]["flushed"] is True
    assert before[0]["metadata"]["retrievers"]["vector"]["score"] == pytest.approx(
        after[0]["metadata"]["retrievers"]["vector"]["score"], abs=1e-5
    )


# --- the flush of a backlog ---------------------------------------------------------------------


def _recording_writes(monkeypatch, record) -> list:
    """Patch the flush's write so that ``record()`` is called, and kept, before each batch is written."""
    seen = []
    real_write = flush._write

    def write(**kwargs):
        seen.append(record())
        return real_write(**kwargs)

    monkeypatch.setattr(flush, "_write", write)
    return seen


def test_a_flush_claims_the_messages_of_an_add_in_their_order(alice_session):
    """The messages of one add share their time of change: a flush claims them in their order,
    so a batch holds consecutive turns and a turn's context embedding is written about once,
    not again each time one of its neighbours is flushed in another batch."""
    add(alice_session, 100)

    claimed = flush._claim(user_id=alice_session.user_id, session_id=None, token=uuid.uuid4(), limit=10)

    positions = Message.objects.filter(pk__in=[row[0] for row in claimed]).values_list("position", flat=True)
    assert sorted(positions) == list(range(10))


def test_a_backlog_past_ann_min_messages_moves_to_the_hnsw_index_while_it_is_flushed(alice_session, monkeypatch):
    """A user whose backlog takes them past ``ANN_MIN_MESSAGES`` moves to the HNSW index after the
    flush's first batch, not once every batch is written: the queries of the user meanwhile go
    through the index rather than scan their rows, and the rest of the backlog goes in as it is flushed."""
    monkeypatch.setitem(settings.MEMFUSE, "ANN_MIN_MESSAGES", 50)
    add(alice_session, 120)
    buckets = _recording_writes(monkeypatch, lambda: User.objects.values_list("ann_bucket", flat=True).get(pk=alice_session.user_id))

    flush_pending(user_id=alice_session.user_id, batch_size=32)

    assert buckets[0] is None and buckets[-1] is not None
    assert set(Message.objects.filter(user=alice_session.user).values_list("ann_bucket", flat=True)) == {buckets[-1]}


def test_the_flush_of_a_backlog_brings_the_snapshot_up_to_date_before_its_last_batch(alice_session, monkeypatch):
    """Before writing the last batch of a backlog (with it the user's pending messages reach 0),
    a flush writes the user's index snapshot when it lags by ``SNAPSHOT_MIN_CHANGES``, even
    where a tenth of the user's documents is more: the user's first query then loads a snapshot
    that holds every message, in any process."""
    monkeypatch.setitem(settings.MEMFUSE, "SNAPSHOT_MIN_CHANGES", 8)
    add(alice_session, 200)
    flush_pending(user_id=alice_session.user_id)
    add(alice_session, 15)  # fewer than a tenth of the 200 documents, more than SNAPSHOT_MIN_CHANGES
    lags = _recording_writes(monkeypatch, lambda: store.snapshot_lag(alice_session.user_id))

    flush_pending(user_id=alice_session.user_id, batch_size=4)

    assert [changes for _, _, changes in lags] == [15, 15, 15, 0]


@pytest.mark.django_db(transaction=True)
def test_the_flush_of_a_backlog_leaves_the_planner_statistics_of_messages_current(alice_session):
    """Once ``memory_message``'s statistics are stale by autovacuum's rule (a table analyzed
    nearly empty, then a backlog), the backlog's flush ANALYZEs it: the planner knows the
    table's rows at once, not after autovacuum's next round."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE memory_message SET (autovacuum_enabled = off)")  # no ANALYZE but the flush's
        try:
            cursor.execute("ANALYZE memory_message")
            cursor.execute("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'memory_message'")
            (analyzed,) = cursor.fetchone()
            add(alice_session, 120)
            cursor.execute("SELECT pg_stat_force_next_flush()")  # this connection's counts, shared at once

            flush_pending(user_id=alice_session.user_id, batch_size=32)

            cursor.execute(
                "SELECT c.reltuples, s.last_analyze FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
                "WHERE c.relname = 'memory_message'"
            )
            reltuples, last_analyze = cursor.fetchone()
        finally:
            cursor.execute("ALTER TABLE memory_message RESET (autovacuum_enabled)")
    assert reltuples == 120 and last_analyze > analyzed


# --- workers -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_pool_flushes_in_background_and_drains_at_shutdown(alice_session, bob_session):
    """A running pool flushes queued work; drain() flushes everything still pending before stopping."""
    pool = FlushWorkerPool(workers=2, poll_seconds=0.1)
    pool.start()
    try:
        add(alice_session, settings.BUFFERS["SIZE_MESSAGES"])  # size trigger wakes the pool
        deadline = time.monotonic() + 30
        while Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).exists():
            assert time.monotonic() < deadline, "the size-triggered flush never ran"
            time.sleep(0.05)
        add(bob_session, 3)  # below every trigger: only the shutdown drain flushes it
        assert pool.drain(deadline_seconds=30) == 0
    finally:
        pool.stop()
    assert not Message.objects.filter(flushed_at__isnull=True).exists()
    assert FlushJob.objects.filter(reason=Reason.SHUTDOWN, priority=Priority.CRITICAL, state=State.DONE).exists()


@pytest.mark.django_db(transaction=True)
def test_one_tenants_flood_of_flushes_does_not_hold_back_anothers(tenant, agent, globex_session, monkeypatch, settings):
    """Acme's twenty-four users' flushes queued first, and a slow model: globex's messages,
    added after them, are flushed by a running pool while at least half of acme's still wait."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_RUNNING_PER_TENANT": 1}
    monkeypatch.setattr("memory.services.messages._start_embeddings", lambda rows: None)  # every text goes through the flush's model
    real_embed = registry.embed

    def slow_embed(texts, **kwargs):
        time.sleep(0.3)
        return real_embed(texts, **kwargs)

    monkeypatch.setattr(registry, "embed", slow_embed)
    acme = [user_create(tenant_id=tenant.pk, name=f"user {i}") for i in range(24)]
    for user in acme:
        add(session_create(user=user, agent=agent), settings.BUFFERS["SIZE_MESSAGES"])
    pool = FlushWorkerPool(workers=2, poll_seconds=0.1)
    pool.start()
    try:
        add(globex_session, settings.BUFFERS["SIZE_MESSAGES"])
        _wait_for(lambda: not Message.objects.filter(session=globex_session, flushed_at__isnull=True).exists(), 60, "globex's flush")
        acme_waiting = Message.objects.filter(user__in=acme, flushed_at__isnull=True).values("user").distinct().count()
    finally:
        pool.stop()
        for thread in pool._threads:
            thread.join(timeout=30)

    assert acme_waiting >= 12


def _start_worker(env: dict, log_path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "runworker", settings.BUFFERS["CHANNEL"]],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_flush_loses_and_duplicates_nothing(alice_session, tmp_path):
    """SIGKILL of a worker in the middle of a flush, then a restart: every message embedded exactly once."""
    total = 300
    for start in range(0, total, 100):
        add(alice_session, 100, text=f"kill test {start}")
    pending = Message.objects.filter(user=alice_session.user, flushed_at__isnull=True)
    env = subprocess_env(
        FLUSH_BATCH_SIZE="8", FLUSH_LEASE_SECONDS="2", FLUSH_TIMEOUT_SECONDS="5", FLUSH_TICK_SECONDS="0.2", FLUSH_WORKERS="1"
    )

    worker = _start_worker(env, tmp_path / "worker.log")
    try:
        _wait_for(lambda: pending.count() < total - 16, 90, "the first batches to be flushed")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    left = pending.count()
    assert 0 < left < total, (left, (tmp_path / "worker.log").read_text()[-2000:])

    worker = _start_worker(env, tmp_path / "worker.log")
    try:
        _wait_for(lambda: not pending.exists(), 120, "the restarted worker to flush the rest")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    counts = list(Message.objects.filter(user=alice_session.user).values_list("flush_count", flat=True))
    assert len(counts) == total and set(counts) == {1}
    assert not Message.objects.filter(user=alice_session.user, embedding__isnull=True).exists()


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_runworker_stopped_by_sigterm_drains_and_stops_its_inference_process(alice_session, tmp_path):
    """SIGTERM to a runworker: it flushes what is pending, exits 0, and leaves no inference
    process behind; a second SIGTERM during the drain is not needed for it to end."""
    import psutil

    env = subprocess_env(FLUSH_INTERVAL_SECONDS="600", FLUSH_TICK_SECONDS="60", FLUSH_WORKERS="1")
    log = tmp_path / "worker.log"
    worker = _start_worker(env, log)
    try:
        _wait_for(lambda: b"background embedding process" in log.read_bytes(), 90, "the worker's model")
        children = psutil.Process(worker.pid).children(recursive=True)
        # multiprocessing's forkserver and the inference process it forked (same command line)
        assert sum("multiprocessing.forkserver" in " ".join(child.cmdline()) for child in children) >= 2, children
        time.sleep(1.0)  # its first tick flushes whatever is pending at start (recovery)
        add(alice_session, 3)  # below every trigger: only the shutdown drain flushes them
        assert Message.objects.filter(flushed_at__isnull=True).count() == 3
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=settings.BUFFERS["SHUTDOWN_SECONDS"] + 20) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()

    assert not Message.objects.filter(flushed_at__isnull=True).exists(), log.read_text()[-3000:]
    assert b"every pending message flushed" in log.read_bytes()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [child.cmdline() for child in alive]


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_uvicorn_drains_pending_messages_when_stopped(alice_session, tmp_path):
    """uvicorn (the README's production command) stopped by SIGTERM flushes what is pending first (ASGI lifespan)."""
    env = subprocess_env(FLUSH_INTERVAL_SECONDS="600", FLUSH_WORKERS="1")
    log = tmp_path / "uvicorn.log"
    server = subprocess.Popen(
        uvicorn_command(free_loopback_port()),
        cwd=settings.BASE_DIR,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(lambda: b"Application startup complete" in log.read_bytes(), 90, "uvicorn to start")
        time.sleep(1.0)  # its first tick flushes whatever is pending at start (recovery)
        add(alice_session, 3)  # below every trigger: only the shutdown drain flushes them
        time.sleep(0.5)
        assert Message.objects.filter(flushed_at__isnull=True).count() == 3
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    assert not Message.objects.filter(flushed_at__isnull=True).exists(), log.read_text()[-3000:]
    assert b"every pending message flushed" in log.read_bytes()


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_flush_request_reaches_a_runworker_over_redis(alice_session, tmp_path, settings):
    """With the Redis channel layer, a manual flush request wakes a runworker process at once."""
    from channels.layers import channel_layers

    prefix = f"memfuse-test-{os.getpid()}"
    redis = {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:6379"], "prefix": prefix}}
    settings.CHANNEL_LAYERS = {"default": redis}
    channel_layers.backends.clear()
    # The worker polls its queue only every 60 s: a prompt flush proves the channel message woke it.
    env = subprocess_env(REDIS_URL="redis://127.0.0.1:6379", FLUSH_TICK_SECONDS="60", CHANNEL_LAYER_PREFIX=prefix)
    log = tmp_path / "worker.log"
    worker = _start_worker(env, log)
    try:
        _wait_for(lambda: log.exists() and b"flush worker pool started" in log.read_bytes(), 90, "the worker to start")
        time.sleep(0.5)  # let its first (recovery) tick pass: nothing is pending yet
        add(alice_session, 2)
        with transaction.atomic():
            buffers.request_flush(user_id=alice_session.user_id, priority=Priority.HIGH, reason=Reason.MANUAL)
        _wait_for(lambda: not Message.objects.filter(flushed_at__isnull=True).exists(), 20, "the woken worker to flush")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        channel_layers.backends.clear()
