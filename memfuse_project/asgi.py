"""ASGI entry point: HTTP through Django, WebSocket and worker channels through Channels.

Loading this module means the process serves: the model registry is filled before the first
request, whatever ASGI server imported us (daphne, uvicorn, runserver), the embedded database
is migrated, and the flush workers start where this process runs them.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

# Build the HTTP app first: it calls django.setup(), which must precede any model import.
django_asgi_app = get_asgi_application()

import asyncio  # noqa: E402

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from buffers import events, workers  # noqa: E402
from buffers.consumers import FlushConsumer  # noqa: E402
from buffers.routing import websocket_urlpatterns  # noqa: E402
from memfuse_project.embedded_pg import migrate_if_embedded  # noqa: E402
from memory import registry  # noqa: E402
from memory.api.auth import WebSocketAuthMiddleware  # noqa: E402

migrate_if_embedded()
registry.get_embedder()
workers.start_if_serving()
# The importing thread serves no request: give back the pool connections it used (runserver's
# migration check, the embedded database's migrate), or it would hold one for ever.
connections.close_all()


class ServerLoopRegistration:
    """Remembers the server's event loop on the first connection (see ``buffers.events``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        events.register_server_loop(asyncio.get_running_loop())
        return await self.app(scope, receive, send)


application = ServerLoopRegistration(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(WebSocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
            "channel": ChannelNameRouter({settings.BUFFERS["CHANNEL"]: FlushConsumer.as_asgi()}),
        }
    )
)
