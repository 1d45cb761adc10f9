"""The ASGI application: the serving loop's thread pool (``MEMFUSE["ASGI_THREADS"]``) whatever the
server, its start-up and shutdown, and a REST request served whole in one thread of that pool."""

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


# Counts the arena caps, then imports the application as a server does (before Django starts),
# then runs the ASGI lifespan's startup and shutdown.
_LIFESPAN_PROBE = """
import asyncio, json, multiprocessing, threading
import runtime.heap
caps = []
runtime.heap.limit_malloc_arenas = lambda: caps.append(1) or True
from asgiref.testing import ApplicationCommunicator

import memfuse_project.asgi as asgi
from memfuse_project import serving
from memory.inference import registry
from runtime import roles

report = {"at_import": {
    "role": roles.role(), "caps": len(caps), "started": serving._started,
    "models": {name: value is not None for name, value in registry.stats().items()},
    "children": len(multiprocessing.active_children()),
}}

async def lifespan():
    app = ApplicationCommunicator(asgi.application, {"type": "lifespan", "asgi": {"version": "3.0"}})
    await app.send_input({"type": "lifespan.startup"})
    assert (await app.receive_output(timeout=120))["type"] == "lifespan.startup.complete"
    report["after_startup"] = {
        "role": roles.role(), "caps": len(caps), "started": serving._started,
        "models": {name: value is not None for name, value in registry.stats().items()},
    }
    await app.send_input({"type": "lifespan.shutdown"})
    assert (await app.receive_output(timeout=60))["type"] == "lifespan.shutdown.complete"

asyncio.run(lifespan())
print(json.dumps(report))
"""


@pytest.mark.django_db(transaction=True)
def test_importing_the_application_starts_nothing_and_the_lifespan_starts_the_server():
    """Imported as a server imports it, asgi.py declares no role, caps no malloc arena, loads
    no model and starts no process; the lifespan's startup then declares a web process, caps
    the arenas once and loads its query model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.subprocesses import subprocess_env

    env = subprocess_env(DJANGO_SETTINGS_MODULE="tests.settings", FLUSH_IN_PROCESS="off", QUERY_EMBEDDING="thread")
    env.pop("MALLOC_ARENA_MAX", None)
    probe = subprocess.run(
        [sys.executable, "-c", _LIFESPAN_PROBE],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])

    assert report["at_import"] == {
        "role": None,
        "caps": 0,
        "started": False,
        "models": dict.fromkeys(report["at_import"]["models"], False),
        "children": 0,
    }
    after = report["after_startup"]
    assert after["role"] == "web" and after["caps"] == 1 and after["started"] is True
    assert after["models"]["query_embedding"] is True and after["models"]["background_embedding"] is False


@pytest.mark.django_db(transaction=True)
async def test_a_start_up_that_fails_at_the_lifespan_stops_the_server(application, settings, monkeypatch, tmp_path):
    """A model that does not load at the lifespan's startup (a bad RERANKER_MODEL_PATH) is
    answered with lifespan.startup.failed naming the error, so that the server stops rather
    than serve without it."""
    from asgiref.testing import ApplicationCommunicator

    from memory.inference import registry

    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": str(tmp_path / "missing"), "PRELOAD_MODELS": True}
    monkeypatch.setattr(registry, "_reranker", None)

    lifespan = ApplicationCommunicator(application, {"type": "lifespan", "asgi": {"version": "3.0"}})
    await lifespan.send_input({"type": "lifespan.startup"})
    answer = await lifespan.receive_output(timeout=60)

    assert answer["type"] == "lifespan.startup.failed"
    assert "RerankerLoadError" in answer["message"] and "not a directory" in answer["message"]


@pytest.mark.django_db(transaction=True)
async def test_a_rest_request_runs_its_signals_and_view_in_one_pool_thread(application, monkeypatch):
    """A REST request through the application: request_started, the view and request_finished
    once each, all in the same thread of the pool, never on the event loop's thread."""
    from django.core.signals import request_finished, request_started

    from memory.api.views import HealthView

    threads: list[tuple[str, str]] = []

    def record(what: str):
        def receiver(**kwargs):
            threads.append((what, threading.current_thread().name))

        return receiver

    started, finished = record("started"), record("finished")
    get = HealthView.get

    def recorded_get(self, request):
        threads.append(("view", threading.current_thread().name))
        return get(self, request)

    monkeypatch.setattr(HealthView, "get", recorded_get)
    request_started.connect(started)
    request_finished.connect(finished)
    try:
        response = await HttpCommunicator(application, "GET", "/api/v1/health").get_response(timeout=30)
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)

    assert response["status"] == 200
    assert [what for what, _ in threads] == ["started", "view", "finished"]
    assert len({name for _, name in threads}) == 1
    assert threads[0][1] != threading.current_thread().name


@pytest.mark.django_db(transaction=True)
async def test_an_unexpected_error_of_a_rest_view_is_the_500_envelope(application, monkeypatch):
    """A REST view that raises something unexpected answers Django's handler500 through the
    application too: a 500 in the envelope, details left to the log."""
    import json

    from memory.api.views import HealthView

    def boom(self, request):
        raise RuntimeError("boom")

    monkeypatch.setattr(HealthView, "get", boom)
    response = await HttpCommunicator(application, "GET", "/api/v1/health").get_response(timeout=30)

    assert response["status"] == 500
    body = json.loads(response["body"])
    assert body["status"] == "error" and body["code"] == 500 and body["message"] == "Internal server error"
