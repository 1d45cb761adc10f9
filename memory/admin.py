"""Operator views of tenants, API keys, users, agents, sessions, messages and knowledge. Vectors never shown.

Deletes and edits go through ``memory.services``, as the API's do: the lock order of
docs/architecture.md (a delete beside a running flush neither deadlocks nor fails), tombstones
and ``memory_version`` (cached indexes drop what went), a message's index text made again.
Django's own cascade (``Model.delete``) and ``save()`` do none of that.
"""

from __future__ import annotations

from itertools import groupby

from django import forms
from django.contrib import admin
from django.contrib.auth import get_permission_codename
from django.db.models import Count, Q, QuerySet
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.text import capfirst
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey

from memory.api.serializers import MessageInSerializer
from memory.models import Agent, ApiKey, Knowledge, Message, Session, Tenant, User
from memory.services.agents import agent_delete
from memory.services.api_keys import api_key_revoke
from memory.services.knowledge import knowledge_delete
from memory.services.messages import messages_delete, messages_update
from memory.services.sessions import session_delete
from memory.services.tenants import tenant_delete
from memory.services.users import user_delete

# The library's own key model is unused (ours adds scope and owner): keep it out of the admin.
admin.site.unregister(APIKey)

# Objects a delete confirmation names one by one; beyond, it says how many more.
_LISTED = 100


