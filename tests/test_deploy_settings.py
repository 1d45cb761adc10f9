"""Safe by default: the SECRET_KEY in both modes, and ``manage.py check --deploy`` for the documented production settings.

Settings are read once per process, so each case runs in a subprocess with the environment
under test (the product's settings module, not the suite's).
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from runtime.embedded_pg import embedded_secret_key, ensure_server, socket_host, stop_server
from tests.subprocesses import subprocess_env

# The production configuration of docs/operations.md ("Deploy"), besides DATABASE_URL and SECRET_KEY.
PRODUCTION = {
    "DEBUG": "off",
    "ALLOWED_HOSTS": "memory.example.com",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
    "SECURE_SSL_REDIRECT": "on",
    "SESSION_COOKIE_SECURE": "on",
    "CSRF_COOKIE_SECURE": "on",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "on",
    "SECURE_HSTS_PRELOAD": "on",
    "CSRF_TRUSTED_ORIGINS": "https://memory.example.com",
}
STRONG_KEY = "k3Y-" + "aZ09_-xQ" * 8  # 68 characters, many distinct


def product_env(**extra: str) -> dict:
    """The test database's environment with the product's settings module and no SECRET_KEY, plus ``extra``."""
    env = subprocess_env(DJANGO_SETTINGS_MODULE="memfuse_project.settings", **extra)
    for name in ("SECRET_KEY", "SECRET_KEY_FILE", *PRODUCTION):
        if name not in extra:
            env.pop(name, None)
    return env


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120)


PRINT_KEY = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"


def test_without_secret_key_a_database_url_deployment_refuses_to_start(db):
    """DATABASE_URL and no SECRET_KEY: settings raise ImproperlyConfigured naming SECRET_KEY; nothing starts."""
    result = run(PRINT_KEY, product_env())

    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set" in result.stderr
    assert result.stdout == ""


def test_secret_key_comes_from_the_environment_or_a_file(db, tmp_path):
    """SECRET_KEY, or SECRET_KEY_FILE naming a file that holds it (a Docker secret)."""
    key_file = tmp_path / "key"
    key_file.write_text(STRONG_KEY + "\n")

    assert run(PRINT_KEY, product_env(SECRET_KEY="from-the-env-" + "x" * 40)).stdout.strip() == "from-the-env-" + "x" * 40
    assert run(PRINT_KEY, product_env(SECRET_KEY_FILE=str(key_file))).stdout.strip() == STRONG_KEY


def test_embedded_secret_key_is_made_once_private_and_kept(tmp_path):
    """embedded_secret_key writes 64 random characters to <dir>/secret-key (0600) and returns them again after."""
    first = embedded_secret_key(tmp_path)

    assert len(first) == 64 and len(set(first)) > 20
    assert (tmp_path / "secret-key").stat().st_mode & 0o777 == 0o600
    assert embedded_secret_key(tmp_path) == first
    other = tmp_path / "other"
    other.mkdir()
    assert embedded_secret_key(other) != first


START_AND_PRINT_KEY = (
    "import django; django.setup(); from runtime.embedded_pg import start_if_embedded; "
    "start_if_embedded(); from django.conf import settings; print(settings.SECRET_KEY)"
)


def test_importing_the_settings_starts_nothing(tmp_path):
    """No DATABASE_URL: importing the settings and starting Django only read the environment (no data folder appears)."""
    data_dir = tmp_path / "pg"
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "SECRET_KEY", "SECRET_KEY_FILE"}}
    env.update(DJANGO_SETTINGS_MODULE="memfuse_project.settings", EMBEDDED_PG_DIR=str(data_dir))
    script = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default']['HOST'])"

    result = run(script, env)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(data_dir / "socket") and not data_dir.exists()


def test_the_embedded_default_generates_its_secret_key_in_its_data_folder():
    """No DATABASE_URL, no SECRET_KEY: two processes starting one data folder share one generated key, kept there."""
    folder = Path(tempfile.mkdtemp(prefix="memfuse-key-"))  # see test_database_restart.own_postgres
    data_dir = folder / "pg"
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "SECRET_KEY", "SECRET_KEY_FILE"}}
    env.update(DJANGO_SETTINGS_MODULE="memfuse_project.settings", EMBEDDED_PG_DIR=str(data_dir))
    try:
        first, second = (run(START_AND_PRINT_KEY, env) for _ in range(2))
    finally:
        stop_server(data_dir)
        key_file = data_dir / "secret-key"
        stored = key_file.read_text().strip() if key_file.exists() else None
        shutil.rmtree(folder, ignore_errors=True)

    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() == second.stdout.strip() == stored
    assert len(stored) == 64 and "dev" not in stored


# --- the embedded server's socket ------------------------------------------------------------------


@contextmanager
def embedded_server(folder_name_length: int):
    """An embedded server whose data folder's path is at least ``folder_name_length`` characters
    long: ``(data_dir, {"host", "port"})``; stopped and deleted after, with its socket's alias.

    Under ``tempfile.mkdtemp`` (see test_database_restart.own_postgres)."""
    folder = Path(tempfile.mkdtemp(prefix="memfuse-socket-"))
    data_dir = folder / ("d" * max(folder_name_length - len(str(folder)) - 4, 1)) / "pg"
    data_dir.parent.mkdir()
    try:
        server = ensure_server(data_dir)
        yield data_dir, server
    finally:
        stop_server(data_dir)
        alias = socket_host(data_dir)
        if alias.is_symlink():
            shutil.rmtree(alias.parent, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def assert_private(path: Path, owner: int) -> None:
    info = path.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == owner, (path, oct(info.st_mode), info.st_uid)


def listen_addresses(server: dict) -> str:
    with psycopg.connect(host=server["host"], port=server["port"], user="postgres", dbname="postgres") as connection:
        return connection.execute("SHOW listen_addresses").fetchone()[0]


def test_the_embedded_server_listens_only_on_a_socket_in_a_private_folder_of_its_data_folder():
    """The socket is in <data>/socket, 0700 like the data folder, and the server listens on no TCP address."""
    with embedded_server(40) as (data_dir, server):
        owner = data_dir.stat().st_uid
        pidfile = (data_dir / "postmaster.pid").read_text().splitlines()
        assert Path(server["host"]) == Path(pidfile[4]) == data_dir / "socket"
        assert_private(data_dir, owner)
        assert_private(data_dir / "socket", owner)
        assert (data_dir / "socket" / ".s.PGSQL.5432").is_socket()
        assert pidfile[5] == "" and listen_addresses(server) == ""


def test_a_data_folder_too_long_for_a_socket_path_gets_a_private_short_alias():
    """A data folder too long for a socket path: the server is reached through a symlink in a 0700 folder of its user; the socket stays in <data>/socket."""
    with embedded_server(120) as (data_dir, server):
        owner = data_dir.stat().st_uid
        alias = Path(server["host"])
        assert len(str(data_dir / "socket" / ".s.PGSQL.5432")) > 107 and len(str(alias / ".s.PGSQL.5432")) <= 107
        assert alias.is_symlink() and alias.resolve() == data_dir / "socket"
        assert_private(alias.parent, owner)
        assert_private(data_dir, owner)
        assert_private(data_dir / "socket", owner)
        assert (data_dir / "socket" / ".s.PGSQL.5432").is_socket()
        assert listen_addresses(server) == ""


def test_the_socket_alias_is_refused_when_its_name_is_taken(tmp_path):
    """Something else at the alias's path (a link to a folder anyone may enter): RuntimeError, and no link is made."""
    data_dir = tmp_path / ("d" * 120) / "pg"
    data_dir.mkdir(parents=True)
    alias = socket_host(data_dir)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir(mode=0o777)
    alias.parent.symlink_to(open_to_all)
    try:
        with pytest.raises(RuntimeError, match="must be a directory of this user"):
            socket_host(data_dir, create_for=os.geteuid())
        assert list(open_to_all.iterdir()) == []
    finally:
        alias.parent.unlink()


