from django.contrib import admin
from django.urls import include, path

from memory.admin_dashboard import dashboard

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="memfuse-dashboard"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("memory.api.urls")),
]

handler404 = "memory.api.errors.json_404"
handler500 = "memory.api.errors.json_500"
