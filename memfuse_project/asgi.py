"""ASGI entry point: HTTP through Django, WebSocket and worker channels through Channels.

Loading this module means the process serves: the model registry is filled before the first
request, whatever ASGI server imported us (daphne, uvicorn, runserver), the embedded database
is migrated (with a development tenant on first start), and the flush workers start where this process runs them.
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
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from buffers import events, workers  # noqa: E402
from buffers.consumers import FlushConsumer  # noqa: E402
from buffers.routing import websocket_urlpatterns  # noqa: E402
from memfuse_project.embedded_pg import local_tenant_if_embedded, migrate_if_embedded  # noqa: E402
from memory import registry  # noqa: E402
from memory.api.auth import WebSocketAuthMiddleware  # noqa: E402

migrate_if_embedded()
local_tenant_if_embedded()
registry.get_embedder()
workers.start_if_serving()


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
            # /static/ (the admin's and the API docs' assets) served from the installed apps, with
            # no collectstatic step. Django's own ASGI static handler rather than WhiteNoise:
            # WhiteNoise's middleware is sync-only, and one sync middleware makes Django run every
            # request through one shared thread, serialising the API's concurrent views.
            "http": ASGIStaticFilesHandler(django_asgi_app),
            "websocket": AllowedHostsOriginValidator(WebSocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
            "channel": ChannelNameRouter({settings.BUFFERS["CHANNEL"]: FlushConsumer.as_asgi()}),
        }
    )
)
