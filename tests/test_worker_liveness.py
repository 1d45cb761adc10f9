"""Dead flush workers: a process that stops beating has its jobs and claims released within seconds,
not at the end of the lease; a live one, and one that is merely waiting out a database restart, keeps them."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from buffers import heartbeats
from buffers import services as buffers
from buffers.models import FlushJob, Priority, Reason, State, WorkerProcess
from buffers.workers import FlushWorkerPool
from memory import flush
from memory.models import Message
from memory.services.messages import MessageIn, messages_add
from tests.subprocesses import subprocess_env
from tests.test_buffers import _start_worker, _wait_for


def claim_for(process: str, session, n: int) -> FlushJob:
    """A running job of ``process`` whose flush has claimed ``n`` of ``session``'s pending messages."""
    messages_add(session=session, messages=[MessageIn(role="user", content=f"claimed {i}") for i in range(n)])
    FlushJob.objects.create(user_id=session.user_id, priority=Priority.NORMAL, reason=Reason.MANUAL, max_attempts=4)
    job = buffers.claim_next_job(worker=f"{process}/0", process=process)
    flush._claim(user_id=session.user_id, session_id=None, token=job.claim_token, limit=n)
    return job


def claimed(session) -> int:
    return Message.objects.filter(session=session, flush_claim__isnull=False).count()


def test_a_silent_process_loses_its_jobs_and_claims_and_a_beating_one_keeps_them(db, alice_session, bob_session, settings):
    """release_dead_processes frees the claims and requeues the jobs of a process past the heartbeat timeout only."""
    settings.BUFFERS = {**settings.BUFFERS, "HEARTBEAT_TIMEOUT_SECONDS": 0.5}
    for name in ("dead", "alive"):
        heartbeats.beat(name=name)
    WorkerProcess.objects.filter(name="dead").update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    dead_job, live_job = claim_for("dead", alice_session, 3), claim_for("alive", bob_session, 2)

    assert heartbeats.release_dead_processes() == ["dead"]

    assert (claimed(alice_session), claimed(bob_session)) == (0, 2)
    dead_job.refresh_from_db()
    assert dead_job.state == State.RETRYING and "dead died" in dead_job.last_error
    assert FlushJob.objects.get(pk=live_job.pk).state == State.RUNNING
    assert list(WorkerProcess.objects.values_list("name", flat=True)) == ["alive"]
    assert heartbeats.release_dead_processes() == []  # once


def test_nobody_is_judged_while_the_database_has_just_started(db, alice_session, settings):
    """A heartbeat older than the timeout is not death while the database itself is younger than it (a restart)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
        uptime = float(cursor.fetchone()[0])
    settings.BUFFERS = {**settings.BUFFERS, "HEARTBEAT_TIMEOUT_SECONDS": uptime + 60}
    heartbeats.beat(name="waiting")
    WorkerProcess.objects.filter(name="waiting").update(heartbeat_at=timezone.now() - timedelta(seconds=uptime + 120))
    claim_for("waiting", alice_session, 2)

    assert heartbeats.release_dead_processes() == []
    assert claimed(alice_session) == 2


def test_a_beat_after_being_taken_for_dead_recreates_the_row(db):
    """beat() says whether it created the process's row: the first time, and after a release, not in between."""
    assert heartbeats.beat(name="p") is True
    assert heartbeats.beat(name="p") is False
    WorkerProcess.objects.filter(name="p").delete()
    assert heartbeats.beat(name="p") is True