class ServiceDeletes:
    """A ``ModelAdmin`` mixin: deletes call ``delete_rows`` (the services), and the confirmation
    page counts what goes with the objects (``cascade``) rather than listing every row:
    Django's ``get_deleted_objects`` loads each related row into memory (every message of a
    tenant) to name it. Those counts are plain reads: nothing is locked before the delete's
    own lock order begins."""

    def cascade(self, selection) -> dict:
        """``{model: queryset}`` of the rows that go with the objects ``selection`` names (their
        primary keys: a list, or a ``values("pk")`` queryset)."""
        return {}

    def delete_rows(self, objs: list) -> None:
        raise NotImplementedError

    def delete_model(self, request, obj) -> None:
        self.delete_rows([obj])

    def delete_queryset(self, request, queryset: QuerySet) -> None:
        self.delete_rows(list(queryset.order_by("pk")))

    def get_deleted_objects(self, objs, request):
        opts = self.model._meta
        count = objs.count() if isinstance(objs, QuerySet) else len(objs)
        model_count = {opts.verbose_name_plural: count}
        perms_needed = set()
        selection = objs.values("pk") if isinstance(objs, QuerySet) else [obj.pk for obj in objs]
        for model, rows in self.cascade(selection).items():
            related = rows.count()
            if related:
                model_count[model._meta.verbose_name_plural] = related
                codename = get_permission_codename("delete", model._meta)
                if not request.user.has_perm(f"{model._meta.app_label}.{codename}"):
                    perms_needed.add(model._meta.verbose_name)
        listed = [self._link(obj) for obj in objs[:_LISTED]]
        if count > _LISTED:
            listed.append(f"... and {count - _LISTED} more {opts.verbose_name_plural}")
        return listed, model_count, perms_needed, []

    def _link(self, obj) -> str:
        opts = obj._meta
        try:
            url = reverse(f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
        except NoReverseMatch:
            return f"{capfirst(opts.verbose_name)}: {obj}"
        return format_html('{}: <a href="{}">{}</a>', capfirst(opts.verbose_name), url, obj)


@admin.register(Tenant)
class TenantAdmin(ServiceDeletes, admin.ModelAdmin):
    list_display = ["name", "id", "users_count", "agents_count", "created_at"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "created_at"]

    def cascade(self, selection) -> dict:
        return {
            User: User.objects.filter(tenant__in=selection),
            Agent: Agent.objects.filter(tenant__in=selection),
            ApiKey: ApiKey.objects.filter(tenant__in=selection),
            Session: Session.objects.filter(user__tenant__in=selection),
            Message: Message.objects.filter(user__tenant__in=selection),
            Knowledge: Knowledge.objects.filter(user__tenant__in=selection),
        }

    def delete_rows(self, objs: list) -> None:
        for tenant in objs:
            tenant_delete(tenant=tenant)

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
            api_key_revoke(api_key=obj)  # its descendants too, and forgotten at once

    @admin.action(description="Revoke the selected API keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            api_key_revoke(api_key=api_key)


@admin.register(User)
class UserAdmin(ServiceDeletes, admin.ModelAdmin):
    list_display = ["name", "tenant", "id", "sessions_count", "pending_messages", "memory_version", "created_at"]
    list_select_related = ["tenant"]
    list_filter = ["tenant", "created_at"]
    search_fields = ["name", "id"]
    raw_id_fields = ["tenant"]
    readonly_fields = ["id", "memory_version", "created_at", "updated_at"]

    def cascade(self, selection) -> dict:
        return {
            Session: Session.objects.filter(user__in=selection),
            Message: Message.objects.filter(user__in=selection),
            Knowledge: Knowledge.objects.filter(user__in=selection),
            ApiKey: ApiKey.objects.filter(user__in=selection),
        }

    def delete_rows(self, objs: list) -> None:
        for user in objs:  # ascending ids: the lock order, should the request be one transaction
            user_delete(user=user)

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
class AgentAdmin(ServiceDeletes, admin.ModelAdmin):
    list_display = ["name", "tenant", "id", "created_at"]
    list_select_related = ["tenant"]
    list_filter = ["tenant", "created_at"]
    search_fields = ["name", "id"]
    raw_id_fields = ["tenant"]
    readonly_fields = ["id", "created_at", "updated_at"]

    def cascade(self, selection) -> dict:
        return {Session: Session.objects.filter(agent__in=selection), Message: Message.objects.filter(session__agent__in=selection)}

    def delete_rows(self, objs: list) -> None:
        for agent in objs:
            agent_delete(agent=agent)


@admin.register(Session)
class SessionAdmin(ServiceDeletes, admin.ModelAdmin):
    list_display = ["name", "user", "agent", "created_at"]
    list_select_related = ["user", "agent"]
    list_filter = ["agent"]
    search_fields = ["name", "id", "user__name"]
    raw_id_fields = ["user", "agent"]
    readonly_fields = ["id", "created_at", "updated_at"]

    def cascade(self, selection) -> dict:
        return {Message: Message.objects.filter(session__in=selection)}

    def delete_rows(self, objs: list) -> None:
        for session in sorted(objs, key=lambda session: session.user_id):  # the users' lock order
            session_delete(session=session)


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


def _error_text(errors) -> str:
    """A DRF serializer's errors of one field (a list, or a dict of nested ones) as one line."""
    if isinstance(errors, dict):
        return "; ".join(f"{key}: {_error_text(value)}" for key, value in errors.items())
    if isinstance(errors, list):
        return " ".join(_error_text(error) for error in errors)
    return str(errors)


class MessageForm(forms.ModelForm):
    """A message's role, content and metadata, validated as the API validates a message
    (``MessageInSerializer``: the content's length, the metadata an object, ...)."""

    class Meta:
        model = Message
        fields = ["role", "content", "metadata"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["content"].strip = False  # kept as sent, as by the API

    def clean(self):
        cleaned = super().clean()
        data = {key: cleaned[key] for key in ("role", "content", "metadata") if cleaned.get(key) is not None}
        serializer = MessageInSerializer(data=data)
        if serializer.is_valid():
            self.message_in = serializer.validated_data
        else:
            for name, errors in serializer.errors.items():
                self.add_error(name if name in self.fields else None, _error_text(errors))
        return cleaned


@admin.register(Message)
class MessageAdmin(ServiceDeletes, admin.ModelAdmin):
    """Messages are added through the API only (positions, the flush); an edit of role,
    content or metadata goes through ``messages_update`` (new index text, pending
    again, the old embedding dropped), and everything else is read-only: moving a message to
    another session, user or position has no service."""

    form = MessageForm
    list_display = ["short_content", "role", "user", "session", "position", "flushed", "flush_count", "created_at"]
    list_select_related = ["session", "user"]
    list_filter = ["role", FlushedFilter, "created_at"]
    search_fields = ["content", "id", "session__name", "user__name"]
    fields = ["id", "session", "user", "position", "role", "content", "metadata", "index_text", "created_at",
              "flushed_at", "claimed_until", "flush_count", "updated_at"]
    readonly_fields = ["id", "session", "user", "position", "index_text", "created_at", "flushed_at", "claimed_until",
                       "flush_count", "updated_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding", "context_embedding")

    def has_add_permission(self, request) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        if change and form.has_changed():
            messages_update(session=obj.session, message_ids=[obj.pk], new_messages=[form.message_in])

    def delete_rows(self, objs: list) -> None:
        # One service call per session, users in ascending id order (the lock order).
        ordered = sorted(objs, key=lambda message: (message.user_id, message.session_id))
        sessions = Session.objects.in_bulk({message.session_id for message in ordered})
        for session_id, messages in groupby(ordered, key=lambda message: message.session_id):
            messages_delete(session=sessions[session_id], message_ids=[message.pk for message in messages])

    @admin.display(description="content")
    def short_content(self, message):
        return message.content[:80]

    @admin.display(boolean=True, ordering="flushed_at")
    def flushed(self, message):
        return message.flushed_at is not None


@admin.register(Knowledge)
class KnowledgeAdmin(ServiceDeletes, admin.ModelAdmin):
    """Read-only but for deletes (``knowledge_delete``). An edit or an add embeds the
    content (``knowledge_update``, ``knowledge_add``): a model call the admin's change view
    would make inside its transaction, holding a connection; the API does both."""

    list_display = ["short_content", "user", "created_at"]
    list_select_related = ["user"]
    list_filter = ["created_at"]
    search_fields = ["content", "id", "user__name"]
    exclude = ["embedding"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def delete_rows(self, objs: list) -> None:
        ordered = sorted(objs, key=lambda item: item.user_id)  # the users' lock order
        users = User.objects.in_bulk({item.user_id for item in ordered})
        for user_id, items in groupby(ordered, key=lambda item: item.user_id):
            knowledge_delete(user=users[user_id], knowledge_ids=[item.pk for item in items])

    @admin.display(description="content")
    def short_content(self, item):
        return item.content[:80]

# The facts layer's pages live with it (memory.facts.admin); imported to register them.
from memory.facts import admin as facts_admin  # noqa: E402, F401
