"""``manage.py interfaces_bench``: what a call costs through MCP against REST, and what a time bound costs.

Starts the README's uvicorn (``--server runserver``: daphne's runserver; ``--url``: a running
server, whose CPU is then not measured) on ``DATABASE_URL``, stores one user's history of
``--messages`` turns, one an hour back from now, through the services (flushed by the
server, so that both retrievers read their indexes), then calls the server one call at a
time (closed loop, one client, no concurrency) in rounds that alternate the modes, so that
a drift of the machine's load falls on all of them alike; the queries' phase comes first,
then the adds' (whose flushes would otherwise weigh on the queries' figures):

- ``rest_query`` / ``mcp_query``: ``POST users/{id}/query`` against the ``memory_query``
  tool, same query texts and ``top_k``;
- ``rest_add`` / ``mcp_add``: one turn added by ``POST sessions/{id}/messages`` against
  ``memory_add`` by ``session_id``;
- ``rest_query_bounded``: the REST query with ``since`` / ``until`` around a tenth of the
  history, against ``rest_query`` unbounded.

Both clients are httpx2 (the ``mcp`` client's own HTTP library) on one kept-alive connection;
the MCP client initializes once and then calls tools (as an agent does). Per mode: latency
p50/p95/mean (ms) and the server process's CPU per call (ms, ``psutil``: user + system of the
web process, without its inference processes). Prints JSON (``--json`` writes it too). The
user is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx2
import psutil
from django.core.management.base import CommandError
from django.utils import timezone

from benchmarks.dataset import tenant_delete
from benchmarks.errors import BenchError
from benchmarks.server import bench_rate_limit, serving
from benchmarks.stats import latency_summary
from memory.models import KeyScope
from memory.services.agents import agent_create
from memory.services.api_keys import api_key_create
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create
from memory.services.tenants import tenant_create
from memory.services.users import user_create

TOPICS = [
    "I moved to Lisbon last spring and started learning Portuguese",
    "My sister Ana is an architect; she designed a library in Porto",
    "We adopted a golden retriever puppy called Biscuit",
    "I run 10 km every Sunday morning along the river",
    "My favourite book this year was a history of the spice trade",
    "I am planning a trip to Kyoto in October to see the temples",
    "The dentist moved my appointment to Thursday afternoon",
    "I started a sourdough starter and named it Gerald",
]
QUERIES = [
    "Where does my sister work?",
    "What is the dog called?",
    "When is the dentist appointment?",
    "Which city am I travelling to?",
]
# Queries first, then adds: the adds' flushes (the web process's flush workers) would
# otherwise fall on the queries' CPU figures.
PHASES = (("rest_query", "mcp_query", "rest_query_bounded"), ("rest_add", "mcp_add"))
MODES = tuple(mode for phase in PHASES for mode in phase)


def interfaces_bench(options: dict, *, write, log) -> dict:
    """The measured calls with the command's ``options`` (``messages``, ``calls``, ``warmup``,
    ``server``, ``url``, ``json``); the report, written as JSON through ``write(str)`` and to
    ``options["json"]`` when set. ``log(str)`` gets progress lines.

    Raises ``CommandError`` for bad options or a server that does not start.
    """
    if options["messages"] < 10 or options["calls"] < 1:
        raise CommandError("--messages must be at least 10 and --calls at least 1")
    tenant = tenant_create(name=f"interfaces-bench-{secrets.token_hex(3)}")
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="interfaces_bench")
    log_path = Path(tempfile.gettempdir()) / "interfaces_bench_server.log"
    server_env = {"API_RATE_LIMIT": bench_rate_limit()}
    try:
        with serving(options["url"], log_path=log_path, log=log, env=server_env, kind=options["server"]) as (url, server):
            user, session, window = history(tenant, options["messages"])
            report = asyncio.run(
                Run(url=url, key=key, user_id=str(user.pk), session_id=str(session.pk), window=window,
                    pid=server.pid if server else None).measure(calls=options["calls"], warmup=options["warmup"])
            )  # fmt: skip
            report["setup"] = {
                "server": options["server"] if server else f"--url {url}",
                "messages": options["messages"],
                "calls_per_mode": options["calls"],
                "window": {"since": window[0], "until": window[1]},
            }
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    finally:
        tenant_delete(tenant)  # after the server stopped: a failed clean-up must not leave it running
    text = json.dumps(report, indent=2)
    if options["json"]:
        Path(options["json"]).write_text(text + "\n")
    write(text)
    return report


def history(tenant, count: int):
    """A user with ``count`` turns, one an hour back from now, flushed by the server; the window
    ``(since, until)`` (ISO 8601) holds the middle tenth of them. Returns ``(user, session, window)``."""
    agent = agent_create(tenant_id=tenant.pk, name="assistant")
    user = user_create(tenant_id=tenant.pk, name="history")
    session = session_create(user=user, agent=agent, name="history")
    start = timezone.now() - timedelta(hours=count)
    turns = [
        MessageIn(role="user", content=f"{TOPICS[i % len(TOPICS)]} (note {i}).", created_at=start + timedelta(hours=i))
        for i in range(count)
    ]
    for offset in range(0, count, 100):
        messages_add(session=session, messages=turns[offset : offset + 100])
    since = start + timedelta(hours=count * 45 // 100)
    until = start + timedelta(hours=count * 55 // 100)
    return user, session, (since.isoformat(), until.isoformat())


class Run:
    """The measured calls against one server."""

    def __init__(self, *, url: str, key: str, user_id: str, session_id: str, window: tuple[str, str], pid: int | None):
        self.url, self.key, self.user_id, self.session_id, self.window = url, key, user_id, session_id, window
        self.process = psutil.Process(pid) if pid else None
        self.count = 0

    async def measure(self, *, calls: int, warmup: int) -> dict:
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx2.AsyncClient(base_url=self.url, headers=headers, timeout=120) as rest:
            flushed = await rest.post(f"/api/v1/users/{self.user_id}/flush", json={"wait": True})
            flushed.raise_for_status()
            mcp_http = httpx2.AsyncClient(headers=headers, timeout=120)
            async with Client(streamable_http_client(f"{self.url}/mcp", http_client=mcp_http)) as mcp:
                calls_by_mode = {
                    "rest_query": lambda: self._rest_query(rest, {}),
                    "rest_query_bounded": lambda: self._rest_query(rest, {"since": self.window[0], "until": self.window[1]}),
                    "mcp_query": lambda: self._mcp(mcp, "memory_query", {"user": self.user_id, "query": self._query()}),
                    "rest_add": lambda: self._rest_add(rest),
                    "mcp_add": lambda: self._mcp(mcp, "memory_add", {"session_id": self.session_id, "messages": [self._turn()]}),
                }
                latencies = {mode: [] for mode in MODES}
                cpu = {mode: 0.0 for mode in MODES}
                for phase in PHASES:
                    for _ in range(warmup):
                        for mode in phase:
                            await calls_by_mode[mode]()
                    for _ in range(calls):  # rounds: one call of each mode, in turn
                        for mode in phase:
                            before = self._cpu()
                            started = time.perf_counter()
                            await calls_by_mode[mode]()
                            latencies[mode].append((time.perf_counter() - started) * 1000)
                            if before is not None:
                                cpu[mode] += self._cpu() - before
        report = {}
        for mode in MODES:
            summary = latency_summary(latencies[mode])
            report[mode] = {
                "p50_ms": summary["p50"],
                "p95_ms": summary["p95"],
                "mean_ms": round(statistics.fmean(latencies[mode]), 2),
                "server_cpu_ms_per_call": round(cpu[mode] * 1000 / calls, 2) if self.process else None,
            }
        report["mcp_over_rest"] = {
            kind: {
                "p50_ms": round(report[f"mcp_{kind}"]["p50_ms"] - report[f"rest_{kind}"]["p50_ms"], 2),
                "server_cpu_ms": _difference(report[f"mcp_{kind}"], report[f"rest_{kind}"]),
            }
            for kind in ("query", "add")
        }
        report["bounded_over_unbounded"] = {
            "p50_ms": round(report["rest_query_bounded"]["p50_ms"] - report["rest_query"]["p50_ms"], 2),
            "server_cpu_ms": _difference(report["rest_query_bounded"], report["rest_query"]),
        }
        return report

    def _cpu(self) -> float | None:
        if self.process is None:
            return None
        times = self.process.cpu_times()
        return times.user + times.system

    def _query(self) -> str:
        self.count += 1
        return QUERIES[self.count % len(QUERIES)]

    def _turn(self) -> dict:
        self.count += 1
        return {"role": "user", "content": f"{TOPICS[self.count % len(TOPICS)]} (bench {self.count})."}

    async def _rest_query(self, rest, bounds: dict) -> None:
        response = await rest.post(f"/api/v1/users/{self.user_id}/query", json={"query": self._query(), "top_k": 5, **bounds})
        response.raise_for_status()

    async def _rest_add(self, rest) -> None:
        response = await rest.post(f"/api/v1/sessions/{self.session_id}/messages", json={"messages": [self._turn()]})
        response.raise_for_status()

    async def _mcp(self, mcp, tool: str, arguments: dict) -> None:
        result = await mcp.call_tool(tool, arguments)
        if result.is_error:
            raise CommandError(f"{tool}: {result.content[0].text}")


def _difference(a: dict, b: dict) -> float | None:
    if a["server_cpu_ms_per_call"] is None:
        return None
    return round(a["server_cpu_ms_per_call"] - b["server_cpu_ms_per_call"], 2)
