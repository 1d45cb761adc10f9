"""WSGI entry point (HTTP only; WebSocket needs the ASGI application).

Importing it builds the application and starts nothing. WSGI has no start-up event, so the
process's first request runs the serving start-up (``memfuse_project.serving.serve``): it
declares a ``WEB`` process when a server (gunicorn) imported this module before Django
started, then loads the models, starts the embedded database and the flush workers.
"""

import os
import threading

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

from django.apps import apps  # noqa: E402

# Imported before Django starts: a WSGI server loads this application (see asgi.py).
loaded_by_server = not apps.ready

from django.core.wsgi import get_wsgi_application  # noqa: E402

from memfuse_project import serving  # noqa: E402
from runtime import roles  # noqa: E402


class StartingWSGIApplication:
    """Django's WSGI application, run after the serving start-up: the first request of the
    process runs it (the others wait for it)."""

    def __init__(self, app, *, loaded_by_server: bool) -> None:
        self.app = app
        self.loaded_by_server = loaded_by_server
        self._started = threading.Event()

    def __call__(self, environ, start_response):
        if not self._started.is_set():
            if self.loaded_by_server:
                serving.serve(roles.WEB)
            else:
                serving.start()
            self._started.set()
        return self.app(environ, start_response)


application = StartingWSGIApplication(get_wsgi_application(), loaded_by_server=loaded_by_server)
