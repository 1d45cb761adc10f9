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
from buffers import services as buffers
from buffers.models import FlushJob, Priority, Reason, State
from buffers.workers import FlushWorkerPool
from memory import flush, selectors, services
from memory.inference import registry
from memory.models import Message, User
from memory.retrieval import store
from memory.services import MessageIn
from tests.envelopes import assert_success
from tests.subprocesses import subprocess_env


def add(session, n: int, text: str = "message") -> list[Message]:
    return services.messages_add(
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
    services.messages_add(session=alice_session, messages=[MessageIn(role="user", content=long_text)])

    assert FlushJob.objects.get().reason == Reason.SIZE


def test_time_trigger_flushes_old_pending_messages_at_low_priority(alice_session, bob_session):
    """recover() queues a low 'time' job for a user whose oldest pending change is older than the interval."""
    add(alice_session, 2)
    add(bob_session, 2)
    old = timezone.now() - timedelta(seconds=settings.BUFFERS["INTERVAL_SECONDS"] + 1)
    Message.objects.filter(user=alice_session.user).update(updated_at=old)

    assert buffers.recover() == 1

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

    buffers.flush_pending(user_id=alice_session.user_id)
    assert assert_success(api.get(f"/api/v1/users/{alice_session.user_id}/buffer"))["pending_messages"] == 0


# --- the queue -----------------------------------------------------------------------------------


def test_jobs_run_by_priority_then_fifo(alice, bob, agent):
    """claim_next_job takes critical > high > normal > low, and the oldest first within a priority."""
    sessions = [services.session_create(user=user, agent=agent) for user in (alice, bob)]
    order = [(Priority.LOW, sessions[0]), (Priority.NORMAL, sessions[1]), (Priority.HIGH, sessions[0]),
             (Priority.LOW, sessions[1]), (Priority.CRITICAL, sessions[1]), (Priority.HIGH, sessions[1])]
    created = []
    for priority, session in order:
        with transaction.atomic():
            created.append(
                (priority, buffers.request_flush(user_id=session.user_id, session_id=session.pk, priority=priority, reason=Reason.MANUAL))
            )

    taken = []
    while job := buffers.claim_next_job(worker="test"):
        taken.append(job.pk)
    expected = [job_id for _, job_id in sorted(created, key=lambda item: item[0])]  # stable: FIFO within a priority
    assert taken == expected


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
        buffers.flush_pending(user_id=alice_session.user_id, deadline=time.monotonic() - 1, batch_size=2)
    assert Message.objects.filter(user=alice_session.user, flushed_at__isnull=True).count() == 6


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
            flushed.append(buffers.flush_pending(user_id=alice_session.user_id, batch_size=4))
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

    monkeypatch.setattr(services, "_start_embeddings", lambda rows: None)  # the flush embeds, and is overtaken
    [message] = add(alice_session, 1, text="original")
    real_embed = registry.embed
    edits = []

    def embed_then_edit(texts, **kwargs):
        vectors = real_embed(texts, **kwargs)
        if not edits:  # the first batch is overtaken by an edit
            edits.append(texts)
            services.messages_update(session=alice_session, message_ids=[message.pk], new_messages=[MessageIn(role="user", content="edited")])
        return vectors

    monkeypatch.setattr(registry, "embed", embed_then_edit)
    assert buffers.flush_pending(user_id=alice_session.user_id) == 1
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
    [kayak] = services.messages_add(
        session=alice_session, messages=[MessageIn(role="user", content="I bought a red kayak for the lake.")]
    )
    alice = alice_session.user
    alice.refresh_from_db()

    before = selectors.memory_query(user=alice, query="What boat did I buy?", top_k=3)
    buffers.flush_pending(user_id=alice.pk)
    alice.refresh_from_db()
    after = selectors.memory_query(user=alice, query="What boat did I buy?", top_k=3)

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

    buffers.flush_pending(user_id=alice_session.user_id, batch_size=32)

    assert buckets[0] is None and buckets[-1] is not None
    assert set(Message.objects.filter(user=alice_session.user).values_list("ann_bucket", flat=True)) == {buckets[-1]}


def test_the_flush_of_a_backlog_brings_the_snapshot_up_to_date_before_its_last_batch(alice_session, monkeypatch):
    """Before writing the last batch of a backlog (with it the user's pending messages reach 0),
    a flush writes the user's index snapshot when it lags by ``SNAPSHOT_MIN_CHANGES``, even
    where a tenth of the user's documents is more: the user's first query then loads a snapshot
    that holds every message, in any process."""
    monkeypatch.setitem(settings.MEMFUSE, "SNAPSHOT_MIN_CHANGES", 8)
    add(alice_session, 200)
    buffers.flush_pending(user_id=alice_session.user_id)
    add(alice_session, 15)  # fewer than a tenth of the 200 documents, more than SNAPSHOT_MIN_CHANGES
    lags = _recording_writes(monkeypatch, lambda: store.snapshot_lag(alice_session.user_id))

    buffers.flush_pending(user_id=alice_session.user_id, batch_size=4)

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

            buffers.flush_pending(user_id=alice_session.user_id, batch_size=32)

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
