"""The base view of the API: DRF views that serve requests concurrently under ASGI."""

from __future__ import annotations

import time

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections, connections
from rest_framework.views import APIView

from memory import metrics


def _run_view_concurrently(view, request, *args, **kwargs):
    """Run a sync view in a worker thread; return its connections to the pool afterwards.

    ``thread_sensitive=False`` threads are not covered by Django's per-request connection
    clean-up, so the view's thread does it itself: otherwise every request would keep a pool
    connection until the thread ends.
    """
    close_old_connections()
    try:
        response = view(request, *args, **kwargs)
        if hasattr(response, "render"):
            response.render()
        return response
    finally:
        connections.close_all()


class ConcurrentAPIView(APIView):
    """An ``APIView`` whose requests run in parallel under ASGI.

    Django runs a sync view under ASGI with ``sync_to_async(thread_sensitive=True)``: every
    sync view of the process shares one thread, so requests queue behind each other and the
    process serves one request at a time. This view is async to Django and runs the DRF view in
    asgiref's thread pool (``ASGI_THREADS`` threads) instead; the database pool bounds
    connections as before. Under WSGI (and the test client) it runs as a plain sync view.
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
            match = request.resolver_match
            metrics.REQUEST_SECONDS.labels(
                match.url_name if match is not None else cls.__name__, request.method, metrics.status_class(response.status_code)
            ).observe(time.perf_counter() - start)
            return response

        markcoroutinefunction(concurrent_view)
        concurrent_view.csrf_exempt = True
        concurrent_view.cls = cls
        concurrent_view.initkwargs = initkwargs
        return concurrent_view
