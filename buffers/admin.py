"""Operator view of flush jobs (failed ones can be retried) and of the processes running flush workers."""

from django.contrib import admin, messages

from buffers import services
from buffers.models import FlushJob, WorkerProcess


@admin.register(FlushJob)
class FlushJobAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "session", "priority", "reason", "state", "attempts", "messages_flushed", "created_at", "finished_at"]
    list_select_related = ["user", "session"]
    list_filter = ["state", "priority", "reason"]
    search_fields = ["user__name", "user__id", "last_error"]
    raw_id_fields = ["user", "session"]
    readonly_fields = ["tenant", "worker", "process", "claim_token", "lease_until", "started_at", "finished_at", "created_at", "superseded_by"]
    actions = ["retry_failed"]

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
