"""``manage.py memfuse_bench <benchmark>``: the run every benchmark shares, over HTTP.

Everything goes through the REST API of a real server: either ``--url``, or a server
subprocess started on a free loopback port (``--server``: uvicorn, the README's production
command, by default; or runserver), with this process's environment (so the embedded
database unless ``DATABASE_URL`` is set), and stopped with SIGTERM at the end, so its
graceful flush drain runs. Each benchmark is a class in ``BENCHMARKS`` (``ingest``:
``benchmarks.ingest``; ``query``: ``benchmarks.query``; ``chat``: ``benchmarks.chat``).

Every request carries an API key. A server started by the bench serves the same database as
this process, so the bench creates a tenant ``bench-<run>`` with a tenant key in-process (and
deletes it at the end unless ``--keep``), or a key of the benchmark's own dataset tenant;
with ``--url``, pass ``--api-key`` (a tenant key, or ``MEMFUSE_API_KEY``).

The report (JSON on stdout, and in ``--json``) has ``benchmark``, ``config``, ``host`` (cores
and load average at start and end), the benchmark's own sections and ``server``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import uuid
from pathlib import Path
from typing import Protocol

import aiohttp
from django.conf import settings
from django.core.management.base import CommandError

from benchmarks.chat import ChatBench
from benchmarks.client import REQUEST_TIMEOUT, Api, delete_created
from benchmarks.errors import BenchError
from benchmarks.ingest import IngestBench
from benchmarks.query import QueryBench
from benchmarks.server import HEALTH_PATH, ServerProcess, bench_rate_limit, health_ok
from runtime.embedded_pg import migrate_if_embedded


class Benchmark(Protocol):
    """What a subcommand provides: its options, their checks, a run over the bench users."""

    name: str
    help: str

    @staticmethod
    def add_arguments(parser) -> None: ...

    @staticmethod
    def validate(options: dict) -> None:
        """Raise ``CommandError`` naming the bad option."""

    def __init__(self, options: dict, *, run_id: str) -> None: ...

    def prepare(self, log) -> dict:
        """Work before the server starts (in this process, may use the database); report section."""

    def key_tenant(self):
        """The tenant whose key the run uses (its own data), or ``None`` for a new tenant."""

    async def bench_users(self, api: Api, created: list[str]) -> list:
        """The users the load goes to; paths of what it created over HTTP go to ``created``."""

    def finish(self) -> dict:
        """Work after the server stopped (cleanup of what ``prepare`` made); report section."""

    def config(self) -> dict:
        """The benchmark's own settings, for the report's ``config``."""

    async def run(self, api: Api, users: list, server: ServerProcess | None) -> dict:
        """The report's sections (``{"steady": ..., "burst": ...}`` for ingest).

        ``server``: the server this command started (its pid and log), None with ``--url``."""

    @staticmethod
    def summary(report: dict) -> list[str]:
        """A few human-readable lines of the report."""


BENCHMARKS: dict[str, type[Benchmark]] = {bench.name: bench for bench in (IngestBench, QueryBench, ChatBench)}


def bench_key(run_id: str, *, tenant=None) -> tuple:
    """A tenant key for the run, written to the server's database directly.

    With ``tenant`` (a benchmark's own data, e.g. the query dataset's): a key of that tenant.
    Otherwise a new tenant ``bench-<run_id>``. Returns ``(tenant created or None, ApiKey, key)``:
    what to delete afterwards, and the key to send.
    """
    from memory.models import KeyScope
    from memory.services.api_keys import api_key_create
    from memory.services.tenants import tenant_create

    created = None
    if tenant is None:
        tenant = created = tenant_create(name=f"bench-{run_id}")
    api_key, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name=f"memfuse_bench {run_id}")
    return created, (None if created else api_key), key


def validate(options: dict) -> None:
    """The options every benchmark shares, then the benchmark's own; ``CommandError`` naming the
    option. Draws ``options["seed"]`` when none is given (it is reported)."""
    if options["clients"] <= 0:
        raise CommandError(f"--clients must be > 0 (got {options['clients']})")
    BENCHMARKS[options["benchmark"]].validate(options)
    if options["url"] and not options["api_key"]:
        raise CommandError("--api-key: a tenant key of the --url server is required (or set MEMFUSE_API_KEY)")
    if options["url"] and not health_ok(options["url"], timeout=10):
        raise CommandError(f"--url: {options['url']} is unreachable (no 200 from {HEALTH_PATH})")
    if options["seed"] is None:
        options["seed"] = random.SystemRandom().randrange(2**31)


def memfuse_bench(options: dict, *, stdout, stderr) -> dict:
    """Run ``options["benchmark"]`` with the command's ``options``; its summary lines go to
    ``stderr``, the report as JSON to ``stdout`` (and ``--json``). Returns the report.

    ``stdout``, ``stderr``: objects with ``write(str)``. Raises ``CommandError`` for a bad
    option or a run that cannot go on (the server did not start, setup failed).
    """
    validate(options)
    run_id = uuid.uuid4().hex[:8]
    bench = BENCHMARKS[options["benchmark"]](options, run_id=run_id)
    # The machine may be shared: the load around the run says how far to trust the figures.
    loadavg_start = [round(value, 2) for value in os.getloadavg()]
    migrate_if_embedded()  # the embedded database may be new: prepare() writes to it
    prepared = bench.prepare(stderr.write)
    try:
        results, url, server, server_info = _serve_and_run(bench, options, run_id, log=stderr.write)
    finally:
        finished = bench.finish()
    report = {
        "benchmark": bench.name,
        "config": {
            "url": options["url"],
            "clients": options["clients"],
            "seed": options["seed"],
            "run_id": run_id,
            **bench.config(),
        },
        "host": {
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(value, 2) for value in os.getloadavg()],
        },
        **prepared,
        **results,
        **finished,
        "server": {
            "url": url,
            "started_by_bench": server is not None,
            "kind": server.kind if server is not None else None,
            "asgi_threads": settings.MEMFUSE["ASGI_THREADS"] if server is not None else None,
            "api_rate_limit": server.env["API_RATE_LIMIT"] if server is not None else None,
            **server_info,
        },
    }
    _print(bench, report, options["json_out"], stdout=stdout, stderr=stderr)
    return report


def _serve_and_run(bench: Benchmark, options: dict, run_id: str, *, log) -> tuple[dict, str, ServerProcess | None, dict]:
    """Start the server (unless ``--url``), make the run's key, run the load; then stop the
    server, delete the key and the run's tenant (unless ``--keep``), whatever happened.
    ``(results, url, server or None, what server.stop() said)``."""
    server = None
    url = options["url"]
    server_info: dict = {}
    tenant = api_key = None
    try:
        if not url:
            server = ServerProcess(
                log_path=Path(f"/tmp/memfuse-bench-{run_id}-server.log"),
                kind=options["server"],
                env={"API_RATE_LIMIT": bench_rate_limit()},
            )
            log(f"starting {server.kind} (log: {server.log_path}) ...")
            url = server.start()
        if not options["api_key"]:
            tenant, api_key, options["api_key"] = bench_key(run_id, tenant=bench.key_tenant())
        # This process holds the model too (raw throughput, exactness): hundreds of thousands
        # of objects whose full garbage-collector passes would stall the client's event loop
        # and count as the server's latency. Out of the collector's reach.
        gc.collect()
        gc.freeze()
        try:
            results = asyncio.run(_load(bench, url, options, server, log=log))
        finally:
            gc.unfreeze()
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if server is not None:
            server_info = server.stop()
        if api_key is not None:
            api_key.delete()
        if tenant is not None and not options.get("keep"):
            tenant.delete()
    return results, url, server, server_info


async def _load(bench: Benchmark, url: str, options: dict, server: ServerProcess | None, *, log) -> dict:
    clients = options["clients"]
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        api = Api(http, url, api_key=options["api_key"])
        created: list[str] = []
        try:
            users = await bench.bench_users(api, created)
            results = await bench.run(api, users, server)
        finally:
            cleanup_failures = 0
            if not options.get("keep"):
                cleanup_failures = await delete_created(api, created)
    if cleanup_failures:
        log(f"cleanup: {cleanup_failures} deletions failed")
    return results


def _print(bench: Benchmark, report: dict, json_out: Path | None, *, stdout, stderr) -> None:
    for line in bench.summary(report):
        stderr.write(line)
    host = report["host"]
    stderr.write(
        f"host: {host['cpu_count']} cores, load average (1 min) {host['loadavg_start'][0]} at start, "
        f"{host['loadavg_end'][0]} at end"
    )
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    stdout.write(text)
