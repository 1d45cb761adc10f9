"""Operator views of tenants, API keys, users, agents, sessions, messages and knowledge. Vectors never shown."""

from django.contrib import admin
from django.db.models import Count, Q
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey

from memory import services
from memory.models import Agent, ApiKey, Knowledge, Message, Session, Tenant, User

# The library's own key model is unused (ours adds scope and owner): keep it out of the admin.
admin.site.unregister(APIKey)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "users_count", "agents_count", "created_at"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "created_at"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(users_count=Count("users", distinct=True), agents_count=Count("agents", distinct=True))
        )

    @admin.display(ordering="users_count")
    def users_count(self, tenant):
        return tenant.users_count

    @admin.display(ordering="agents_count")
    def agents_count(self, tenant):
        return tenant.agents_count


@admin.register(ApiKey)
class ApiKeyAdmin(APIKeyModelAdmin):
    """Keys by prefix; a new key is shown once (the library's admin), revocation is one-way."""

    list_display = ["prefix", "name", "scope", "tenant", "user", "created", "expiry_date", "_has_expired", "revoked"]
    list_select_related = ["tenant", "user"]
    list_filter = ["scope", "revoked", "created"]
    search_fields = ["name", "prefix", "tenant__name", "user__name"]
    raw_id_fields = ["tenant", "user"]
    actions = ["revoke"]

    def save_model(self, request, obj, form=None, change=False):
        super().save_model(request, obj, form, change)
        if obj.revoked:
            services.api_key_revoke(api_key=obj)  # its descendants too, and forgotten at once

    @admin.action(description="Revoke the selected API keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.api_key_revoke(api_key=api_key)


@admin.register(User)
class UserAdmin(admin.ModelAdmin):
    list_display = ["name", "tenant", "id", "sessions_count", "pending_messages", "memory_version", "created_at"]
    list_select_related = ["tenant"]
    list_filter = ["tenant", "created_at"]
    search_fields = ["name", "id"]
    raw_id_fields = ["tenant"]
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
    list_display = ["name", "tenant", "id", "created_at"]
    list_select_related = ["tenant"]
    list_filter = ["tenant", "created_at"]
    search_fields = ["name", "id"]
    raw_id_fields = ["tenant"]
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
