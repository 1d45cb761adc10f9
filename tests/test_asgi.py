"""The ASGI application sizes the serving loop's thread pool (``MEMFUSE["ASGI_THREADS"]``) whatever the server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from channels.testing import HttpCommunicator


@pytest.fixture
def application(django_db_setup, django_db_blocker):
    """The project's ASGI application, imported once the test database exists."""
    with django_db_blocker.unblock():
        from memfuse_project.asgi import application
    return application


@pytest.mark.django_db(transaction=True)
async def test_first_request_gives_the_loop_an_executor_of_asgi_threads(application, settings):
    """After the first request, blocking work of this loop runs on exactly ASGI_THREADS threads of ours."""
    settings.MEMFUSE = {**settings.MEMFUSE, "ASGI_THREADS": 3}
    response = await HttpCommunicator(application, "GET", "/api/v1/health").get_response(timeout=30)
    assert response["status"] == 200

    loop = asyncio.get_running_loop()

    def blocking() -> str:
        time.sleep(0.05)
        return threading.current_thread().name

    names = await asyncio.gather(*(loop.run_in_executor(None, blocking) for _ in range(12)))

    assert len(set(names)) == 3
    assert all(name.startswith("asgi") for name in names)
