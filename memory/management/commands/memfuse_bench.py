"""``python manage.py memfuse_bench ingest``: latency and throughput of the ingest path over HTTP.

Everything goes through the REST API of a real server: either ``--url``, or a server
subprocess this command starts on a free loopback port (``--server``: uvicorn, the README's
production command, by default; or runserver), with this process's environment (so
the embedded database unless ``DATABASE_URL`` is set), and stops with SIGTERM at the end, so
its graceful flush drain runs. Each benchmark is a class in ``BENCHMARKS``; ``query`` slots in
beside ``ingest``.

``ingest`` (one add = one round: a user and an assistant message):

0. setup (not timed): ``--clients`` users, each with one agent and one session;
1. steady, OPEN loop: add i is scheduled at ``t0 + i / rate`` and fired as a task at that
   time whatever earlier adds are doing, from client ``i % clients``; its latency runs from
   the scheduled time to the answer, so queueing counts (no coordinated omission: Gil Tene,
   "How NOT to Measure Latency", and wrk2's constant-throughput mode);
2. burst, CLOSED loop: after the server has flushed phase 1, ``--burst`` messages as fast as
   the clients go, then the time until every message is flushed (embedded, vector-indexed);
   then, with the server idle, the embedding model's raw batched throughput on the same texts
   in this process: the ceiling of the ingest path on this machine.

Every request carries an API key. A server started by the bench serves the same database as
this process, so the bench creates a tenant ``bench-<run>`` with a tenant key in-process (and
deletes it at the end unless ``--keep``); with ``--url``, pass ``--api-key`` (a tenant key, or
``MEMFUSE_API_KEY``). Each bench user then gets a user key of its own for its adds: the rate
limit counts per key, and one key doing 100 adds/s would meet the default limit (6000/minute).

Texts are chat turns: the ``conversation`` turns' ``text`` of the LoCoMo development file when
it exists (nothing else of that file is read), else a small built-in generator.

``query`` (``QueryBench``): 1,000 users x 200 flushed messages bulk-loaded into this process's
database (``memory.management.bench_dataset``, reused across runs), then queries over HTTP:
one to each of 10 users and one to every other user (server memory read after each), an
open-loop phase at a fixed rate and a closed-loop phase, each with p50/p95/p99 and how many
queries were a user's first (cold). Before the server starts, in this process: recall@10 of
the served per-user vector search and of a filtered HNSW search against an exact numpy scan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from memfuse_project import serving
from memfuse_project.embedded_pg import migrate_if_embedded
from memory.management.commands.locomo_eval import conversation_sessions

LOCOMO_DEV = settings.BASE_DIR.parent / "shared" / "data" / "locomo" / "locomo-dev.json"
HEALTH_PATH = "/api/v1/health"
SERVER_START_TIMEOUT = 120.0  # s: migrations and the model load happen before the first answer
FLUSH_WAIT_TIMEOUT = 300.0  # s
REQUEST_TIMEOUT = 60.0  # s, per HTTP request
SETUP_CONCURRENCY = 8  # requests in flight while creating and deleting bench users
SEARCH_CHECK_USERS = 4


class BenchError(Exception):
    """The benchmark cannot go on (setup failed, the server died); becomes ``CommandError``."""


# --- pure helpers ------------------------------------------------------------------------------


def scheduled_offsets(*, rate: float, duration: float) -> list[float]:
    """Send times of an open-loop run, in seconds after its start: add i at ``i / rate``.

    ``round(rate * duration)`` adds (at least one), so 100/s for 30 s is exactly 3000 adds.
    """
    count = max(1, round(rate * duration))
    return [index / rate for index in range(count)]


def latency_summary(latencies_ms: Sequence[float]) -> dict:
    """``{"p50", "p95", "p99", "max"}`` of latencies in ms, rounded to 0.01 ms.

    Percentiles interpolate linearly between samples (numpy's default); all ``None`` when
    there is no sample.
    """
    if len(latencies_ms) == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    values = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": round(float(values.max()), 2),
    }


def chat_rounds(texts: Sequence[str], *, count: int, start: int) -> list[tuple[str, str]]:
    """``count`` rounds ``(user text, assistant text)`` of consecutive turns from ``start``, cycling.

    Raises ``ValueError`` with fewer than two texts.
    """
    if len(texts) < 2:
        raise ValueError("need at least two texts to make a chat round")
    n = len(texts)
    return [(texts[(start + 2 * i) % n], texts[(start + 2 * i + 1) % n]) for i in range(count)]


def locomo_turn_texts(path: Path) -> list[str]:
    """The ``text`` of every turn of every conversation's sessions, in conversation order.

    Only ``conversation.session_<n>`` turn lists are read (never questions, answers,
    summaries or observations). Raises ``OSError``/``ValueError`` when the file is unreadable.
    """
    data = json.loads(path.read_text())
    texts = []
    for item in data:
        for _, _, turns in conversation_sessions(item["conversation"]):
            texts.extend(turn["text"] for turn in turns if isinstance(turn.get("text"), str) and turn["text"].strip())
    return texts


_PEOPLE = ["my sister", "my brother", "my friend Maya", "my neighbour Tom", "my coworker Priya", "my dad", "my mom"]
_ACTIVITIES = ["went hiking", "tried a new recipe", "started pottery classes", "adopted a puppy",
               "ran a half marathon", "visited a museum", "planted tomatoes", "learned to play chess"]
_PLACES = ["near Lake Tahoe", "in Lisbon", "downtown", "at the community centre", "in the park", "at home"]
_WHEN = ["last weekend", "yesterday", "a few days ago", "last month", "this morning"]
_REPLIES = ["That sounds wonderful! How did {who} like it?", "Nice! Would you do it again {where}?",
            "How exciting. What was the best part?", "I remember you mentioned {who} before. How are they?",
            "That's great. Did anything surprise you?"]


def generated_turn_texts(rng: random.Random, *, count: int = 400) -> list[str]:
    """``count`` chat turns alternating a user's news and an assistant's reply (fallback texts)."""
    texts = []
    for _ in range(count // 2):
        who, where = rng.choice(_PEOPLE), rng.choice(_PLACES)
        texts.append(f"I {rng.choice(_ACTIVITIES)} with {who} {where} {rng.choice(_WHEN)}.")
        texts.append(rng.choice(_REPLIES).format(who=who, where=where))
    return texts


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


# --- the server --------------------------------------------------------------------------------


SERVERS = ("uvicorn", "runserver")


def uvicorn_command(port: int, *args: str) -> list[str]:
    """The README's production server as an argv: uvicorn on ``127.0.0.1:port`` with uvloop,
    httptools, the ASGI lifespan (the flush drain at shutdown) and no access log, plus ``args``."""
    return [
        sys.executable, "-m", "uvicorn", "memfuse_project.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
        "--no-access-log", *args,
    ]  # fmt: skip


BENCH_RATE_LIMIT = "1000000/minute"


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
    waits, so the flush workers' graceful drain runs.
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
            # A session of its own: a Ctrl-C on the bench reaches the server only through stop().
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
        """SIGTERM, then wait for the drain (``FLUSH_SHUTDOWN_SECONDS`` + margin) before SIGKILL."""
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


# --- HTTP client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchUser:
    """One simulated client: its user, agent and session ids."""

    index: int
    user_id: str
    agent_id: str
    session_id: str
    api_key: str  # the user's own key (per-key rate limits)


@dataclass(frozen=True)
class AddOutcome:
    """One add: whether it was stored (201), its latency (ms), when it answered (loop time, s)."""

    ok: bool
    latency_ms: float
    answered_at: float
    error: str = ""
    pending_messages: int = 0


@dataclass(frozen=True)
class QueryOutcome:
    """One query: whether it answered 200, its latency (ms), when it answered, results returned."""

    ok: bool
    latency_ms: float
    answered_at: float
    error: str = ""
    results: int = 0
    cold: bool = False


class Api:
    """The REST API at ``base_url`` through one aiohttp session (one connection per client)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, *, api_key: str) -> None:
        self.http = http
        self.base = base_url.rstrip("/") + "/api/v1"
        self.api_key = api_key

    async def call(
        self, method: str, path: str, body: dict | None = None, *, api_key: str | None = None
    ) -> tuple[int, dict | None]:
        """``(status, decoded JSON body or None)`` with ``api_key`` (default: the tenant key).

        Network errors raise ``aiohttp.ClientError``.
        """
        headers = {"Authorization": f"Bearer {api_key or self.api_key}"}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as response:
            try:
                payload = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                payload = None
            return response.status, payload

    async def data(self, method: str, path: str, body: dict | None = None, *, expect: int = 200) -> dict:
        """The envelope's ``data``; ``BenchError`` on any other status than ``expect``."""
        try:
            status, payload = await self.call(method, path, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status != expect:
            message = payload.get("message") if isinstance(payload, dict) else payload
            raise BenchError(f"{method} {path}: HTTP {status}: {message}")
        return payload["data"]

    async def add_round(self, user: BenchUser, round_texts: tuple[str, str], *, scheduled: float) -> AddOutcome:
        """POST one round to the user's session; latency from ``scheduled`` (loop time, s)."""
        loop = asyncio.get_running_loop()
        user_text, assistant_text = round_texts
        body = {"messages": [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]}
        try:
            status, payload = await self.call(
                "POST", f"/sessions/{user.session_id}/messages", body, api_key=user.api_key
            )
            error = "" if status == 201 else f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, payload, error = 0, None, type(exc).__name__
        answered = loop.time()
        pending = payload["data"].get("pending_messages", 0) if status == 201 and isinstance(payload, dict) else 0
        return AddOutcome(
            ok=status == 201,
            latency_ms=(answered - scheduled) * 1000,
            answered_at=answered,
            error=error,
            pending_messages=pending,
        )

    async def query(self, user_id: str, text: str, *, top_k: int, scheduled: float) -> QueryOutcome:
        """POST one memory query for ``user_id``; latency from ``scheduled`` (loop time, s)."""
        loop = asyncio.get_running_loop()
        try:
            status, payload = await self.call("POST", f"/users/{user_id}/query", {"query": text, "top_k": top_k})
            error = "" if status == 200 else f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, payload, error = 0, None, type(exc).__name__
        answered = loop.time()
        results = len(payload["data"]["results"]) if status == 200 and isinstance(payload, dict) else 0
        latency_ms = (answered - scheduled) * 1000
        return QueryOutcome(ok=status == 200, latency_ms=latency_ms, answered_at=answered, error=error, results=results)

    async def pending_messages(self, user: BenchUser) -> int:
        return (await self.data("GET", f"/users/{user.user_id}/buffer"))["pending_messages"]


async def create_users(api: Api, *, count: int, run_id: str, created: list[str]) -> list[BenchUser]:
    """``count`` users ``bench-<run>-<i>``, each with an agent and a session of the same name.

    The path of every user and agent created is appended to ``created`` as soon as it exists,
    so a failure half-way leaves nothing that ``delete_created`` does not know of.
    """
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def create(index: int) -> BenchUser:
        name = f"bench-{run_id}-{index}"
        async with limit:
            user = (await api.data("POST", "/users", {"name": name}, expect=201))["user"]
            created.append(f"/users/{user['id']}")
            agent = (await api.data("POST", "/agents", {"name": name}, expect=201))["agent"]
            created.append(f"/agents/{agent['id']}")
            body = {"user_id": user["id"], "agent_id": agent["id"], "name": name}
            session = (await api.data("POST", "/sessions", body, expect=201))["session"]
            key = (await api.data("POST", f"/users/{user['id']}/api-keys", {"name": name}, expect=201))["api_key"]
        return BenchUser(
            index=index, user_id=user["id"], agent_id=agent["id"], session_id=session["id"], api_key=key["key"]
        )

    return list(await asyncio.gather(*(create(index) for index in range(count))))


async def delete_created(api: Api, paths: list[str], *, attempts: int = 3) -> int:
    """DELETE each path, users before agents; returns how many could not be deleted.

    A user's delete takes its sessions and messages with it, and so does its agent's: run
    together, the two cascades lock the same rows in different orders and deadlock, so every
    user goes first and the agents (by then without sessions) after. A delete that still fails
    (one racing a flush's write can lose a deadlock, HTTP 500) is tried again.
    """
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def delete(path: str) -> bool:
        async with limit:
            for attempt in range(attempts):
                try:
                    await api.data("DELETE", path)
                    return True
                except BenchError:
                    await asyncio.sleep(0.5 * (attempt + 1))
        return False

    failures = 0
    for kind in ("/users/", "/agents/"):
        batch = [path for path in paths if path.startswith(kind)]
        failures += sum(1 for ok in await asyncio.gather(*(delete(path) for path in batch)) if not ok)
    return failures


async def wait_until_flushed(
    api: Api, users: list[BenchUser], *, timeout: float, interval: float = 0.2, chunk: int = 4
) -> tuple[bool, float, dict]:
    """Poll ``users/{id}/buffer`` until no user has pending messages.

    Returns ``(flushed, loop time when seen flushed or at timeout, {user index: pending})``.
    Only call it once no add is in flight: then a user seen at 0 stays at 0 and is not polled
    again. Each poll goes through the users a ``chunk`` at a time and stops at the first
    chunk with a user still pending, so waiting costs a few requests per ``interval``, not one
    per user: the polls share the server's cores with the flush being measured.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    remaining = list(users)
    last_seen: dict[int, int] = {}
    while True:
        while remaining:
            batch = remaining[:chunk]
            counts = await asyncio.gather(*(api.pending_messages(user) for user in batch))
            last_seen.update({user.index: count for user, count in zip(batch, counts)})
            remaining = [user for user, count in zip(batch, counts) if count > 0] + remaining[chunk:]
            if any(counts):
                break
        now = loop.time()
        if not remaining:
            return True, now, {}
        if now >= deadline:
            return False, now, {user.index: last_seen.get(user.index) for user in remaining}
        await asyncio.sleep(interval)


def latency_windows(outcomes: list, *, t0: float, seconds: float) -> list[list[float]]:
    """``[[window start s, p50, p99, max], ...]`` of add latency (ms) by when each add was
    scheduled (its answer time minus its latency), in windows of ``seconds`` from ``t0``."""
    windows: dict[int, list[float]] = {}
    for outcome in outcomes:
        scheduled = outcome.answered_at - outcome.latency_ms / 1000
        windows.setdefault(int((scheduled - t0) // seconds), []).append(outcome.latency_ms)
    rows = []
    for index in sorted(windows):
        summary = latency_summary(windows[index])
        rows.append([index * seconds, summary["p50"], summary["p99"], summary["max"]])
    return rows


async def failed_jobs(api: Api, users: list[BenchUser], *, limit: int = 5) -> list[dict]:
    """Up to ``limit`` flush jobs in state ``failed`` of the given users, with their errors."""
    found = []
    for user in users:
        for job in (await api.data("GET", f"/users/{user.user_id}/buffer"))["jobs"]:
            if job["state"] == "failed":
                fields = {key: job[key] for key in ("reason", "attempts", "last_error")}
                found.append({"user": user.index, **fields})
        if len(found) >= limit:
            break
    return found[:limit]


# --- benchmarks --------------------------------------------------------------------------------


class IngestBench:
    """Adds under an open-loop steady load, then a burst and its time until flushed."""

    name = "ingest"
    help = "add latency under open-loop load, then burst throughput until flushed vs the raw model"

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--rate", type=float, default=100.0, help="offered adds per second in the steady phase")
        parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady load")
        parser.add_argument("--burst", type=int, default=5000, help="messages of the burst phase (2 per add)")
        parser.add_argument("--keep", action="store_true", help="keep the bench users (default: delete them)")

    @staticmethod
    def validate(options: dict) -> None:
        if options["rate"] <= 0:
            raise CommandError(f"--rate must be > 0 (got {options['rate']})")
        if options["duration"] <= 0:
            raise CommandError(f"--duration must be > 0 (got {options['duration']})")
        if options["burst"] < 2:
            raise CommandError(f"--burst must be >= 2 (got {options['burst']})")

    def __init__(self, options: dict, *, run_id: str) -> None:
        self.options = options
        self.run_id = run_id
        self.rng = random.Random(options["seed"])
        self.texts, self.texts_source = self._load_texts()

    def _load_texts(self) -> tuple[list[str], str]:
        if LOCOMO_DEV.exists():
            try:
                texts = locomo_turn_texts(LOCOMO_DEV)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CommandError(f"cannot read chat turns from {LOCOMO_DEV}: {exc}") from None
            if len(texts) >= 2:
                return texts, "locomo-dev conversation turns"
        return generated_turn_texts(self.rng), "built-in generator"

    def prepare(self, log) -> dict:
        return {}

    def key_tenant(self):
        return None  # a tenant of its own, deleted afterwards

    async def bench_users(self, api: Api, created: list[str]) -> list[BenchUser]:
        return await create_users(api, count=self.options["clients"], run_id=self.run_id, created=created)

    def finish(self) -> dict:
        return {}

    def config(self) -> dict:
        return {
            "keep": self.options["keep"],
            "rate": self.options["rate"],
            "duration": self.options["duration"],
            "burst": self.options["burst"],
            "texts": self.texts_source,
            "embedding_batch_size": settings.MEMFUSE["EMBEDDING_BATCH_SIZE"],
            "raw_chunk_texts": settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"],
        }

    async def run(self, api: Api, users: list[BenchUser], server: ServerProcess | None) -> dict:
        offsets = scheduled_offsets(rate=self.options["rate"], duration=self.options["duration"])
        burst_rounds = self.options["burst"] // 2
        rounds = chat_rounds(self.texts, count=len(offsets) + burst_rounds, start=self.rng.randrange(len(self.texts)))
        steady = await self._steady(api, users, offsets, rounds[: len(offsets)])
        if not steady["flushed"]:
            return {"steady": steady, "burst": {"skipped": f"phase 1 not flushed within {FLUSH_WAIT_TIMEOUT:.0f} s"}}
        burst = await self._burst(api, users, rounds[len(offsets) :])
        return {"steady": steady, "burst": burst}

    async def _steady(
        self, api: Api, users: list[BenchUser], offsets: list[float], rounds: list[tuple[str, str]]
    ) -> dict:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        tasks = []
        for index, (offset, round_texts) in enumerate(zip(offsets, rounds)):
            scheduled = t0 + offset
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Fired at its time whatever earlier adds are doing: a slow answer cannot lower the
            # offered rate, and a late start shows in the latency (measured from `scheduled`).
            user = users[index % len(users)]
            tasks.append(asyncio.create_task(api.add_round(user, round_texts, scheduled=scheduled)))
        outcomes: list[AddOutcome] = await asyncio.gather(*tasks)
        done = [o for o in outcomes if o.ok]
        wall = max(o.answered_at for o in outcomes) - t0
        load_end = loop.time()
        flushed, flushed_at, still_pending = await wait_until_flushed(api, users, timeout=FLUSH_WAIT_TIMEOUT)
        result = {
            "offered_rate": self.options["rate"],
            "served_rate": round(len(done) / wall, 2),
            "adds": len(outcomes),
            "errors": len(outcomes) - len(done),
            "latency_ms": latency_summary([o.latency_ms for o in done]),
            # Where the tail sits in time: (start s, p50, p99, max) of each 5 s of the schedule.
            "latency_ms_by_5s": latency_windows(done, t0=t0, seconds=5.0),
            "error_kinds": dict(Counter(o.error for o in outcomes if not o.ok)),
            "max_pending_messages_seen": max((o.pending_messages for o in done), default=0),
            "flushed": flushed,
            "seconds_until_flushed_after_load": round(flushed_at - load_end, 2) if flushed else None,
        }
        if not flushed:
            result["still_pending"] = still_pending
            result["failed_jobs"] = await failed_jobs(api, users)
        return result

    async def _burst(self, api: Api, users: list[BenchUser], rounds: list[tuple[str, str]]) -> dict:
        loop = asyncio.get_running_loop()
        outcomes: list[AddOutcome] = []

        async def client(user: BenchUser) -> None:
            for index in range(user.index, len(rounds), len(users)):
                outcomes.append(await api.add_round(user, rounds[index], scheduled=loop.time()))

        started = loop.time()
        await asyncio.gather(*(client(user) for user in users))
        adds_done = loop.time()
        flushed, flushed_at, still_pending = await wait_until_flushed(api, users, timeout=FLUSH_WAIT_TIMEOUT)
        ok = [o for o in outcomes if o.ok]
        messages = 2 * len(rounds)
        add_seconds = adds_done - started
        seconds_until_flushed = flushed_at - started
        result = {
            "messages": messages,
            "adds": len(outcomes),
            "errors": len(outcomes) - len(ok),
            "error_kinds": dict(Counter(o.error for o in outcomes if not o.ok)),
            "add_seconds": round(add_seconds, 3),
            "adds_per_s": round(len(ok) / add_seconds, 2),
            "messages_per_s": round(2 * len(ok) / add_seconds, 2),
            "add_latency_ms": latency_summary([o.latency_ms for o in ok]),
            "flushed": flushed,
            "seconds_until_flushed": round(seconds_until_flushed, 3),
            "end_to_end_messages_per_s": round(messages / seconds_until_flushed, 2) if flushed else None,
        }
        if not flushed:
            result["still_pending"] = still_pending
            result["failed_jobs"] = await failed_jobs(api, users)
            return result
        result["search_check"] = await self._search_check(api, users, rounds)
        # The server is idle now (everything flushed); the model runs in a thread, never on the loop.
        raw = await asyncio.to_thread(raw_model_throughput, [text for pair in rounds for text in pair])
        result["raw_model_messages_per_s"] = raw["messages_per_s"]
        result["raw_model_seconds"] = raw["seconds"]
        result["ratio"] = round(result["end_to_end_messages_per_s"] / raw["messages_per_s"], 3)
        return result

    async def _search_check(self, api: Api, users: list[BenchUser], rounds: list[tuple[str, str]]) -> dict:
        """Query a few users with one of their burst texts: results must be there and flushed."""
        step = max(1, len(users) // SEARCH_CHECK_USERS)
        checks = []
        for user in users[::step][:SEARCH_CHECK_USERS]:
            own = list(range(user.index, len(rounds), len(users)))
            if not own:
                continue
            query = rounds[own[-1]][0]
            results = (await api.data("POST", f"/users/{user.user_id}/query", {"query": query, "top_k": 5}))["results"]
            messages = [r for r in results if r.get("type") == "message"]
            checks.append(
                {
                    "user": user.index,
                    "results": len(results),
                    "all_flushed": bool(messages) and all(r["metadata"].get("flushed") is True for r in messages),
                    "top_is_query_text": bool(results) and results[0]["content"] == query,
                }
            )
        return {"queries": checks, "ok": bool(checks) and all(c["results"] > 0 and c["all_flushed"] for c in checks)}

    @staticmethod
    def summary(report: dict) -> list[str]:
        steady, burst = report["steady"], report["burst"]
        latency = steady["latency_ms"]
        if steady["flushed"]:
            drained = f"flushed {steady['seconds_until_flushed_after_load']} s after the load"
        else:
            drained = f"NOT flushed within {FLUSH_WAIT_TIMEOUT:.0f} s"
        lines = [
            f"steady: offered {steady['offered_rate']}/s, served {steady['served_rate']}/s, "
            f"{steady['adds']} adds, {steady['errors']} errors; latency ms p50 {latency['p50']} "
            f"p95 {latency['p95']} p99 {latency['p99']} max {latency['max']}; "
            f"{drained}",
        ]
        if "skipped" in burst:
            lines.append(f"burst: skipped ({burst['skipped']})")
        else:
            lines.append(
                f"burst: {burst['messages']} messages, {burst['messages_per_s']} msg/s added "
                f"({burst['errors']} errors), flushed in {burst['seconds_until_flushed']} s: "
                f"{burst['end_to_end_messages_per_s']} msg/s end to end"
            )
            if "ratio" in burst:
                lines.append(
                    f"raw model: {burst['raw_model_messages_per_s']} msg/s; end to end / raw = {burst['ratio']}; "
                    f"search check {'ok' if burst['search_check']['ok'] else 'FAILED'}"
                )
        return lines


# --- the query benchmark -----------------------------------------------------------------------

HNSW_SETTINGS = [  # (hnsw.ef_search, hnsw.iterative_scan) tried by the exactness check
    (40, "off"), (100, "off"), (40, "relaxed_order"), (100, "relaxed_order"), (40, "strict_order"), (200, "strict_order"),
]
MEMORY_FIRST_USERS = 10  # the server's memory is read after this many users are cached, then after all


def cosine_similarities(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``matrix`` (n, dim) to ``query`` (dim,): shape (n,)."""
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
    return (matrix @ query) / np.where(norms == 0, 1.0, norms)


def recall_at_k(returned: Sequence, similarities: dict, *, k: int) -> float:
    """Share of the exact top ``k`` that ``returned`` holds, counting ties as hits.

    ``similarities`` maps every candidate id to its exact similarity. A returned id counts
    when its similarity is at least the exact k-th best (less 1e-5: float32 rounding), so a
    search that returns one of two identical texts is not penalised for picking the other.
    Denominator ``min(k, number of candidates)``; 1.0 when there is no candidate.
    """
    ranked = sorted(similarities.values(), reverse=True)
    want = min(k, len(ranked))
    if want == 0:
        return 1.0
    threshold = ranked[want - 1] - 1e-5
    hits = sum(1 for doc_id in list(dict.fromkeys(returned))[:want] if similarities.get(doc_id, -np.inf) >= threshold)
    return hits / want


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` in MB, None without a pid."""
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def children_rss_mb(pid: int | None) -> tuple[int, float] | None:
    """``(count, MB)``: the child processes of ``pid`` (its inference processes) and the sum
    of their resident memory (pages they share with each other count once per process)."""
    if pid is None:
        return None
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return len(children), round(sum(child.memory_info().rss for child in children) / 2**20, 1)


class QueryBench:
    """Memory queries over a large bulk-loaded database: open loop, then closed loop; exactness; memory."""

    name = "query"
    help = "query latency at a fixed rate and flat out over many users; vector search exactness; server memory"

    @staticmethod
    def add_arguments(parser) -> None:
        parser.set_defaults(clients=16)
        parser.add_argument("--users", type=int, default=1000, help="users in the bench database")
        parser.add_argument("--messages-per-user", type=int, default=200, help="flushed messages per user")
        parser.add_argument("--rate", type=float, default=50.0, help="offered queries per second (open loop)")
        parser.add_argument("--duration", type=float, default=30.0, help="seconds of the open-loop phase")
        parser.add_argument("--closed-duration", type=float, default=30.0, help="seconds of the closed-loop phase")
        parser.add_argument("--top-k", type=int, default=10, help="results per query")
        parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                            help="no pass querying every user once before the load (phases then see cold users)")
        parser.add_argument("--exactness-users", type=int, default=20, help="users sampled by the exactness check (0: skip)")
        parser.add_argument("--hnsw-index", action="store_true",
                            help="also measure a filtered HNSW search: build an HNSW index for the check, "
                                 "dropped after it (minutes on 200,000 rows; the service has none)")
        parser.add_argument("--tag", default="default", help="name of the bench dataset (reused while its shape matches)")
        parser.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if it exists")
        parser.add_argument("--drop", action="store_true", help="delete the dataset at the end (default: keep it for reuse)")
        parser.add_argument("--data", type=Path, default=LOCOMO_DEV, help="LoCoMo file whose conversations users hold")

    @staticmethod
    def validate(options: dict) -> None:
        for option in ("users", "messages_per_user", "top_k"):
            if options[option] <= 0:
                raise CommandError(f"--{option.replace('_', '-')} must be > 0 (got {options[option]})")
        for option in ("rate", "duration", "closed_duration"):
            if options[option] <= 0:
                raise CommandError(f"--{option.replace('_', '-')} must be > 0 (got {options[option]})")
        if options["exactness_users"] < 0:
            raise CommandError(f"--exactness-users must be >= 0 (got {options['exactness_users']})")
        if not options["data"].exists():
            raise CommandError(f"--data: no such file {options['data']}")

    def __init__(self, options: dict, *, run_id: str) -> None:
        from memory.management.bench_dataset import QueryDataset

        self.options = options
        self.run_id = run_id
        self.rng = random.Random(options["seed"])
        try:
            self.dataset = QueryDataset(
                tag=options["tag"], users=options["users"], per_user=options["messages_per_user"], path=options["data"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommandError(f"--data/--messages-per-user: {exc}") from None
        self.users: list = []
        self.queried: set[int] = set()  # users this run has queried: the server has them cached

    def config(self) -> dict:
        keys = ("users", "messages_per_user", "rate", "duration", "closed_duration", "top_k", "warmup", "tag")
        return {
            **{key: self.options[key] for key in keys},
            "data": str(self.options["data"]),
            "user_cache_mb": settings.MEMFUSE["USER_CACHE_MB"],
            "retrieval": {
                key: settings.MEMFUSE[key]
                for key in ("BM25_WEIGHT", "VECTOR_WEIGHT", "SPEAKER_WEIGHT", "FUSION", "CANDIDATES_PER_RETRIEVER")
            },
        }

    def prepare(self, log) -> dict:
        started = time.perf_counter()
        built = self.dataset.ensure(rebuild=self.options["rebuild"], log=log)
        self.users = self.dataset.users()
        log(f"dataset: {'reused' if built['reused'] else 'built'} in {time.perf_counter() - started:.1f} s")
        questions = sum(1 for user in self.users if user.questions)
        report = {
            "dataset": {
                **built,
                "users": len(self.users),
                "messages": len(self.users) * self.options["messages_per_user"],
                "users_queried_with_questions": questions,
                "users_queried_with_turns": len(self.users) - questions,
            }
        }
        if self.options["exactness_users"]:
            log("exactness check ...")
            report["exactness"] = self._exactness(log)
        return report

    async def bench_users(self, api: Api, created: list[str]) -> list:
        return self.users

    def key_tenant(self):
        return self.dataset.tenant()

    def finish(self) -> dict:
        if not self.options["drop"]:
            return {}
        return {"dropped_users": self.dataset.drop()}

    # --- exactness (in this process, before the server starts) ---

    def _exactness(self, log) -> dict:
        """Recall@k of the served vector search against numpy; of a filtered HNSW search too
        with ``--hnsw-index`` (the service has no HNSW index: migration 0006)."""
        from django.db import connection, transaction

        k = self.options["top_k"]
        sample = self.rng.sample(self.users, min(self.options["exactness_users"], len(self.users)))
        served_recall, served_ms, plan_out = [], [], []
        check_hnsw = self.options["hnsw_index"]
        hnsw = {setting: {"recall": [], "ms": []} for setting in HNSW_SETTINGS} if check_hnsw else {}
        with transaction.atomic():  # the check's HNSW index, if any, is rolled back with it
            if check_hnsw:
                log("exactness: building an HNSW index for the filtered-HNSW comparison")
                with connection.cursor() as cursor:
                    cursor.execute("CREATE INDEX bench_hnsw ON memory_message USING hnsw (embedding vector_cosine_ops)")
            self._exactness_queries(sample, k, served_recall, served_ms, hnsw, plan_out)
            transaction.set_rollback(True)
        return {
            "users": len(sample),
            "queries": len(served_recall),
            "k": k,
            "served_vector_search": {
                "what": "memory.retrieval.vector.candidates (exact per-user scan of the context embeddings)",
                "recall_mean": round(float(np.mean(served_recall)), 4),
                "recall_min": round(float(np.min(served_recall)), 4),
                "latency_ms": latency_summary(served_ms),
            },
            "filtered_hnsw": [
                {
                    "ef_search": ef_search,
                    "iterative_scan": iterative,
                    "recall_mean": round(float(np.mean(values["recall"])), 4),
                    "recall_min": round(float(np.min(values["recall"])), 4),
                    "latency_ms": latency_summary(values["ms"]),
                }
                for (ef_search, iterative), values in hnsw.items()
            ],
            "filtered_hnsw_plan": plan_out[0] if plan_out else "not measured (no --hnsw-index)",
        }

    def _exactness_queries(self, sample, k, served_recall, served_ms, hnsw, plan_out) -> None:
        """Served search vs numpy for each sampled user, and each ``hnsw`` setting when given."""
        from django.db import connection, transaction
        from pgvector import Vector

        from memory.inference import registry
        from memory.models import Message
        from memory.retrieval import vector

        embedder = registry.get_embedder()
        for user in sample:
            rows = list(
                Message.objects.filter(user_id=user.user_id, flushed_at__isnull=False).values_list("id", "context_embedding")
            )
            ids = [row[0] for row in rows]
            matrix = np.stack([np.asarray(row[1], dtype=np.float32) for row in rows])
            texts = self.rng.sample(user.queries, min(3, len(user.queries)))
            for query in embedder.embed(texts):
                # The served score is the inner product with the context embedding (a mean of
                # unit vectors, not unit itself): the exact answer ranks by it too.
                similarities = dict(zip(ids, (matrix @ query).tolist()))
                started = time.perf_counter()
                served, _, _ = vector.candidates(user_id=user.user_id, embedding=query, limit=k)
                served_ms.append((time.perf_counter() - started) * 1000)
                served_recall.append(recall_at_k([key.id for key, _ in served], similarities, k=k))
                sql = (
                    "SELECT id FROM memory_message WHERE user_id = %s AND flushed_at IS NOT NULL "
                    "ORDER BY embedding <=> %s::vector LIMIT %s"
                )
                params = [user.user_id, Vector._to_db(query), k]
                for setting in hnsw:
                    ef_search, iterative = setting
                    with transaction.atomic(), connection.cursor() as cursor:
                        cursor.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
                        cursor.execute(f"SET LOCAL hnsw.iterative_scan = {iterative}")
                        # Without this the planner takes the user_id btree and sorts (exact):
                        # the point is what the HNSW index returns for a filtered query.
                        cursor.execute("SET LOCAL enable_seqscan = off")
                        cursor.execute("SET LOCAL enable_bitmapscan = off")
                        cursor.execute("SET LOCAL enable_sort = off")
                        if not plan_out:
                            cursor.execute("EXPLAIN " + sql, params)
                            plan_out.append(" / ".join(re.sub(r"'\[[^']*\]'", "'[...]'", line) for (line,) in cursor.fetchall()))
                        started = time.perf_counter()
                        cursor.execute(sql, params)
                        returned = [row[0] for row in cursor.fetchall()]
                        hnsw[setting]["ms"].append((time.perf_counter() - started) * 1000)
                    hnsw[setting]["recall"].append(recall_at_k(returned, similarities, k=k))

    # --- load over HTTP ---

    def _pick(self) -> tuple:
        user = self.users[self.rng.randrange(len(self.users))]
        return user, self.rng.choice(user.queries)

    async def _query(self, api: Api, user, text: str, *, scheduled: float) -> QueryOutcome:
        cold = user.index not in self.queried
        self.queried.add(user.index)
        outcome = await api.query(str(user.user_id), text, top_k=self.options["top_k"], scheduled=scheduled)
        return dataclasses.replace(outcome, cold=cold)

    async def _pass(self, api: Api, users: list) -> dict:
        """One query per user, ``clients`` at a time (closed loop): fills the server's caches."""
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.options["clients"])

        async def one(user) -> QueryOutcome:
            async with limit:
                return await self._query(api, user, self.rng.choice(user.queries), scheduled=loop.time())

        started = loop.time()
        outcomes = await asyncio.gather(*(one(user) for user in users))
        return self._phase_report(outcomes, seconds=loop.time() - started)

    async def _open_loop(self, api: Api) -> dict:
        loop = asyncio.get_running_loop()
        offsets = scheduled_offsets(rate=self.options["rate"], duration=self.options["duration"])
        picks = [self._pick() for _ in offsets]
        t0 = loop.time() + 0.05
        tasks = []
        for offset, (user, text) in zip(offsets, picks):
            scheduled = t0 + offset
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._query(api, user, text, scheduled=scheduled)))
        outcomes = await asyncio.gather(*tasks)
        seconds = max(o.answered_at for o in outcomes) - t0
        return {"offered_rate": self.options["rate"], **self._phase_report(outcomes, seconds=seconds)}

    async def _closed_loop(self, api: Api) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options["closed_duration"]
        outcomes: list[QueryOutcome] = []

        async def client() -> None:
            while loop.time() < deadline:
                user, text = self._pick()
                outcomes.append(await self._query(api, user, text, scheduled=loop.time()))

        started = loop.time()
        await asyncio.gather(*(client() for _ in range(self.options["clients"])))
        return self._phase_report(outcomes, seconds=loop.time() - started)

    @staticmethod
    def _phase_report(outcomes: list[QueryOutcome], *, seconds: float) -> dict:
        ok = [o for o in outcomes if o.ok]
        cold = [o for o in ok if o.cold]
        return {
            "queries": len(outcomes),
            "errors": len(outcomes) - len(ok),
            "error_kinds": dict(Counter(o.error for o in outcomes if not o.ok)),
            "seconds": round(seconds, 2),
            "served_rate": round(len(ok) / seconds, 2) if seconds > 0 else None,
            "latency_ms": latency_summary([o.latency_ms for o in ok]),
            "cold_users": len(cold),
            "cold_latency_ms": latency_summary([o.latency_ms for o in cold]),
            "warm_latency_ms": latency_summary([o.latency_ms for o in ok if not o.cold]),
            "empty_results": sum(1 for o in ok if o.results == 0),
        }

    async def run(self, api: Api, users: list, server: ServerProcess | None) -> dict:
        pid = server.pid if server is not None else None
        memory: dict = {"rss_mb_before_queries": rss_mb(pid)}
        first = users[:MEMORY_FIRST_USERS]
        phases = {"first_users": await self._pass(api, first)}
        memory["rss_mb_first_users"] = rss_mb(pid)
        memory["first_users_cached"] = len(self.queried)
        if self.options["warmup"]:
            phases["warmup"] = await self._pass(api, users[MEMORY_FIRST_USERS:])
            memory["rss_mb_all_users"] = rss_mb(pid)
            memory["users_cached"] = len(self.queried)  # the default USER_CACHE_MB holds them all
        phases["open_loop"] = await self._open_loop(api)
        phases["closed_loop"] = await self._closed_loop(api)
        if not self.options["warmup"]:
            memory["rss_mb_all_users"] = rss_mb(pid)
            memory["users_cached"] = len(self.queried)  # the default USER_CACHE_MB holds them all
        grown = memory["users_cached"] - memory["first_users_cached"]
        if pid is not None and grown > 0:
            growth = memory["rss_mb_all_users"] - memory["rss_mb_first_users"]
            memory["growth_kb_per_cached_user"] = round(growth * 1024 / grown, 1)
        if server is not None:
            # The registry logs each load of the serving process's own model (none when every
            # model is in an inference process); each inference process (queries, flushes)
            # logs its own start, once.
            log = server.log_path.read_text(errors="replace")
            memory["model_loads_in_server_log"] = log.count("embedding model loaded")
            memory["inference_process_starts_in_server_log"] = len(re.findall(r"embedding process \d+ ready", log))
            memory["child_processes"], memory["children_rss_mb"] = children_rss_mb(pid)
        else:
            memory["skipped"] = "--url: the server's process is not ours to read"
        return {**phases, "server_memory": memory}

    @staticmethod
    def summary(report: dict) -> list[str]:
        lines = []
        dataset = report["dataset"]
        how = "reused" if dataset["reused"] else f"built in {dataset['seconds']} s"
        lines.append(f"dataset: {dataset['users']} users, {dataset['messages']} messages, {how}")
        for name in ("first_users", "warmup", "open_loop", "closed_loop"):
            phase = report.get(name)
            if phase is None:
                continue
            latency = phase["latency_ms"]
            lines.append(
                f"{name}: {phase['queries']} queries, {phase['errors']} errors, {phase['served_rate']}/s served; "
                f"ms p50 {latency['p50']} p95 {latency['p95']} p99 {latency['p99']}; cold users {phase['cold_users']}"
            )
        if "exactness" in report:
            served = report["exactness"]["served_vector_search"]
            lines.append(
                f"exactness: served vector search recall@{report['exactness']['k']} {served['recall_mean']} "
                f"(min {served['recall_min']})"
            )
            for row in report["exactness"]["filtered_hnsw"]:
                lines.append(
                    f"  filtered HNSW ef_search {row['ef_search']} iterative {row['iterative_scan']}: "
                    f"recall {row['recall_mean']} (min {row['recall_min']}), p50 {row['latency_ms']['p50']} ms"
                )
        memory = report["server_memory"]
        if "growth_kb_per_cached_user" in memory:
            lines.append(
                f"server memory: {memory['rss_mb_first_users']} MB with {memory['first_users_cached']} users cached, "
                f"{memory['rss_mb_all_users']} MB with {memory['users_cached']}: "
                f"{memory['growth_kb_per_cached_user']} KB per user; "
                f"model loads {memory.get('model_loads_in_server_log')}; "
                f"{memory.get('child_processes')} inference processes, {memory.get('children_rss_mb')} MB"
            )
        return lines


def raw_model_throughput(texts: list[str]) -> dict:
    """Embed ``texts`` as a flush indexes them, in chunks as the batcher feeds the model.

    Chunks of ``EMBEDDING_MAX_BATCH_TEXTS`` texts (the most one batched model call takes),
    each encoded text by text (the int8 document model) or in batches of
    ``EMBEDDING_BATCH_SIZE`` (the full model). One untimed chunk first, as the
    server's model is warm by then. Returns ``{"messages_per_s", "seconds"}``.
    """
    import torch

    from memory.inference import registry
    from memory.services import message_index_text

    embedder = registry.local_document_embedder()
    # The model at its best, with the threads flush inference uses: one for the int8 model
    # (a text at a time), TORCH_THREADS for batches of the full model.
    torch.set_num_threads(1 if registry.documents_int8() else settings.MEMFUSE["TORCH_THREADS"])
    chunk = settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"]
    index_texts = [message_index_text(content=text, metadata={}) for text in texts]
    embedder.embed(index_texts[:chunk])
    started = time.perf_counter()
    for start in range(0, len(index_texts), chunk):
        embedder.embed(index_texts[start : start + chunk])
    seconds = time.perf_counter() - started
    return {"messages_per_s": round(len(index_texts) / seconds, 2), "seconds": round(seconds, 3)}


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


BENCHMARKS: dict[str, type[Benchmark]] = {IngestBench.name: IngestBench, QueryBench.name: QueryBench}


# --- the command -------------------------------------------------------------------------------


def bench_key(run_id: str, *, tenant=None) -> tuple:
    """A tenant key for the run, written to the server's database directly.

    With ``tenant`` (a benchmark's own data, e.g. the query dataset's): a key of that tenant.
    Otherwise a new tenant ``bench-<run_id>``. Returns ``(tenant created or None, ApiKey, key)``:
    what to delete afterwards, and the key to send.
    """
    from memory import services
    from memory.models import KeyScope

    created = None
    if tenant is None:
        tenant = created = services.tenant_create(name=f"bench-{run_id}")
    api_key, key = services.api_key_create(scope=KeyScope.TENANT, tenant=tenant, name=f"memfuse_bench {run_id}")
    return created, (None if created else api_key), key


class Command(BaseCommand):
    help = "Benchmark the service over HTTP and print the results as JSON (see the module docstring)."

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
        for name, bench in BENCHMARKS.items():
            sub = subparsers.add_parser(name, help=bench.help)
            sub.add_argument("--url", help="base URL of a running server (default: start one on loopback)")
            sub.add_argument(
                "--server",
                choices=SERVERS,
                default="uvicorn",
                help="the server the bench starts without --url: uvicorn (the README's production command; "
                "default) or runserver (daphne's, the quick start)",
            )
            sub.add_argument(
                "--api-key",
                default=os.environ.get("MEMFUSE_API_KEY"),
                help="a tenant key of the --url server (default: $MEMFUSE_API_KEY)",
            )
            sub.add_argument("--clients", type=int, default=64, help="concurrent clients")
            sub.add_argument("--json", dest="json_out", type=Path, help="also write the results to this file")
            sub.add_argument("--seed", type=int, help="seed of text selection (default: random, reported)")
            bench.add_arguments(sub)

    def handle(self, *args, **options):
        serving.declare(serving.TOOL)  # loads the models of a process running retrieval
        bench_class = BENCHMARKS[options["benchmark"]]
        if options["clients"] <= 0:
            raise CommandError(f"--clients must be > 0 (got {options['clients']})")
        bench_class.validate(options)
        if options["url"] and not options["api_key"]:
            raise CommandError("--api-key: a tenant key of the --url server is required (or set MEMFUSE_API_KEY)")
        if options["url"] and not health_ok(options["url"], timeout=10):
            raise CommandError(f"--url: {options['url']} is unreachable (no 200 from {HEALTH_PATH})")
        if options["seed"] is None:
            options["seed"] = random.SystemRandom().randrange(2**31)
        run_id = uuid.uuid4().hex[:8]
        bench = bench_class(options, run_id=run_id)

        # The machine may be shared: the load around the run says how far to trust the figures.
        loadavg_start = [round(value, 2) for value in os.getloadavg()]
        server = None
        url = options["url"]
        server_info: dict = {}
        tenant = api_key = None
        migrate_if_embedded()  # the embedded database may be new: prepare() writes to it
        prepared = bench.prepare(self.stderr.write)
        try:
            if not url:
                server = ServerProcess(
                    log_path=Path(f"/tmp/memfuse-bench-{run_id}-server.log"),
                    kind=options["server"],
                    env={"API_RATE_LIMIT": bench_rate_limit()},
                )
                self.stderr.write(f"starting {server.kind} (log: {server.log_path}) ...")
                url = server.start()
            if not options["api_key"]:
                tenant, api_key, options["api_key"] = bench_key(run_id, tenant=bench.key_tenant())
            # This process holds the model too (raw throughput, exactness): ~0.5 million
            # objects whose full garbage-collector passes (~0.3 s) would stall the client's
            # event loop and count as the server's latency. Out of the collector's reach.
            gc.collect()
            gc.freeze()
            try:
                results = asyncio.run(self._run(bench, url, options, server))
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
            finished = bench.finish()

        report = {
            "benchmark": bench_class.name,
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
        for line in bench.summary(report):
            self.stderr.write(line)
        host = report["host"]
        self.stderr.write(
            f"host: {host['cpu_count']} cores, load average (1 min) {host['loadavg_start'][0]} at start, "
            f"{host['loadavg_end'][0]} at end"
        )
        text = json.dumps(report, indent=2)
        if options["json_out"]:
            options["json_out"].write_text(text + "\n")
        self.stdout.write(text)

    async def _run(self, bench: Benchmark, url: str, options: dict, server: ServerProcess | None) -> dict:
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
            self.stderr.write(f"cleanup: {cleanup_failures} deletions failed")
        return results


# The chat benchmark lives with the tools (benchmarks/) and builds on the pieces above.
from benchmarks.chat import ChatBench  # noqa: E402

BENCHMARKS[ChatBench.name] = ChatBench