def test_orphaned_jobs_of_this_process_are_requeued_and_running_ones_kept(db, alice_session, bob_session, settings):
    """A running job of this process that no worker runs (its outcome was lost with the database) is released."""
    settings.BUFFERS = {**settings.BUFFERS, "HEARTBEAT_TIMEOUT_SECONDS": 0.5}
    orphan, running = claim_for("me", alice_session, 2), claim_for("me", bob_session, 2)
    FlushJob.objects.filter(pk__in=[orphan.pk, running.pk]).update(started_at=timezone.now() - timedelta(seconds=5))

    assert heartbeats.release_orphaned_jobs(name="me", running={running.pk}) == 1

    assert FlushJob.objects.get(pk=orphan.pk).state == State.RETRYING and claimed(alice_session) == 0
    assert FlushJob.objects.get(pk=running.pk).state == State.RUNNING and claimed(bob_session) == 2


@pytest.mark.django_db(transaction=True)
def test_pool_beats_and_forgets_its_row_at_a_graceful_stop(alice_session):
    """A running pool keeps its WorkerProcess row fresh; drain() deletes it once its workers have stopped."""
    pool = FlushWorkerPool(workers=1, poll_seconds=0.1)
    pool.start()
    try:
        _wait_for(lambda: WorkerProcess.objects.filter(name=pool.name).exists(), 10, "the first heartbeat")
        first = WorkerProcess.objects.get(name=pool.name).heartbeat_at
        _wait_for(lambda: WorkerProcess.objects.get(name=pool.name).heartbeat_at > first, 10, "a second heartbeat")
    finally:
        pool.drain(deadline_seconds=10)
    assert not WorkerProcess.objects.filter(name=pool.name).exists()


@pytest.mark.django_db(transaction=True)
def test_claims_of_a_worker_killed_mid_flush_are_released_within_10_s(alice_session, tmp_path):
    """SIGKILL of a runworker mid-flush (default 120 s lease): its claims are free within 10 s, then flushed exactly once."""
    total = 240
    words = " ".join(f"word{i}" for i in range(120))  # long texts: a batch takes a while to embed
    for start in range(0, total, 80):
        messages_add(
            session=alice_session, messages=[MessageIn(role="user", content=f"{start + i} {words}") for i in range(80)]
        )
    env = subprocess_env(FLUSH_BATCH_SIZE="16", FLUSH_WORKERS="1", FLUSH_TICK_SECONDS="0.5", TORCH_THREADS="1", BACKGROUND_EMBEDDING="thread")
    log = tmp_path / "worker.log"
    worker = _start_worker(env, log)
    try:
        # Kill just after a batch is claimed (a claim set not seen at the previous look), once
        # one is written: the worker is then embedding, far from its next write.
        seen: set = set()

        def new_batch_claimed() -> bool:
            nonlocal seen
            now = set(Message.objects.filter(session=alice_session, flush_claim__isnull=False).values_list("pk", flat=True))
            fresh, seen = bool(now - seen), now
            return fresh and Message.objects.filter(session=alice_session, flushed_at__isnull=False).exists()

        _wait_for(new_batch_claimed, 90, "the worker to be in the middle of its flush")
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    job = FlushJob.objects.get(state=State.RUNNING)
    assert job.process and job.lease_until > timezone.now() + timedelta(seconds=60), job.lease_until
    assert claimed(alice_session) > 0, log.read_text()[-2000:]

    # What another process's heartbeat does every FLUSH_TICK_SECONDS (1 s by default).
    while claimed(alice_session):
        assert time.monotonic() - killed_at < 10, "the dead worker's claims were not released within 10 s"
        heartbeats.release_dead_processes()
        time.sleep(0.2)
    released_after = time.monotonic() - killed_at

    # Back in the queue, or folded into the user's flush that already waits (the adds queued
    # one): either way its error names the death.
    job.refresh_from_db()
    assert job.state in (State.RETRYING, State.DONE) and "died" in job.last_error, (job.state, job.last_error)
    assert 4 < released_after < 10  # the heartbeat timeout (5 s), not the 120 s lease
    buffers.flush_pending(user_id=alice_session.user_id)
    counts = list(Message.objects.filter(session=alice_session).values_list("flush_count", flat=True))
    assert len(counts) == total and set(counts) == {1}
