"""Operator views of users, agents, sessions, messages and knowledge. Vectors never shown."""

from django.contrib import admin
from django.db.models import Count, Q

from memory.models import Agent, Knowledge, Message, Session, User


@admin.register(User)
class UserAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "sessions_count", "pending_messages", "memory_version", "created_at"]
    list_filter = ["created_at"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "memory_version", "created_at", "updated_at"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                sessions_count=Count("sessions", distinct=True),
                pending_messages=Count("messages", filter=Q(messages__flushed_at__isnull=True), distinct=True),
            )
        )

    @admin.display(ordering="sessions_count")
    def sessions_count(self, user):
        return user.sessions_count

    @admin.display(ordering="pending_messages")
    def pending_messages(self, user):
        return user.pending_messages


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "created_at"]
    list_filter = ["created_at"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "created_at", "updated_at"]


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "agent", "created_at"]
    list_select_related = ["user", "agent"]
    list_filter = ["agent"]
    search_fields = ["name", "id", "user__name"]
    raw_id_fields = ["user", "agent"]
    readonly_fields = ["id", "created_at", "updated_at"]


class FlushedFilter(admin.SimpleListFilter):
    """Flushed (embedded and indexed) or still pending in the write-behind buffer."""

    title = "flushed"
    parameter_name = "flushed"

    def lookups(self, request, model_admin):
        return [("yes", "Flushed"), ("no", "Pending")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(flushed_at__isnull=self.value() == "no")
        return queryset


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["short_content", "role", "user", "session", "position", "flushed", "flush_count", "created_at"]
    list_select_related = ["session", "user"]
    list_filter = ["role", FlushedFilter, "created_at"]
    search_fields = ["content", "id", "session__name", "user__name"]
    raw_id_fields = ["session", "user"]
    exclude = ["embedding", "flush_claim"]
    readonly_fields = ["id", "index_text", "flushed_at", "claimed_until", "flush_count", "updated_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding")

    @admin.display(description="content")
    def short_content(self, message):
        return message.content[:80]

    @admin.display(boolean=True, ordering="flushed_at")
    def flushed(self, message):
        return message.flushed_at is not None


@admin.register(Knowledge)
class KnowledgeAdmin(admin.ModelAdmin):
    list_display = ["short_content", "user", "created_at"]
    list_select_related = ["user"]
    list_filter = ["created_at"]
    search_fields = ["content", "id", "user__name"]
    raw_id_fields = ["user"]
    exclude = ["embedding"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding")

    @admin.display(description="content")
    def short_content(self, item):
        return item.content[:80]
