"""WSGI entry point (HTTP only; WebSocket needs the ASGI application).

Imported before Django starts (gunicorn), it declares a ``WEB`` process
(``memfuse_project.serving``), so that ``MemoryConfig.ready()`` loads the models; the rest of
the start-up (``serving.start``: the embedded database and its migrations, the flush workers)
runs before the first request.
"""

import os
import threading

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

from django.apps import apps  # noqa: E402

from memfuse_project import serving  # noqa: E402

if not apps.ready:
    serving.declare(serving.WEB)

from django.core.wsgi import get_wsgi_application  # noqa: E402


class StartingWSGIApplication:
    """Django's WSGI application, run after ``serving.start()``: WSGI has no start-up event,
    so the first request of the process runs it (the others wait for it)."""

    def __init__(self, app) -> None:
        self.app = app
        self._started = threading.Event()

    def __call__(self, environ, start_response):
        if not self._started.is_set():
            serving.start()
            self._started.set()
        return self.app(environ, start_response)


application = StartingWSGIApplication(get_wsgi_application())
