"""Routes of ``/api/v1/``: every path answers with or without a trailing slash.

The memfuse client sends most paths without a slash, but ``health/`` with one; Django cannot
redirect a POST to add a slash, so both forms are routed directly.
"""

from django.urls import re_path

from memory.api import operator, portability, views

ID = r"(?P<{}>[^/]+)"


def route(pattern: str, view, name: str):
    return re_path(rf"^{pattern}/?$", view.as_view(), name=name)


urlpatterns = [
    route("health", views.HealthView, "health"),
    route("admin/stats", operator.AdminStatsView, "admin-stats"),
    route("users", views.UsersView, "users"),
    route(f"users/{ID.format('user_id')}", views.UserDetailView, "user-detail"),
    route(f"users/{ID.format('user_id')}/query", views.UserQueryView, "user-query"),
    route(f"users/{ID.format('user_id')}/knowledge", views.UserKnowledgeView, "user-knowledge"),
    route(f"users/{ID.format('user_id')}/knowledge/read", views.UserKnowledgeReadView, "user-knowledge-read"),
    route(f"users/{ID.format('user_id')}/flush", views.UserFlushView, "user-flush"),
    route(f"users/{ID.format('user_id')}/export", portability.UserExportView, "user-export"),
    route(f"users/{ID.format('user_id')}/import", portability.UserImportView, "user-import"),
    route(f"users/{ID.format('user_id')}/buffer", views.UserBufferView, "user-buffer"),
    route(f"users/{ID.format('user_id')}/api-keys", views.UserApiKeysView, "user-api-keys"),
    route(
        f"users/{ID.format('user_id')}/api-keys/{ID.format('api_key_id')}",
        views.UserApiKeyDetailView,
        "user-api-key-detail",
    ),
    route("agents", views.AgentsView, "agents"),
    route(f"agents/{ID.format('agent_id')}", views.AgentDetailView, "agent-detail"),
    route("sessions", views.SessionsView, "sessions"),
    route(f"sessions/{ID.format('session_id')}", views.SessionDetailView, "session-detail"),
    route(f"sessions/{ID.format('session_id')}/flush", views.SessionFlushView, "session-flush"),
    route(f"sessions/{ID.format('session_id')}/messages", views.SessionMessagesView, "session-messages"),
    route(f"sessions/{ID.format('session_id')}/messages/read", views.SessionMessagesReadView, "session-messages-read"),
]
