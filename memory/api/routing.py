"""WebSocket routes of the memory API (``memfuse_project.asgi`` mounts them)."""

from django.urls import re_path

from memory.api.consumers import SessionConsumer

websocket_urlpatterns = [
    re_path(r"^ws/v1/sessions/(?P<session_id>[^/]+)/?$", SessionConsumer.as_asgi()),
]
