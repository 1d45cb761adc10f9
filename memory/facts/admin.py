"""The facts layer in the admin: facts (no vector on any page) with their sources and
versions, and extraction jobs, dead ones first to see, with a re-run action."""

from __future__ import annotations

from django.contrib import admin, messages

from memory.facts import jobs
from memory.facts.models import Fact, FactJob, FactSource


class FactSourceInline(admin.TabularInline):
    model = FactSource
    extra = 0
    fields = ["message_id", "message_seq"]
    readonly_fields = fields
    can_delete = False


@admin.register(Fact)
class FactAdmin(admin.ModelAdmin):
    list_display = [
        "short_text",
        "kind",
        "user",
        "valid_from",
        "confidence",
        "version",
        "current",
        "model",
        "created_at",
    ]
    list_select_related = ["user"]
    list_filter = ["kind", "model", "created_at"]
    search_fields = ["text", "user__name"]
    raw_id_fields = ["user", "superseded_by"]
    exclude = ["embedding"]
    readonly_fields = ["search_vector"]
    inlines = [FactSourceInline]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding", "search_vector")

    @admin.display(description="text")
    def short_text(self, fact: Fact) -> str:
        return fact.text[:80]

    @admin.display(boolean=True)
    def current(self, fact: Fact) -> bool:
        return fact.superseded_by_id is None and fact.deleted_at is None


@admin.register(FactJob)
class FactJobAdmin(admin.ModelAdmin):
    """Extraction jobs; dead letters (``state=dead``) carry their last error."""

    list_display = [
        "id",
        "state",
        "tenant",
        "user",
        "session",
        "attempts",
        "next_attempt_at",
        "facts_written",
        "short_error",
    ]
    list_select_related = ["tenant", "user", "session"]
    list_filter = ["state", "created_at"]
    search_fields = ["user__name", "tenant__name", "last_error"]
    raw_id_fields = ["tenant", "user", "session"]
    actions = ["rerun"]

    @admin.display(description="last error")
    def short_error(self, job: FactJob) -> str:
        return job.last_error[:120]

    @admin.action(description="Re-run the selected jobs (dead or done)")
    def rerun(self, request, queryset):
        count = jobs.facts_rerun(job_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} jobs queued again.", messages.SUCCESS)
