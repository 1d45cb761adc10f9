from django.contrib import admin
from django.urls import include, path
from django.views.generic import TemplateView
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from memory.api.operator import DashboardStatsView, dashboard, metrics_view

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="memfuse-dashboard"),
    # The same JSON as /api/v1/admin/stats for a staff session: under ASGI, /api/ is served
    # without the session middleware (memfuse_project.lifespan.APIHandler), so keys only there.
    path("admin/dashboard/stats", DashboardStatsView.as_view(), name="memfuse-dashboard-stats"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("api/v1/", include("memory.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    # A person's view of the WebSocket: the key is typed into the page (memory/static/chat/chat.js).
    path("chat/", TemplateView.as_view(template_name="chat.html"), name="chat"),
]

handler404 = "memory.api.errors.json_404"
handler500 = "memory.api.errors.json_500"
