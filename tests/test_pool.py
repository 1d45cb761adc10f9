"""The database pool: its figures, and a 503 with Retry-After (never a hang or a 500) when exhausted."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import requests
from django.conf import settings
from django.db import OperationalError, connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper
from psycopg_pool import PoolTimeout
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from benchmarks.server import free_loopback_port
from memory.models import KeyScope, Message
from memory.services.api_keys import api_key_create
from runtime import pool
from tests.subprocesses import subprocess_env


def test_django_wraps_a_pool_timeout_as_operational_error(django_db_setup, django_db_blocker):
    """A request for a connection from a full pool raises django.db.OperationalError caused by PoolTimeout."""
    tiny = {"min_size": 1, "max_size": 1, "timeout": 0.3}
    settings_dict = {**connection.settings_dict, "OPTIONS": {**connection.settings_dict["OPTIONS"], "pool": tiny}}
    # A separate alias (outside the test's transaction): Django's postgres signals look it up.
    connections.settings["tiny-pool"] = settings_dict
    holder, waiter = connections["tiny-pool"], DatabaseWrapper(settings_dict, alias="tiny-pool")
    try:
        with django_db_blocker.unblock():
            holder.ensure_connection()  # takes the pool's only connection
            started = time.monotonic()
            with pytest.raises(OperationalError) as raised:
                waiter.ensure_connection()
            waited = time.monotonic() - started
            stats = pool.pool_stats("tiny-pool")
    finally:
        holder.close()
        holder.close_pool()
        del connections["tiny-pool"]
        del connections.settings["tiny-pool"]

    assert 0.25 < waited < 3
    assert isinstance(raised.value.__cause__, PoolTimeout)
    assert pool.is_pool_exhausted(raised.value)
    assert not pool.is_pool_exhausted(OperationalError("connection refused"))
    assert (stats["max_size"], stats["size"], stats["in_use"], stats["idle"], stats["requests_errors"]) == (1, 1, 1, 0, 1)


def test_pool_stats_show_the_connection_in_use(db):
    """The test's own connection (inside its transaction) is counted in use, within the configured bounds."""
    connection.ensure_connection()

    stats = pool.pool_stats()

    assert stats["enabled"] is True
    assert (stats["min_size"], stats["max_size"]) == (settings.DB_POOL["min_size"], settings.DB_POOL["max_size"])
    assert stats["in_use"] >= 1 and stats["size"] == stats["in_use"] + stats["idle"] <= stats["max_size"]
    assert stats["requests_total"] >= 1


# --- a real server whose pool is exhausted -------------------------------------------------------


TINY_POOL = {"DB_POOL_MIN_SIZE": "1", "DB_POOL_MAX_SIZE": "1", "DB_POOL_TIMEOUT": "0.5"}


