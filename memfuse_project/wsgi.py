"""WSGI entry point (HTTP only; WebSocket needs the ASGI application)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

application = get_wsgi_application()

from memfuse_project.embedded_pg import migrate_if_embedded  # noqa: E402
from memory import registry  # noqa: E402

migrate_if_embedded()
registry.preload()
