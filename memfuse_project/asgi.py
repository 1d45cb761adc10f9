"""ASGI entry point: HTTP through Django, WebSocket and worker channels through Channels.

Importing it builds the application and starts nothing: the serving start-up (the process's
role, the models, the embedded database, the flush workers, the dashboard's sampler) runs at
the ASGI lifespan's startup, or before the first connection under a server that does not
speak lifespan (``memfuse_project.lifespan``).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

from django.apps import apps  # noqa: E402

# Imported before Django starts: a server (uvicorn, daphne) loads this application; imported
# once Django runs: runserver, runworker or a test, whose role is theirs to declare.
loaded_by_server = not apps.ready

from django.core.asgi import get_asgi_application  # noqa: E402

# Build the HTTP app first: it calls django.setup(), which must precede any model import.
django_asgi_app = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.db import connections  # noqa: E402

from buffers.consumers import FlushConsumer  # noqa: E402
from memfuse_project.lifespan import APIHandler, PathPrefixRouter, ServerLoopRegistration  # noqa: E402
from memory.api.admission import TenantAdmission  # noqa: E402
from memory.api.auth import HTTPAuthMiddleware, WebSocketAuthMiddleware  # noqa: E402
from memory.api.limits import BodySizeLimit  # noqa: E402
from memory.api.routing import websocket_urlpatterns  # noqa: E402
from memory.mcp.http import application as mcp_application  # noqa: E402
from runtime import roles  # noqa: E402

if not loaded_by_server and roles.role() is not None:
    # Imported by runserver once its checks ran, on their thread: that thread serves no
    # request, so it gives back the pool connection the migration check took, or it would
    # hold one for ever.
    connections.close_all()

application = ServerLoopRegistration(
    ProtocolTypeRouter(
        {
            # /static/ (the admin's and the API docs' assets) served from the installed apps, with
            # no collectstatic step. Django's own ASGI static handler rather than WhiteNoise:
            # WhiteNoise's middleware is sync-only, and one sync middleware makes Django run every
            # request through one shared thread, serialising the API's concurrent views.
            # A request to /api/ or /mcp without a usable key is a 401 before any of its body is
            # read; one of a tenant past its places in the process, or refused by a rate limit
            # for the rest of its window, a 429; then a body over its limit is a 413 before
            # Django reads it into a temporary file.
            # /mcp: the MCP tools over Streamable HTTP (memory.mcp.http), same process and pool.
            "http": HTTPAuthMiddleware(
                TenantAdmission(
                    BodySizeLimit(
                        PathPrefixRouter(
                            "/api/",
                            APIHandler(),
                            PathPrefixRouter("/mcp", mcp_application, ASGIStaticFilesHandler(django_asgi_app)),
                        )
                    )
                )
            ),
            "websocket": AllowedHostsOriginValidator(WebSocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
            "channel": ChannelNameRouter({settings.BUFFERS["CHANNEL"]: FlushConsumer.as_asgi()}),
        }
    ),
    loaded_by_server=loaded_by_server,
)
