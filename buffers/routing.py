from django.urls import re_path

from buffers.consumers import SessionConsumer

websocket_urlpatterns = [
    re_path(r"^ws/v1/sessions/(?P<session_id>[^/]+)/?$", SessionConsumer.as_asgi()),
]
