"""The ticker's upkeep of the queue (``buffers.workers``): work no live worker holds is
requeued, finished jobs are purged, and a graceful stop asks for a flush of everything pending."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from buffers import pending
from buffers.models import FlushJob, Priority, Reason, State
from buffers.services import job_lost, request_flush

logger = logging.getLogger(__name__)


def recover(*, all_pending: bool = False) -> int:
    """Requeue work no live worker holds; returns how many flushes were requested.

    - running jobs whose lease expired (their worker died) go back to the queue;
    - users with pending messages not under a live claim get a flush: at low priority for the
      time trigger (oldest pending change older than ``FLUSH_INTERVAL_SECONDS``), or for every
      such user with ``all_pending`` (at start: reason ``recovery``).
    """
    for job in FlushJob.objects.filter(state=State.RUNNING, lease_until__lt=timezone.now()):
        logger.warning("flush job %s lost its worker %s; requeued", job.pk, job.worker)
        job_lost(job, error="worker lost (lease expired)")
    interval = 0.0 if all_pending else settings.BUFFERS["INTERVAL_SECONDS"]
    user_ids = pending.users_due(older_than_seconds=interval)
    reason = Reason.RECOVERY if all_pending else Reason.TIME
    for user_id in user_ids:
        with transaction.atomic():
            request_flush(user_id=user_id, priority=Priority.LOW, reason=reason)
    return len(user_ids)


def request_shutdown_flushes() -> int:
    """At a graceful stop: a critical flush for every user with pending messages."""
    user_ids = pending.users_with_pending()
    for user_id in user_ids:
        with transaction.atomic():
            request_flush(user_id=user_id, priority=Priority.CRITICAL, reason=Reason.SHUTDOWN)
    return len(user_ids)


# Rows one purge statement deletes: a short statement, whatever the number of old jobs.
PURGE_BATCH = 500


def purge_finished_jobs(*, batch: int = PURGE_BATCH) -> int:
    """Delete up to ``batch`` finished jobs: done ones finished ``FLUSH_DONE_RETENTION_SECONDS``
    ago, failed ones ``FLUSH_FAILED_RETENTION_SECONDS`` ago (0: kept); and the turns
    (``FlushTurn``) of tenants not served for the first of these. Returns how many jobs.

    The ticker of every process calls it; ``SKIP LOCKED``, so two never wait for each other.
    """
    config = settings.BUFFERS
    done_after, failed_after = config["DONE_RETENTION_SECONDS"], config["FAILED_RETENTION_SECONDS"]
    purged = 0
    with connection.cursor() as cursor:
        for state, after in ((State.DONE, done_after), (State.FAILED, failed_after)):
            if after <= 0 or purged >= batch:
                continue
            cursor.execute(
                """
                DELETE FROM buffers_flushjob WHERE id IN (
                    SELECT id FROM buffers_flushjob
                    WHERE state = %(state)s AND finished_at < now() - make_interval(secs => %(after)s)
                    LIMIT %(batch)s FOR UPDATE SKIP LOCKED
                )
                """,
                {"state": state.value, "after": after, "batch": batch - purged},
            )
            purged += cursor.rowcount
        if done_after > 0:
            cursor.execute(
                "DELETE FROM buffers_flushturn WHERE claimed_at < now() - make_interval(secs => %s)", [done_after]
            )
    return purged