def _serve(command: list[str], log, **env: str):
    """Start ``command`` (a server on the test database) and wait until its health check answers.

    Returns ``(process, url, health_status)``: the first status other than a refused connection.
    """
    port = free_loopback_port()
    server = subprocess.Popen(
        [arg.format(port=port) for arg in command],
        cwd=settings.BASE_DIR,
        env=subprocess_env(**env),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            return server, url, requests.get(f"{url}/api/v1/health", timeout=5).status_code
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def tiny_pool_server(tmp_path):
    """daphne serving the test database with a pool of one connection and a 0.5 s timeout."""
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", "memfuse_project.asgi:application"]
    server, url, status = _serve(command, tmp_path / "server.log", PRELOAD_MODELS="false", FLUSH_IN_PROCESS="off", **TINY_POOL)
    try:
        assert status == 200
        yield url
    finally:
        _stop(server)


@pytest.mark.django_db(transaction=True)
def test_runserver_keeps_no_pool_connection_outside_requests(tmp_path):
    """runserver's start-up work (migration check) gives its connection back: a one-connection pool still serves."""
    command = [sys.executable, "manage.py", "runserver", "127.0.0.1:{port}", "--noreload"]
    server, url, status = _serve(command, tmp_path / "server.log", PRELOAD_MODELS="false", FLUSH_IN_PROCESS="off", **TINY_POOL)
    try:
        assert status == 200
        assert requests.get(f"{url}/api/v1/health", timeout=5).status_code == 200
    finally:
        _stop(server)


def _admin_login(url: str, *, timeout: float) -> requests.Response:
    """Log in to the admin (a plain Django view, not DRF): reads ``auth_user``."""
    browser = requests.Session()
    browser.get(f"{url}/admin/login/", timeout=5)  # no database access: sets the CSRF cookie
    data = {"username": "x", "password": "y", "csrfmiddlewaretoken": browser.cookies["csrftoken"]}
    return browser.post(f"{url}/admin/login/", data=data, timeout=timeout)


def _hold_the_only_connection(url: str) -> threading.Thread:
    """An admin login that blocks on a locked ``auth_user`` while holding the server's connection."""
    thread = threading.Thread(target=_admin_login, args=(url,), kwargs={"timeout": 60})
    thread.start()
    return thread


def _wait_until_blocked() -> None:
    """Until some session of the test database waits for a lock (the held request)."""
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(**_conninfo(), autocommit=True) as probe:
            waiting = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()").fetchone()[0]
        if waiting:
            return
        assert time.monotonic() < deadline, "the server's request never blocked on the lock"
        time.sleep(0.05)


def _conninfo() -> dict:
    db = connection.settings_dict
    return {"host": db["HOST"] or "127.0.0.1", "port": db["PORT"] or 5432, "user": db["USER"], "dbname": db["NAME"]}


@pytest.mark.django_db(transaction=True)
def test_exhausted_pool_answers_503_with_retry_after(tiny_pool_server, alice_session, tenant_key):
    """With its only connection held, the server answers REST (a key to resolve too), admin and WebSocket with 503s, then recovers."""
    url = tiny_pool_server
    unresolved_key = api_key_create(scope=KeyScope.TENANT, tenant=alice_session.user.tenant, name="never used")[1]
    # The key resolved at the first connect stays in the server's key cache for the second.
    origin = {"origin": "http://127.0.0.1", "additional_headers": {"Authorization": f"Bearer {tenant_key}"}}
    socket_url = url.replace("http", "ws") + f"/ws/v1/sessions/{alice_session.pk}/"
    with ws_connect(socket_url, **origin) as ws, psycopg.connect(**_conninfo()) as locker:
        locker.execute("LOCK TABLE auth_user IN ACCESS EXCLUSIVE MODE")
        holder = _hold_the_only_connection(url)
        _wait_until_blocked()

        started = time.monotonic()
        rest = requests.get(f"{url}/api/v1/health", timeout=10)
        waited = time.monotonic() - started
        admin = _admin_login(url, timeout=10)
        # Resolved before its body is read (memory.api.auth.HTTPAuthMiddleware): a query too.
        unresolved = requests.post(f"{url}/api/v1/users", json={"name": "x"}, headers={"Authorization": f"Bearer {unresolved_key}"}, timeout=10)
        ws.send(json.dumps({"type": "messages.add", "request_id": 7, "messages": [{"role": "user", "content": "hi"}]}))
        frame = json.loads(ws.recv(timeout=10))
        with ws_connect(socket_url, **origin) as refused:
            refused_frame = json.loads(refused.recv(timeout=10))
            with pytest.raises(ConnectionClosed):  # the server closes after the error frame
                refused.recv(timeout=10)
            close_code = refused.close_code

        locker.rollback()  # releases the lock: the held request ends and frees the connection
        holder.join(timeout=30)

    assert rest.status_code == 503 and rest.headers["Retry-After"] == "1"
    assert 0.4 < waited < 5
    assert rest.json() == {
        "status": "error",
        "code": 503,
        "data": None,
        "message": rest.json()["message"],
        "errors": [{"field": None, "message": rest.json()["message"]}],
    }
    assert "busy" in rest.json()["message"]
    assert admin.status_code == 503 and admin.headers["Retry-After"] == "1" and admin.json()["code"] == 503
    assert unresolved.status_code == 503 and unresolved.headers["Retry-After"] == "1" and unresolved.json()["code"] == 503
    assert (frame["type"], frame["request_id"], frame["error"]["code"]) == ("error", 7, 503)
    assert refused_frame["error"]["code"] == 503 and close_code == 4503
    assert not holder.is_alive()
    assert requests.get(f"{url}/api/v1/health", timeout=10).status_code == 200
    assert not Message.objects.filter(session=alice_session).exists()  # the refused add stored nothing


def _logged(exc: BaseException) -> str:
    """The line ``django.request``'s configured filters let through for a 503 logged with ``exc``."""
    import logging

    record = logging.LogRecord("django.request", logging.ERROR, __file__, 1, "%s: %s", ("Service Unavailable", "/admin/"), (type(exc), exc, exc.__traceback__))
    assert logging.getLogger("django.request").filter(record)
    return logging.Formatter("%(message)s").format(record)


def test_a_refusal_for_an_unreachable_database_is_logged_as_one_line():
    """An unreachable database's error reaches django.request's log as one line naming the cause; other errors keep their traceback."""
    try:
        try:
            psycopg.connect("host=127.0.0.1 port=1 connect_timeout=2")
        except psycopg.OperationalError as exc:
            raise OperationalError(str(exc)) from exc
    except OperationalError as exc:
        line = _logged(exc)
    assert "Traceback" not in line and "\n" not in line
    assert line.startswith("Service Unavailable: /admin/ (") and "127.0.0.1" in line
    try:
        raise ValueError("a bug")
    except ValueError as exc:
        assert "Traceback" in _logged(exc)
