"""The service as a subprocess on a free loopback port, and the resident memory of its processes.

The benchmarks, the screenshots and the network tests start the server through
``ServerProcess``: uvicorn as the README's production command, or ``manage.py runserver``
(daphne's, the quick start), with this process's environment and interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
from django.conf import settings

from benchmarks.errors import BenchError

HEALTH_PATH = "/api/v1/health"
SERVER_START_TIMEOUT = 120.0  # s: migrations and the model load happen before the first answer
SERVERS = ("uvicorn", "runserver")
BENCH_RATE_LIMIT = "1000000/minute"


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_ok(url: str, *, timeout: float) -> bool:
    """Whether ``GET {url}/api/v1/health`` answers 200 within ``timeout`` s."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + HEALTH_PATH, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def health(url: str) -> dict | None:
    """The ``data`` of ``GET {url}/api/v1/health`` (status, version, database), None when it does not answer."""
    try:
        return requests.get(url.rstrip("/") + HEALTH_PATH, timeout=5).json()["data"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None


def uvicorn_command(port: int, *args: str) -> list[str]:
    """The README's production server as an argv: uvicorn on ``127.0.0.1:port`` with uvloop,
    httptools, the ASGI lifespan (the flush drain at shutdown) and no access log, plus ``args``."""
    return [
        sys.executable, "-m", "uvicorn", "memfuse_project.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
        "--no-access-log", *args,
    ]  # fmt: skip


def bench_rate_limit() -> str:
    """``API_RATE_LIMIT`` of a server the bench starts: the environment's when set, else
    ``BENCH_RATE_LIMIT``. The query bench sends every query with one tenant key, and the
    default 6000/minute is 100 per second: a server that answers faster would turn the closed
    loop into 429s. The limiter still counts every request (its cost is measured)."""
    return os.environ.get("API_RATE_LIMIT") or BENCH_RATE_LIMIT


class ServerProcess:
    """The service on ``127.0.0.1:<free port>`` as a subprocess.

    ``kind`` ``"runserver"``: ``manage.py runserver --noreload`` (daphne's, as in the README's
    quick start; ``args`` are added to its command line). ``"uvicorn"``: ``uvicorn
    memfuse_project.asgi:application`` with uvloop and httptools, one process, no access log,
    as the README's production command. Same environment (plus ``env``) and interpreter as
    this process; its stdout and stderr go to ``log_path``. ``stop()`` sends SIGTERM and
    waits, so the flush workers' graceful drain runs. Raises ``ValueError`` for another kind.
    """

    def __init__(
        self, *, log_path: Path, env: dict | None = None, args: Sequence[str] = (), kind: str = "runserver"
    ) -> None:
        if kind not in SERVERS:
            raise ValueError(f"kind must be one of {', '.join(SERVERS)}, not {kind!r}")
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.kind = kind
        self.url = ""
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = SERVER_START_TIMEOUT) -> str:
        """Start the server and wait for its health endpoint; returns its base URL.

        Raises ``BenchError`` when it exits or does not answer within ``timeout`` s.
        """
        port = free_loopback_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log_path.open("wb") as log:
            # Its own process group: a Ctrl-C on the bench reaches the server only through stop().
            self._process = subprocess.Popen(
                self._command(port),
                cwd=settings.BASE_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(f"server exited with code {self._process.returncode}; see {self.log_path}")
            if health_ok(self.url, timeout=2):
                return self.url
            time.sleep(0.5)
        self.stop()
        raise BenchError(f"server not healthy after {timeout:.0f} s; see {self.log_path}")

    def _command(self, port: int) -> list[str]:
        if self.kind == "uvicorn":
            return uvicorn_command(port, *self.args)
        return [sys.executable, str(settings.BASE_DIR / "manage.py"), "runserver", f"127.0.0.1:{port}", "--noreload", *self.args]

    def stop(self) -> dict:
        """SIGTERM, then wait for the drain (``FLUSH_SHUTDOWN_SECONDS`` + margin) before SIGKILL.

        Returns ``{"exit_code", "stop_seconds", "killed", "log", "log_error_lines"}`` (``{}``
        when it is not running).
        """
        process = self._process
        if process is None:
            return {}
        started = time.monotonic()
        killed = False
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=settings.BUFFERS["SHUTDOWN_SECONDS"] + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                killed = True
        self._process = None
        return {
            "exit_code": process.returncode,
            "stop_seconds": round(time.monotonic() - started, 2),
            "killed": killed,
            "log": str(self.log_path),
            "log_error_lines": self._count_log_errors(),
        }

    def _count_log_errors(self) -> int:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if " ERROR " in line or line.startswith("Traceback"))


