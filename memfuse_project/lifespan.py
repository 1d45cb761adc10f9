"""The serving side of the ASGI application: its start-up and shutdown, and the API's handler.

``memfuse_project.asgi`` composes the application from these parts; nothing here runs at
import. ``ServerLoopRegistration`` runs the serving start-up (``memfuse_project.serving``) at the
ASGI lifespan's startup, or before the first connection under a server that does not speak
lifespan (daphne), off the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import Resolver404, get_resolver, set_script_prefix, set_urlconf

from buffers import events, workers
from memfuse_project import serving
from runtime import roles

logger = logging.getLogger(__name__)

_frozen = False


def start_serving() -> None:
    """The serving start-up (``serving.start``), then the garbage collector's freeze, once.

    Everything built by then (Django, the apps and URLconf, torch and the models: about half
    a million objects) lives as long as the process. Moving it out of reach of Python's cyclic
    garbage collector keeps each of its full passes from walking all of it while holding the
    GIL, a pause of a good fraction of a second every few seconds under load. Reference
    counting still frees these objects; only cycles among them would never be collected.
    """
    global _frozen
    serving.start()
    if not _frozen and roles.role() is not None:
        _ = get_resolver().url_patterns  # import the views now, so that they are frozen too
        gc.freeze()
        _frozen = True


class APIHandler(ASGIHandler):
    """Django's ASGI handler with the API's middleware (``settings.API_MIDDLEWARE``) only.

    Django runs every sync middleware of an ASGI request through ``sync_to_async``: two thread
    hand-offs per middleware, on a thread created for each request. With the middlewares
    the admin needs, that is most of a health check's CPU time, and under load each hand-off
    waits for the GIL behind the embedding thread. The REST API needs none of them
    (no sessions, cookies, CSRF or messages: it authenticates every request itself), so
    ``/api/`` gets a handler built with its own, shorter list.

    It also serves without asgiref's ``ThreadSensitiveContext``, which starts (and stops) a
    thread for every request to run its thread-sensitive calls. With no middleware, a request
    to a REST endpoint (``memory.api.base.ConcurrentAPIView``) is served whole in one thread
    of the pool, its request_started/finished signal receivers (``close_old_connections``,
    ``reset_queries``) included (``handle``); any other runs them on asgiref's one shared
    thread.
    """

    _whole_in_thread = False  # no middleware: a REST request may skip Django's request cycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"APIHandler serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """Django's ``ASGIHandler.handle``, but a request to a ``ConcurrentAPIView`` (every REST
        endpoint) is served whole in one hop to a worker thread (its ``serve_whole``): the
        signals, the view, its rendering and its error handling, with no middleware to run
        between them. Other paths (the schema pages, an unknown URL) go Django's way."""
        match = self._resolve(scope) if self._whole_in_thread else None
        serve_whole = getattr(match.func, "serve_whole", None) if match is not None else None
        if serve_whole is None:
            return await super().handle(scope, receive, send)
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            await signals.request_started.asend(sender=self.__class__, scope=scope)
            body_file.close()
            await self.send_response(error_response, send)
            await sync_to_async(error_response.close)()
            return
        set_urlconf(settings.ROOT_URLCONF)
        request.resolver_match = match

        async def process_request():
            response = await serve_whole(request, match, self.__class__)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client left while it was sent
            return response

        # As Django's handler: a client that leaves cancels the sending of the answer (a
        # streamed export stops); the view's thread finishes its work either way.
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            if response.streaming:  # a response not streamed was closed in the view's thread
                await sync_to_async(response.close)()
        body_file.close()

    @staticmethod
    def _resolve(scope):
        """The URL's ``ResolverMatch`` (``request.path_info`` as ``ASGIRequest`` works it out), or
        ``None`` for an unknown URL."""
        script_name = get_script_prefix(scope)
        path_info = scope["path"].removeprefix(script_name) if script_name else scope["path"]
        try:
            return get_resolver().resolve(path_info)
        except Resolver404:
            return None

    def load_middleware(self, is_async=False):
        # BaseHandler.load_middleware reads settings.MIDDLEWARE; swap the list in for the build.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full
        self._whole_in_thread = not settings.API_MIDDLEWARE


class PathPrefixRouter:
    """Sends HTTP requests whose path starts with ``prefix`` to ``matched``, others to ``default``."""

    def __init__(self, prefix: str, matched, default):
        self.prefix, self.matched, self.default = prefix, matched, default

    async def __call__(self, scope, receive, send):
        app = self.matched if scope["path"].startswith(self.prefix) else self.default
        return await app(scope, receive, send)


class ServerLoopRegistration:
    """On the first connection of each event loop: remembers the loop (see ``buffers.events``) and
    gives it a default executor of ``MEMFUSE["ASGI_THREADS"]`` threads. Before the first
    connection (the lifespan's startup, where the server speaks it) it declares a ``WEB``
    process when a server runs it (``runtime.roles``: a lifespan scope, or ``loaded_by_server``,
    the application imported before Django started, as daphne and uvicorn do) and no entry
    point declared a role already, then runs the serving start-up (``start_serving``). An
    application imported once Django runs (``runserver`` declares its own role; tests, with
    none) starts only what a declared role asks for. Also answers the ASGI lifespan protocol:
    a start-up that fails there (a model that does not load) stops the server, and at shutdown
    it drains the flush workers (``workers.drain_at_shutdown``).

    The default executor runs the API's views (``memory.api.base.ConcurrentAPIView``) and the
    WebSocket consumers' blocking calls. Its size is set here, whatever the ASGI server, rather
    than through daphne's ``ASGI_THREADS`` variable, which uvicorn does not read.
    """

    def __init__(self, app, *, loaded_by_server: bool):
        self.app = app
        self.loaded_by_server = loaded_by_server
        self._loops: weakref.WeakSet = weakref.WeakSet()
        self._started = False

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
        if not self._started:
            await self.start(server=self.loaded_by_server)
        return await self.app(scope, receive, send)

    async def start(self, *, server: bool) -> None:
        """Declare a ``WEB`` process when ``server`` and no entry point declared a role, then
        run the serving start-up once. Raises what the start-up raises (a model that fails
        to load)."""
        if server and roles.role() is None:
            # On the loop's thread, before the start-up's thread allocates: the arena cap
            # (runtime.heap.limit_malloc_arenas) then covers every thread but this one.
            roles.declare(roles.WEB)
        # Database work: in a thread, never on the loop. Concurrent first connections all
        # wait for the one start-up (serving.start holds a lock).
        await asyncio.get_running_loop().run_in_executor(None, start_serving)
        self._started = True

    async def lifespan(self, receive, send) -> None:
        """ASGI lifespan (uvicorn; daphne does not speak it and drains at exit instead). A
        start-up that fails answers ``lifespan.startup.failed``, which stops the server."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start(server=True)
                except Exception as exc:
                    logger.exception("the serving start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, workers.drain_at_shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return
