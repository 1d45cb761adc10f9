"""ASGI entry point: HTTP through Django, WebSocket through Channels.

Loading this module means the process serves: the model registry is filled before the first
request, whatever ASGI server imported us (daphne, uvicorn, runserver).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")

# Build the HTTP app first: it calls django.setup(), which must precede any model import.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from memfuse_project.embedded_pg import migrate_if_embedded  # noqa: E402
from memory import registry  # noqa: E402

migrate_if_embedded()
registry.get_embedder()

application = ProtocolTypeRouter({"http": django_asgi_app})