@contextmanager
def serving(url: str | None, *, log_path: Path, log, **server: object) -> Iterator[tuple[str, ServerProcess | None]]:
    """``(base URL, the server started or None)``: ``url`` when given, else a ``ServerProcess``
    (``server``: its ``env``, ``args``, ``kind``) started here and stopped on leaving.

    ``log`` receives one line naming the server's log file. Raises ``BenchError`` as
    ``ServerProcess.start`` does.
    """
    url = (url or "").rstrip("/")
    if url:
        yield url, None
        return
    process = ServerProcess(log_path=log_path, **server)
    log(f"starting {process.kind} (log: {log_path})")
    try:
        yield process.start(), process
    finally:
        process.stop()


@contextmanager
def bench_tenant(name: str, *, operator: bool = False) -> Iterator[tuple[str, str | None]]:
    """``(tenant API key, operator API key or None)``: a tenant ``name`` made in this process's
    database with a key of its own, and an operator key when ``operator`` (to read a server's
    ``GET /api/v1/admin/stats``). On leaving, the tenant is deleted with all it holds, and the
    operator key with it."""
    from memory.models import KeyScope, Tenant
    from memory.services.api_keys import api_key_create
    from memory.services.tenants import tenant_create

    tenant = tenant_create(name=name)
    key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name=name)[1]
    operator_key, operator_secret = api_key_create(scope=KeyScope.OPERATOR, name=name) if operator else (None, None)
    try:
        yield key, operator_secret
    finally:
        Tenant.objects.filter(pk=tenant.pk).delete()
        if operator_key is not None:
            operator_key.delete()


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` in MB, None without a pid."""
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def children_rss_mb(pid: int | None) -> tuple[int, float] | None:
    """``(count, MB)``: the child processes of ``pid`` (its inference processes) and the sum
    of their resident memory (pages they share with each other count once per process);
    None without a pid."""
    if pid is None:
        return None
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return len(children), round(sum(child.memory_info().rss for child in children) / 2**20, 1)


def memory_mb(process) -> dict | None:
    """``{"rss", "pss", "uss"}`` of a ``psutil.Process`` in MB, None when it is gone: resident,
    proportional (a page that n processes map counts 1/n in each) and unique (its pages alone).
    Summed over a server's processes, RSS counts the pages they share once per process (the
    forkserver's imports, in every inference process) and PSS counts them once."""
    import psutil

    try:
        figures = process.memory_full_info()
    except psutil.Error:
        return None
    return {kind: round(getattr(figures, kind) / 2**20, 1) for kind in ("rss", "pss", "uss")}


def tree_pss_mb(pid: int | None) -> float | None:
    """The proportional set size of process ``pid`` and all its descendants, summed, in MB:
    what the server holds in all (see ``memory_mb``); None without a pid."""
    if pid is None:
        return None
    import psutil

    server = psutil.Process(pid)
    figures = [memory_mb(process) for process in (server, *server.children(recursive=True))]
    return round(sum(f["pss"] for f in figures if f is not None), 1)


def cpu_seconds(pid: int | None) -> dict | None:
    """CPU time (user + system, s) used so far by process ``pid`` (``web``), by its child
    processes (``inference``: the query and flush models), and by every process of this host
    named ``postgres`` (``postgres_local``: the database's, when it runs here; 0 when it does
    not). None without a pid. Differences of two readings give a phase's CPU by process group.
    """
    if pid is None:
        return None
    import psutil

    def used(process) -> float:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone meanwhile
            return 0.0
        return times.user + times.system

    server = psutil.Process(pid)
    local_postgres = 0.0
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            local_postgres += used(process)
    return {
        "web": used(server),
        "inference": sum(used(child) for child in server.children(recursive=True)),
        "postgres_local": local_postgres,
    }
