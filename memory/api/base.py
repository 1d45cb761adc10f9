"""The base view of the API: DRF views that serve requests concurrently under ASGI."""

from __future__ import annotations

import time

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.core import signals
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.exception import response_for_exception
from django.db import close_old_connections, connections
from django.http import FileResponse, HttpResponse
from django.utils.log import log_response
from rest_framework.views import APIView

from memory import metrics

# Response bodies of a FileResponse handed to the ASGI server in chunks of this many bytes
# (Django's ``ASGIHandler.chunk_size``).
_ASGI_CHUNK_SIZE = 2**16


def _run_view_concurrently(view, request, *args, **kwargs):
    """Run a sync view in a worker thread; return its connections to the pool afterwards.

    ``thread_sensitive=False`` threads are not covered by Django's per-request connection
    clean-up, so the view's thread does it itself: otherwise every request would keep a pool
    connection until the thread ends.
    """
    close_old_connections()
    return _render_and_release(view, request, *args, **kwargs)


def _render_and_release(view, request, *args, **kwargs):
    """The view's rendered response; this thread's connections go back to the pool whatever
    the view does."""
    try:
        response = view(request, *args, **kwargs)
        if hasattr(response, "render"):
            response.render()
        return response
    finally:
        connections.close_all()


def _serve_whole(view, request, args, kwargs, handler_class) -> HttpResponse:
    """What Django's ASGI handler does for a request around a view, done in the view's thread:
    ``request_started``, the view, its rendering, an exception's response
    (``response_for_exception``: the 404/403/400 of Django's exceptions, else ``handler500``),
    the log line of a 4xx/5xx (``log_response``) and, for a response that is not streamed,
    ``response.close()`` (``request_finished``, before the body is sent). A streamed response
    is closed by the handler once sent, as Django does."""
    # request_started's receivers include close_old_connections: the view's thread needs no
    # other clean-up before the view.
    signals.request_started.send(sender=handler_class, scope=request.scope)
    try:
        response = _render_and_release(view, request, *args, **kwargs)
    except Exception as exc:
        response = response_for_exception(request, exc)
    response._resource_closers.append(request.close)
    response._handler_class = handler_class
    if isinstance(response, FileResponse):
        response.block_size = _ASGI_CHUNK_SIZE
    if response.status_code >= 400:
        log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
    if not response.streaming:
        response.close()
    return response


def _observe(cls, request, response, start: float) -> None:
    match = request.resolver_match
    metrics.REQUEST_SECONDS.labels(
        match.url_name if match is not None else cls.__name__, request.method, metrics.status_class(response.status_code)
    ).observe(time.perf_counter() - start)


class ConcurrentAPIView(APIView):
    """An ``APIView`` whose requests run in parallel under ASGI.

    Django runs a sync view under ASGI with ``sync_to_async(thread_sensitive=True)``: every
    sync view of the process shares one thread, so requests queue behind each other and the
    process serves one request at a time. This view is async to Django and runs the DRF view in
    asgiref's thread pool (``ASGI_THREADS`` threads) instead; the database pool bounds
    connections as before. Under WSGI (and the test client) it runs as a plain sync view.

    ``as_view()``'s function also carries ``serve_whole``, a coroutine function
    ``(request, resolver_match, handler_class) -> HttpResponse`` that serves the whole request
    in one hop to a worker thread (``_serve_whole``): ``memfuse_project.lifespan.APIHandler``
    calls it instead of Django's request cycle, which takes four hops (``request_started``,
    the view, the rendering of a rendered response, ``request_finished``).
    """

    @classmethod
    def as_view(cls, **initkwargs):
        view = super().as_view(**initkwargs)

        async def concurrent_view(request, *args, **kwargs):
            start = time.perf_counter()
            if isinstance(request, ASGIRequest):
                response = await sync_to_async(_run_view_concurrently, thread_sensitive=False)(view, request, *args, **kwargs)
            else:
                # WSGI and the test client: Django's own thread and connection handling.
                response = await sync_to_async(view, thread_sensitive=True)(request, *args, **kwargs)
            _observe(cls, request, response, start)
            return response

        async def serve_whole(request, match, handler_class) -> HttpResponse:
            start = time.perf_counter()
            response = await sync_to_async(_serve_whole, thread_sensitive=False)(
                view, request, match.args, match.kwargs, handler_class
            )
            _observe(cls, request, response, start)
            return response

        markcoroutinefunction(concurrent_view)
        concurrent_view.csrf_exempt = True
        concurrent_view.cls = cls
        concurrent_view.initkwargs = initkwargs
        concurrent_view.serve_whole = serve_whole
        return concurrent_view
