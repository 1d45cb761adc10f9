"""ASGI entry point: HTTP through Django, WebSocket and worker channels through Channels.

Loading this module means the process serves: the model registry is filled before the first
request, whatever ASGI server imported us (daphne, uvicorn, runserver), the embedded database
is migrated (with a development tenant on first start), and the flush workers start where this process runs them.
"""

import gc
import os

from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

# Build the HTTP app first: it calls django.setup(), which must precede any model import.
django_asgi_app = get_asgi_application()

import asyncio  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.db import connections  # noqa: E402
from django.urls import get_resolver  # noqa: E402

from buffers import events, workers  # noqa: E402
from buffers.consumers import FlushConsumer  # noqa: E402
from memfuse_project.embedded_pg import local_tenant_if_embedded, migrate_if_embedded  # noqa: E402
from memory import metrics_history, registry  # noqa: E402
from memory.api.auth import WebSocketAuthMiddleware  # noqa: E402
from memory.api.limits import BodySizeLimit  # noqa: E402
from memory.api.routing import websocket_urlpatterns  # noqa: E402
from memory.mcp.http import application as mcp_application  # noqa: E402


def _start_serving() -> None:
    migrate_if_embedded()
    local_tenant_if_embedded()
    registry.preload(documents=workers.should_run_in_process(sys.argv))
    workers.start_if_serving()
    metrics_history.start_if_serving(sys.argv)  # the dashboard's charts of the last hour
    # The importing thread serves no request: give back the pool connections it used (runserver's
    # migration check, the embedded database's migrate), or it would hold one for ever.
    connections.close_all()


try:
    asyncio.get_running_loop()
except RuntimeError:
    _start_serving()
else:
    # Imported inside a running event loop (uvicorn --workers N imports the app in each
    # worker's loop): Django refuses database work there, so it runs in a thread of its own.
    starter = threading.Thread(target=_start_serving, name="memfuse-start")
    starter.start()
    starter.join()


class APIHandler(ASGIHandler):
    """Django's ASGI handler with the API's middleware (``settings.API_MIDDLEWARE``) only.

    Django runs every sync middleware of an ASGI request through ``sync_to_async``: two thread
    hand-offs per middleware, on a thread created for each request. With the seven
    middlewares the admin needs, a health check cost ~5 ms of CPU, and under load each
    hand-off waits for the GIL behind the embedding thread. The REST API needs none of them
    (no sessions, cookies, CSRF or messages: it authenticates every request itself), so
    ``/api/`` gets a handler built with its own, shorter list.

    It also serves without asgiref's ``ThreadSensitiveContext``, which starts (and stops) a
    thread for every request to run its thread-sensitive calls. With no middleware left,
    those are only the request_started/finished signal receivers (``close_old_connections``,
    ``reset_queries``), which then run on asgiref's one shared thread; the views themselves
    run in the thread pool (``memory.api.base.ConcurrentAPIView``) and return their
    connections to the pool there.
    """

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"APIHandler serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async=False):
        # BaseHandler.load_middleware reads settings.MIDDLEWARE; swap the list in for the build.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full


class PathPrefixRouter:
    """Sends HTTP requests whose path starts with ``prefix`` to ``matched``, others to ``default``."""

    def __init__(self, prefix: str, matched, default):
        self.prefix, self.matched, self.default = prefix, matched, default

    async def __call__(self, scope, receive, send):
        app = self.matched if scope["path"].startswith(self.prefix) else self.default
        return await app(scope, receive, send)


class ServerLoopRegistration:
    """On the first connection of each event loop: remembers the loop (see ``buffers.events``) and
    gives it a default executor of ``MEMFUSE["ASGI_THREADS"]`` threads. Also answers the ASGI
    lifespan protocol: at shutdown it drains the flush workers (``workers.drain_at_shutdown``).

    The default executor runs the API's views (``memory.api.base.ConcurrentAPIView``) and the
    WebSocket consumers' blocking calls. Its size is set here, whatever the ASGI server, rather
    than through daphne's ``ASGI_THREADS`` variable, which uvicorn does not read.
    """

    def __init__(self, app):
        self.app = app
        self._loops: weakref.WeakSet = weakref.WeakSet()

    async def __call__(self, scope, receive, send):
        loop = asyncio.get_running_loop()
        if loop not in self._loops:
            self._loops.add(loop)
            events.register_server_loop(loop)
            loop.set_default_executor(
                ThreadPoolExecutor(max_workers=settings.MEMFUSE["ASGI_THREADS"], thread_name_prefix="asgi")
            )
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    async def lifespan(receive, send) -> None:
        """ASGI lifespan (uvicorn; daphne does not speak it and drains at exit instead)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, workers.drain_at_shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return


application = ServerLoopRegistration(
    ProtocolTypeRouter(
        {
            # /static/ (the admin's and the API docs' assets) served from the installed apps, with
            # no collectstatic step. Django's own ASGI static handler rather than WhiteNoise:
            # WhiteNoise's middleware is sync-only, and one sync middleware makes Django run every
            # request through one shared thread, serialising the API's concurrent views.
            # A body over MAX_REQUEST_BYTES is a 413 before Django reads it into a temporary file.
            # /mcp: the MCP tools over Streamable HTTP (memory.mcp.http), same process and pool.
            "http": BodySizeLimit(
                PathPrefixRouter(
                    "/api/",
                    APIHandler(),
                    PathPrefixRouter("/mcp", mcp_application, ASGIStaticFilesHandler(django_asgi_app)),
                )
            ),
            "websocket": AllowedHostsOriginValidator(WebSocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
            "channel": ChannelNameRouter({settings.BUFFERS["CHANNEL"]: FlushConsumer.as_asgi()}),
        }
    )
)

# Everything built so far (Django, the apps and URLconf, torch and the models: ~0.5 million
# objects) lives as long as the process. Move it out of reach of Python's cyclic garbage
# collector: each of its full passes walked all of it holding the GIL, a pause of ~0.35 s
# every few seconds under load (measured at 50-100 queries/s). Reference counting still
# frees these objects; only cycles among them would never be collected.
_ = get_resolver().url_patterns  # import the views now, so that they are frozen too
gc.freeze()
