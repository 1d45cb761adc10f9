"""Operator view of flush jobs (failed ones can be retried) and of the processes running flush workers."""

from django.contrib import admin, messages

from buffers import services
from buffers.models import ACTIVE_STATES, FlushJob, WorkerProcess


@admin.register(FlushJob)
class FlushJobAdmin(admin.ModelAdmin):
    """Jobs change only through ``buffers.services`` (a claim, a worker's update where its claim
    still stands, the 'retry' action): no add or edit form here. A finished job may be
    deleted; a waiting or running one may not (its worker would lose the row it reports to)."""

    list_display = ["id", "user", "session", "priority", "reason", "state", "attempts", "messages_flushed", "created_at", "finished_at"]
    list_select_related = ["user", "session"]
    list_filter = ["state", "priority", "reason"]
    search_fields = ["user__name", "user__id", "last_error"]
    raw_id_fields = ["user", "session"]
    readonly_fields = ["tenant", "worker", "process", "claim_token", "lease_until", "started_at", "finished_at", "created_at", "superseded_by"]
    actions = ["retry_failed"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Per object: the delete page, and the list's action for each selected job.
        return super().has_delete_permission(request, obj) and (obj is None or obj.state not in ACTIVE_STATES)

    @admin.action(description="Retry the selected failed flushes")
    def retry_failed(self, request, queryset):
        retried = services.failed_jobs_retry(job_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{retried} failed flush(es) queued again.", messages.SUCCESS)


@admin.register(WorkerProcess)
class WorkerProcessAdmin(admin.ModelAdmin):
    """Live processes and their last heartbeat; a dead one's row goes within FLUSH_HEARTBEAT_TIMEOUT_SECONDS."""

    list_display = ["name", "hostname", "pid", "started_at", "heartbeat_at"]
    search_fields = ["name", "hostname"]
    readonly_fields = ["name", "hostname", "pid", "started_at", "heartbeat_at"]
