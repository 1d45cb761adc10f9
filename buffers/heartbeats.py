"""Liveness of the processes that run flush workers: heartbeats, and releasing the work of the dead.

Each process running a ``FlushWorkerPool`` has a ``WorkerProcess`` row, which its heartbeat
thread updates every ``FLUSH_TICK_SECONDS``. Its jobs record the process and the token their
messages are claimed with (``FlushJob.process``, ``claim_token``). A process whose heartbeat
is older than ``FLUSH_HEARTBEAT_TIMEOUT_SECONDS`` is dead (``kill -9``, an out-of-memory kill,
a lost machine): the next live process to beat deletes its row (``DELETE ... RETURNING``: one
process releases each dead one), frees its messages' claims by their tokens and puts its
running jobs back in the queue, seconds after it died instead of at the end of the lease
(``FLUSH_LEASE_SECONDS``, which stays the last resort: for claims outside a job, or when no
live process is left to judge).

A process is judged only while the database has been up for longer than the timeout
(``pg_postmaster_start_time()``): during and just after a database restart no process could
beat, and all of them get the time to before anyone is taken for dead. A process taken for
dead while alive (its heartbeat held up past the timeout) loses nothing but work: its writes
match no claim any more, the messages are flushed by the next run, and its next beat
recreates its row.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable

from django.conf import settings
from django.db import connection, transaction

from buffers import pending, services
from buffers.models import FlushJob, State

logger = logging.getLogger(__name__)


def process_name() -> str:
    """``host:pid:<8 hex>``, unique to this process (a restarted container has the same pid)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def beat(*, name: str) -> bool:
    """Record that process ``name`` is alive; returns whether its row had to be created.

    Created on the first beat, and again after the process was taken for dead (it lost its
    jobs then: the caller says so). Commits without waiting for the disk: a lost heartbeat
    only makes the process look older.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = off")
        cursor.execute(
            """
            INSERT INTO buffers_workerprocess (name, hostname, pid, started_at, heartbeat_at)
            VALUES (%(name)s, %(host)s, %(pid)s, now(), now())
            ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()
            RETURNING xmax = 0
            """,
            {"name": name, "host": socket.gethostname()[:255], "pid": os.getpid()},
        )
        return cursor.fetchone()[0]


def forget(*, name: str) -> None:
    """Delete the row of process ``name`` (a graceful stop, once its workers have finished)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM buffers_workerprocess WHERE name = %s", [name])


def release_dead_processes() -> list[str]:
    """Release the jobs and claims of every process silent for ``FLUSH_HEARTBEAT_TIMEOUT_SECONDS``;
    returns their names. Nothing while the database itself has been up for less than that."""
    timeout = settings.BUFFERS["HEARTBEAT_TIMEOUT_SECONDS"]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            DELETE FROM buffers_workerprocess
            WHERE heartbeat_at < now() - make_interval(secs => %(timeout)s)
              AND pg_postmaster_start_time() < now() - make_interval(secs => %(timeout)s)
            RETURNING name, extract(epoch FROM now() - heartbeat_at)
            """,
            {"timeout": timeout},
        )
        dead = cursor.fetchall()
    for name, silent in dead:
        jobs = list(FlushJob.objects.filter(state=State.RUNNING, process=name))
        released = _release_jobs(jobs, error=f"worker process {name} died (no heartbeat for {silent:.0f} s)")
        logger.warning(
            "flush worker process %s stopped beating %.1f s ago: released %d jobs and %d claimed messages",
            name,
            silent,
            len(jobs),
            released,
        )
    return [name for name, _ in dead]


def release_orphaned_jobs(*, name: str, running: Iterable[int]) -> int:
    """Release the running jobs of process ``name`` that none of its workers runs; returns how many.

    ``running``: the ids of the jobs its workers run now. A job is orphaned when the database
    went away under its flush (its outcome could not be written) or between its claim and
    the worker learning its id. Only jobs started ``FLUSH_HEARTBEAT_TIMEOUT_SECONDS`` ago or
    more: a worker registers the job it claimed a moment after the claim commits.
    """
    timeout = settings.BUFFERS["HEARTBEAT_TIMEOUT_SECONDS"]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT id FROM buffers_flushjob
            WHERE state = %(running)s AND process = %(name)s
              AND started_at < now() - make_interval(secs => %(timeout)s) AND NOT (id = ANY(%(ids)s))
            """,
            {"name": name, "timeout": timeout, "ids": list(running), "running": State.RUNNING.value},
        )
        ids = [row[0] for row in cursor.fetchall()]
    if not ids:
        return 0
    jobs = list(FlushJob.objects.filter(pk__in=ids, state=State.RUNNING))
    released = _release_jobs(jobs, error="its flush was interrupted (database unavailable)")
    logger.warning("requeued %d interrupted flush jobs of this process (%d claimed messages released)", len(jobs), released)
    return len(jobs)


def _release_jobs(jobs: list[FlushJob], *, error: str) -> int:
    """Free the message claims of ``jobs`` (by token) and put the jobs back in the queue (or
    fail them, attempts used up); returns how many messages were released.

    Claims first, each step committed alone: a job requeued with its claims still standing
    could run and find nothing to flush. The messages' ``user_id`` lets the update use the
    index of pending messages.
    """
    tokens = [job.claim_token for job in jobs if job.claim_token is not None]
    released = 0
    if tokens:
        released = pending.release_claims(user_ids={job.user_id for job in jobs}, tokens=tokens)
    for job in jobs:
        services.job_lost(job, error=error)
    return released
