"""Flush jobs: the durable queue of requests to embed and index a user's pending messages.

The pending work itself is the messages (``Message.flushed_at IS NULL``); a job only says
"flush this user (or session) soon, at this priority". Workers take the next job with
``SELECT ... FOR UPDATE SKIP LOCKED``, taking turns over tenants (``FlushTurn``; the order is
``buffers.services.claim_next_job``'s). A job that fails is retried with exponential backoff,
then left ``failed`` for an operator; finished jobs are purged after a while.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class Priority(models.IntegerChoices):
    """Lower runs first. Manual flushes are high, size triggers normal, time triggers low."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


class Reason(models.TextChoices):
    MANUAL = "manual"
    SIZE = "size"
    TIME = "time"
    SHUTDOWN = "shutdown"
    RECOVERY = "recovery"


class State(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"


# A waiting job is runnable (from its next_attempt_at on); an active one is not finished.
WAITING_STATES = (State.QUEUED, State.RETRYING)
ACTIVE_STATES = (*WAITING_STATES, State.RUNNING)


def sql_states(states) -> str:
    """``states`` as a SQL list of literals: ``'queued', 'retrying'``."""
    return ", ".join(f"'{State(state).value}'" for state in states)


class FlushJob(models.Model):
    """One flush request. ``session`` narrows it to one session's pending messages."""

    user = models.ForeignKey("memory.User", on_delete=models.CASCADE, related_name="flush_jobs")
    # The user's tenant, written with the job (in SQL, from memory_user): claims take turns
    # over tenants. No database constraint: the job goes with its user, and a constraint would
    # lock the tenant's row at every job insert of any of its users.
    tenant = models.ForeignKey(
        "memory.Tenant", on_delete=models.DO_NOTHING, db_constraint=False, null=True, blank=True, related_name="+"
    )
    session = models.ForeignKey("memory.Session", on_delete=models.CASCADE, null=True, blank=True, related_name="+")
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.NORMAL)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=4)
    last_error = models.TextField(blank=True, default="")
    messages_flushed = models.PositiveIntegerField(default=0)
    # Which worker runs it, and until when its claim holds; an expired lease means the
    # worker died (or hung) and the job may be taken again.
    worker = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    # The worker's process (WorkerProcess.name) and the flush token its messages are claimed
    # with: when that process stops beating, its claims are released by this token at once,
    # long before the lease ends. A database default: the add's statement inserts jobs in SQL.
    process = models.CharField(max_length=64, blank=True, default="", db_default="")
    claim_token = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The waiting job of the same scope this one was folded into (it is ``done`` then): a
    # retry, or the rest of a flush whose time slice ended, met a job already waiting. A
    # waiter follows it (``buffers.services.wait_for_job``). An id, not a key: purged apart.
    superseded_by = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["priority", "created_at", "id"]
        indexes = [
            models.Index(
                fields=["priority", "created_at", "id"],
                name="buffers_job_runnable",
                condition=Q(state__in=WAITING_STATES),
            ),
            models.Index(fields=["state", "finished_at"], name="buffers_job_state"),
        ]
        constraints = [
            # At most one automatic (user-wide) job waits per user: triggers upgrade it instead.
            models.UniqueConstraint(
                fields=["user"],
                condition=Q(state__in=WAITING_STATES, session__isnull=True),
                name="buffers_one_waiting_job_per_user",
            ),
            # And one per session: repeated requests to flush a session merge into it.
            models.UniqueConstraint(
                fields=["session"],
                condition=Q(state__in=WAITING_STATES, session__isnull=False),
                name="buffers_one_waiting_job_per_session",
            ),
        ]

    def __str__(self) -> str:
        return f"flush {self.user_id} ({self.get_reason_display()}, {self.get_state_display()})"


class FlushTurn(models.Model):
    """When a job of ``tenant`` was last claimed: the next claim goes to the tenant with
    runnable jobs served least recently (round-robin over tenants), so one tenant's many jobs
    never queue another's behind them. Rows not claimed for ``FLUSH_DONE_RETENTION_SECONDS``
    are purged with the jobs (a tenant without a row is served first, as one never served)."""

    tenant = models.OneToOneField(
        "memory.Tenant", primary_key=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    claimed_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"flush turn of {self.tenant_id} ({self.claimed_at})"


class WorkerProcess(models.Model):
    """A process running flush workers, alive while it beats (``buffers.heartbeats``).

    ``name`` is ``host:pid:<random>``: a restarted container reuses its pid, never the name.
    Its ticker updates ``heartbeat_at`` every ``FLUSH_TICK_SECONDS``; a process silent for
    ``FLUSH_HEARTBEAT_TIMEOUT_SECONDS`` (a ``kill -9``, an out-of-memory kill) is dead, and
    another process's ticker releases its jobs and message claims and deletes its row.
    """

    name = models.CharField(max_length=64, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name