def check_deploy(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_passes_for_the_documented_production_settings(db):
    """manage.py check --deploy --fail-level WARNING: no issue with the documented production environment."""
    result = check_deploy(product_env(SECRET_KEY=STRONG_KEY, **PRODUCTION))

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_without_the_production_settings(db):
    """The defaults (plain HTTP on a laptop) are not a deployment: check --deploy names what is missing."""
    result = check_deploy(product_env(SECRET_KEY=STRONG_KEY, ALLOWED_HOSTS="memory.example.com"))

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):  # HSTS, redirect, cookies
        assert warning in result.stderr


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")

# Six threads alive at once, each allocating, then glibc's count of arenas (malloc_info).
_ARENA_PROBE = """
import ctypes, os, tempfile, threading
from runtime import roles
if os.environ["PROBE_ROLE"] != "none":
    roles.declare(os.environ["PROBE_ROLE"])
barrier = threading.Barrier(6)
def allocate():
    blocks = [bytearray(4096) for _ in range(64)]
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as out:
    stream = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(out.read().count("<heap nr="))
"""


@glibc_only
@pytest.mark.parametrize(("role", "capped"), [("web", True), ("worker", True), ("tool", False), ("none", False)])
def test_declaring_a_serving_role_caps_the_arenas_before_any_thread_allocates(role, capped):
    """A web or worker process has at most two malloc arenas however many threads allocate
    after it declared its role; a tool, or a process that declared nothing, gets one per thread
    (which shows the probe counts them)."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    probe = run(_ARENA_PROBE, {**env, "PROBE_ROLE": role})
    assert probe.returncode == 0, probe.stderr
    assert (int(probe.stdout) <= 2) is capped


@glibc_only
def test_serving_processes_cap_glibc_malloc_arenas(monkeypatch):
    """A serving process caps glibc's malloc arenas (mallopt M_ARENA_MAX) unless the operator
    set MALLOC_ARENA_MAX, which glibc reads itself."""
    from runtime.heap import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
