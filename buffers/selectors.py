"""Reads of the buffers for operators: pending messages, the flush queue, failed flushes."""

from __future__ import annotations

from django.db.models import Count

from buffers.models import FlushJob, Priority, State
from buffers.pending import pending_overview
from buffers.services import job_dict


def buffers_overview(*, top_users: int = 10, failed_jobs: int = 10) -> dict:
    """The write-behind buffers of every user, from the database (all processes).

    Returns ``{"pending_messages", "pending_users", "oldest_pending_age_s", "top_users":
    [{"user_id", "name", "pending_messages", "oldest_pending_age_s"}] (most pending first,
    at most ``top_users``), "jobs": {state: count}, "queue_depth": {priority: waiting jobs},
    "failed_jobs": [job_dict] (most recent first, at most ``failed_jobs``), "failed_total"}``.
    Ages are seconds since the message was last written.
    """
    total, users, oldest, rows = pending_overview(top_users=top_users)
    top = [
        {"user_id": str(user_id), "name": name, "pending_messages": count, "oldest_pending_age_s": round(float(age), 1)}
        for user_id, name, count, age in rows
    ]
    jobs = {state: 0 for state in State.values}
    jobs.update(dict(FlushJob.objects.values_list("state").annotate(n=Count("id")).values_list("state", "n")))
    waiting = FlushJob.objects.filter(state__in=[State.QUEUED, State.RETRYING]).values_list("priority").annotate(n=Count("id"))
    depth = {Priority(priority).label.lower(): 0 for priority in Priority.values}
    depth.update({Priority(priority).label.lower(): n for priority, n in waiting.values_list("priority", "n")})
    failed = FlushJob.objects.filter(state=State.FAILED).order_by("-finished_at", "-id")[:failed_jobs]
    return {
        "pending_messages": total,
        "pending_users": users,
        "oldest_pending_age_s": round(float(oldest), 1),
        "top_users": top,
        "jobs": jobs,
        "queue_depth": depth,
        "failed_jobs": [job_dict(job) for job in failed],
        "failed_total": jobs[State.FAILED],
    }
