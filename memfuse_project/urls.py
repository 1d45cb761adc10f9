from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("memory.api.urls")),
]

handler404 = "memory.api.errors.json_404"
handler500 = "memory.api.errors.json_500"
