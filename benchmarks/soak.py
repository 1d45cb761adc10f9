"""``manage.py soak_bench soak``: mixed load for minutes; memory, errors, backlog. ``pool-check``: what the
pool's connection check costs.

``soak`` drives a real server over HTTP and WebSocket (``--url`` with ``--api-key``, or a
uvicorn subprocess started here on this process's database (``benchmarks.server``), with
``--server-env NAME=VALUE`` added to its environment; with ``--url``, ``--server-pid`` names the
process whose memory to read) with:

- ``--users`` add clients, each adding one round (a user and an assistant message) to its own
  session at ``--add-rate / users`` per second (paced: a late add goes at once, none piles up;
  the clients' first adds spread over the interval, so the adds arrive evenly, not in bursts);
- ``--query-clients`` clients querying a random user at ``--query-rate`` in all;
- ``--ws-clients`` WebSocket clients, each connecting to a session, sending ``--ws-frames``
  frames (an add, then a query, alternately), leaving, and connecting again.

Every ``--sample-seconds`` it reads the resident memory of the server (``web_rss_mb``) and of
its child processes (``inference_rss_mb``: the query and flush embedding processes, and
multiprocessing's forkserver and resource tracker, RSS summed) and the health endpoint's
status; with an operator key (the one it creates, or ``--operator-key``), the backlog, the
per-user cache's bytes and the web process's C heap (bytes in use and free, ``GET
/api/v1/admin/stats``). After ``--duration`` s the load stops and it waits (up to
``--drain-timeout`` s) for the backlog to empty. The JSON has the answers by kind and status,
the first errors, latency percentiles, the samples, the memory slope in MB/hour of each
process group (least squares over the samples after the first ``--warmup`` s, and over each
30 minutes after it), its maximum, the largest backlog and the time to drain it.

``respawn`` (``benchmarks.respawn``) starts servers and reports their start, the memory of
each of their processes and the return of a killed query process. ``ws-connections``
(``benchmarks.ws_connections``): the web process's memory per open WebSocket connection.
``tenants`` (``benchmarks.tenants``): three well-behaved tenants alone, then beside an abusive one.

``pool-check`` times ``getconn`` + ``putconn`` on a psycopg pool of this process's database
with and without psycopg_pool's ``check_connection`` (Django's ``CONN_HEALTH_CHECKS``): the
cost the check adds to each request that takes a connection.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from django.core.management.base import CommandError
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

from benchmarks.errors import BenchError
from benchmarks.index_load import index_load
from benchmarks.respawn import respawn
from benchmarks.server import ServerProcess, bench_rate_limit, children_rss_mb, health, rss_mb
from benchmarks.stats import latency_summary, slope_mb_per_hour
from benchmarks.targets import Target, soak_targets
from benchmarks.tenants import TENANTS_DEFAULTS, tenants_bench
from benchmarks.ws_connections import ws_connections

REQUEST_TIMEOUT = 30.0  # s
TOPICS = ["hiking", "pottery", "a puppy", "a marathon", "tomatoes", "chess", "Lisbon", "a museum", "a recipe", "jazz"]
SLOPE_WINDOW_S = 1800.0  # s: the soak's memory slopes are also fitted over windows of this length
# The defaults of the options whose default depends on the mode (``tenants`` has its own).
SOAK_DEFAULTS = {"duration": 600.0, "warmup": 60.0, "add_rate": 20.0, "drain_timeout": 600.0}
CONFIG_OPTIONS = ("duration", "warmup", "users", "add_rate", "query_rate", "query_clients", "ws_clients", "ws_frames", "sample_seconds")


@dataclass
class Outcome:
    """One answer: kind (``add``, ``query``, ``ws_add``, ``ws_query``, ``ws_connect``), status
    (HTTP status, error frame code, 0 for a network error), send and answer times (monotonic s)."""

    kind: str
    status: int
    sent: float
    answered: float
    retry_after: str | None = None
    message_ids: list[str] = field(default_factory=list)
    detail: str = ""


class Recorder:
    """Thread-safe list of outcomes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def _round(client: int, n: int) -> list[dict]:
    topic = TOPICS[(client + n) % len(TOPICS)]
    tag = f"soak c{client} n{n} {uuid.uuid4().hex[:8]}"
    return [
        {"role": "user", "content": f"[{tag}] I spent the weekend on {topic} with my sister."},
        {"role": "assistant", "content": f"[{tag}] That sounds lovely: how did {topic} go?"},
    ]


class MixedLoad:
    """Adds, queries and WebSocket clients against ``url`` until ``stop()``; outcomes in ``recorder``.

    ``targets``: one session per add client; WebSocket clients cycle over them too.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        targets: list[Target],
        *,
        add_rate: float,
        query_rate: float = 0.0,
        query_clients: int = 1,
        ws_clients: int = 0,
        ws_frames: int = 6,
        ws_pause: float = 0.2,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.api_key = api_key
        self.targets = targets
        self.add_rate, self.query_rate, self.query_clients = add_rate, query_rate, query_clients
        self.ws_clients, self.ws_frames, self.ws_pause = ws_clients, ws_frames, ws_pause
        self.recorder = Recorder()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.add_rate > 0:
            for index, target in enumerate(self.targets):
                self._spawn(self._adds, index, target, len(self.targets) / self.add_rate)
        if self.query_rate > 0:
            for index in range(self.query_clients):
                self._spawn(self._queries, index, self.query_clients / self.query_rate)
        for index in range(self.ws_clients):
            self._spawn(self._websocket, index)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _paced(self, interval: float, offset: float = 0.0):
        """Yields 0, 1, 2, ... at ``interval`` s apart (later when the previous call was slow),
        the first after ``offset`` s."""
        n, next_at = 0, time.monotonic() + offset
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            next_at = max(next_at + interval, time.monotonic() - interval)
            yield n
            n += 1

    def _post(self, http: requests.Session, kind: str, path: str, body: dict) -> Outcome:
        sent = time.monotonic()
        try:
            response = http.post(self.url + path, json=body, headers=self.headers, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            return Outcome(kind, 0, sent, time.monotonic(), detail=type(exc).__name__)
        answered = time.monotonic()
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        data = payload.get("data") if isinstance(payload, dict) else None
        ids = list(data.get("message_ids", [])) if response.status_code == 201 and isinstance(data, dict) else []
        detail = "" if response.status_code < 400 else str(payload.get("message", ""))[:200]
        return Outcome(kind, response.status_code, sent, answered, response.headers.get("Retry-After"), ids, detail)

    def _adds(self, client: int, target: Target, interval: float) -> None:
        # Clients spread over the interval: started in phase, they would all send at the same
        # instant, every interval, and time a burst of as many adds as there are clients.
        with requests.Session() as http:
            for n in self._paced(interval, offset=interval * client / len(self.targets)):
                self.recorder.add(self._post(http, "add", f"/api/v1/sessions/{target.session_id}/messages", {"messages": _round(client, n)}))

    def _queries(self, client: int, interval: float) -> None:
        with requests.Session() as http:
            for n in self._paced(interval, offset=interval * client / self.query_clients):
                target = self.targets[(client + n) % len(self.targets)]
                body = {"query": f"what did I do with {TOPICS[n % len(TOPICS)]}?", "top_k": 5}
                self.recorder.add(self._post(http, "query", f"/api/v1/users/{target.user_id}/query", body))

    def _websocket(self, client: int) -> None:
        ws_url = self.url.replace("http", "ws", 1)
        n = 0
        while not self._stop.is_set():
            target = self.targets[(client + n) % len(self.targets)]
            sent = time.monotonic()
            try:
                with ws_connect(
                    f"{ws_url}/ws/v1/sessions/{target.session_id}/",
                    origin="http://127.0.0.1",
                    additional_headers=self.headers,
                    open_timeout=REQUEST_TIMEOUT,
                ) as ws:
                    self.recorder.add(Outcome("ws_connect", 101, sent, time.monotonic()))
                    for frame in range(self.ws_frames):
                        if self._stop.is_set():
                            break
                        self._ws_frame(ws, client, n, frame)
                        n += 1
                        self._stop.wait(self.ws_pause)
            except (OSError, WebSocketException, TimeoutError) as exc:
                close = getattr(getattr(exc, "rcvd", None), "code", None)
                self.recorder.add(Outcome("ws_connect", close or 0, sent, time.monotonic(), detail=type(exc).__name__))
                self._stop.wait(0.5)

    def _ws_frame(self, ws, client: int, n: int, frame: int) -> None:
        sent = time.monotonic()
        if frame % 2 == 0:
            ws.send(json.dumps({"type": "messages.add", "request_id": n, "messages": _round(1000 + client, n)}))
            answer = json.loads(ws.recv(timeout=REQUEST_TIMEOUT))
            while answer["type"] == "flush.completed":  # pushed between our frames
                answer = json.loads(ws.recv(timeout=REQUEST_TIMEOUT))
            if answer["type"] == "messages.added":
                self.recorder.add(Outcome("ws_add", 201, sent, time.monotonic(), message_ids=answer["message_ids"]))
            else:
                self._ws_error("ws_add", answer, sent)
            return
        ws.send(json.dumps({"type": "memory.query", "request_id": n, "query": f"what about {TOPICS[n % len(TOPICS)]}?"}))
        while True:
            answer = json.loads(ws.recv(timeout=REQUEST_TIMEOUT))
            if answer["type"] == "flush.completed":
                continue
            if answer["type"] == "error":
                self._ws_error("ws_query", answer, sent)
                return
            if answer.get("final"):
                self.recorder.add(Outcome("ws_query", 200, sent, time.monotonic()))
                return

    def _ws_error(self, kind: str, answer: dict, sent: float) -> None:
        error = answer.get("error", {})
        self.recorder.add(Outcome(kind, error.get("code", 0), sent, time.monotonic(), detail=str(error.get("message", ""))[:200]))


def summarise(outcomes: list[Outcome], *, started: float) -> dict:
    """Counts by kind and status, the first errors, latency (ms) of successes by kind."""
    counts: dict[str, Counter] = {}
    latencies: dict[str, list[float]] = {}
    errors = []
    for outcome in outcomes:
        counts.setdefault(outcome.kind, Counter())[str(outcome.status)] += 1
        if outcome.status in (101, 200, 201):
            latencies.setdefault(outcome.kind, []).append((outcome.answered - outcome.sent) * 1000)
        elif len(errors) < 20:
            errors.append({"kind": outcome.kind, "status": outcome.status, "at_s": round(outcome.sent - started, 2), "detail": outcome.detail})
    return {
        "answers": {kind: dict(sorted(c.items())) for kind, c in sorted(counts.items())},
        "first_errors": errors,
        "latency_ms": {kind: latency_summary(values) for kind, values in sorted(latencies.items())},
    }


def soak_bench(options: dict, *, write) -> dict:
    """``options["mode"]`` (``soak``, ``pool-check``, ``index-load``, ``respawn``, ``ws-connections`` or ``tenants``) with the command's options; the report,
    also written as JSON through ``write(str)`` and to ``options["json_out"]`` when set.

    Raises ``CommandError`` naming a bad option, or when the run cannot go on.
    """
    defaults = TENANTS_DEFAULTS if options["mode"] == "tenants" else SOAK_DEFAULTS
    options = {**options, **{name: value for name, value in defaults.items() if options.get(name) is None}}
    for name in ("duration", "add_rate", "sample_seconds"):
        if options[name] <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive")
    if options["url"] and not options["api_key"]:
        raise CommandError("--url needs --api-key (a tenant key)")
    try:
        env = dict(item.split("=", 1) for item in options["server_env"])
    except ValueError:
        raise CommandError("--server-env takes NAME=VALUE") from None
    if options["mode"] == "pool-check":
        result = pool_check(options["iterations"])
    elif options["mode"] == "index-load":
        try:
            sizes = [int(size) for size in options["sizes"].split(",")]
        except ValueError:
            raise CommandError("--sizes takes comma-separated message counts") from None
        result = index_load(sizes, options["repeats"], log=write)
    elif options["mode"] == "respawn":
        result = respawn(options["repeats"], options["users"], log=write)
    elif options["mode"] == "ws-connections":
        result = ws_connections(options["connections"], options["users"], env)
    elif options["mode"] == "tenants":
        result = tenants_bench(options, env)
    else:
        result = soak(options, env)
    text = json.dumps(result, indent=2)
    if options["json_out"]:
        options["json_out"].write_text(text + "\n")
    write(text)
    return result


def pool_check(iterations: int) -> dict:
    """µs per ``getconn`` + ``putconn`` on a one-connection psycopg pool of this process's
    database, without and with ``ConnectionPool.check_connection``: three timed passes of
    ``iterations`` pairs each, their median, and the difference (the check's cost)."""
    from django.db import connection
    from psycopg_pool import ConnectionPool

    params = connection.get_connection_params()
    params.pop("pool", None)
    params.pop("cursor_factory", None)
    params.pop("context", None)
    results = {}
    for name, check in (("no_check", None), ("check_connection", ConnectionPool.check_connection)):
        pool = ConnectionPool(kwargs={**params, "autocommit": True}, min_size=1, max_size=1, check=check, open=True)
        try:
            pool.wait()
            passes = []
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(iterations):
                    pool.putconn(pool.getconn())
                passes.append((time.perf_counter() - started) / iterations * 1e6)
        finally:
            pool.close()
        results[name] = {"us_per_getconn": [round(r, 1) for r in passes], "median_us": round(float(np.median(passes)), 1)}
    results["check_cost_us"] = round(results["check_connection"]["median_us"] - results["no_check"]["median_us"], 1)
    results["database"] = {"host": params.get("host"), "port": params.get("port")}
    return results


def soak(options: dict, env: dict) -> dict:
    """The mixed load against ``--url`` or a uvicorn started here with ``env`` added; the report."""
    from memory.models import KeyScope, Tenant
    from memory.services.api_keys import api_key_create
    from memory.services.tenants import tenant_create

    run = uuid.uuid4().hex[:8]
    server = None
    tenant = operator = None
    url, key = options["url"], options["api_key"]
    operator_secret = options.get("operator_key")
    try:
        if not url:
            tenant = tenant_create(name=f"soak-{run}")
            key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="soak")[1]
            # To read the server's per-user cache (its bytes are part of the web process's).
            operator, operator_secret = api_key_create(scope=KeyScope.OPERATOR, name=f"soak {run}")
            log = Path(f"/tmp/memfuse-soak-{run}-server.log")
            server = ServerProcess(log_path=log, env={"API_RATE_LIMIT": bench_rate_limit(), **env}, kind="uvicorn")
            url = server.start()
        targets = soak_targets(url, key, options["users"], run)
        pid = server.pid if server is not None else options["server_pid"]
        result = _soak_run(url, key, targets, pid, options, operator_secret=operator_secret)
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    finally:
        stopped = server.stop() if server is not None else {}
        if tenant is not None:
            Tenant.objects.filter(pk=tenant.pk).delete()
        if operator is not None:
            operator.delete()
    result["server"] = {"url": url, "env": env, **stopped}
    return result


def _soak_run(url: str, key: str, targets: list[Target], pid: int | None, options, *, operator_secret: str | None) -> dict:
    load = MixedLoad(
        url,
        key,
        targets,
        add_rate=options["add_rate"],
        query_rate=options["query_rate"],
        query_clients=options["query_clients"],
        ws_clients=options["ws_clients"],
        ws_frames=options["ws_frames"],
    )
    samples = []
    started = time.monotonic()
    load.start()
    try:
        while time.monotonic() - started < options["duration"]:
            time.sleep(min(options["sample_seconds"], max(0.0, options["duration"] - (time.monotonic() - started))))
            samples.append(_sample(url, pid, started, operator_secret))
    finally:
        load.stop()
    load_seconds = time.monotonic() - started
    drained = _drain(url, pid, started, samples, options, operator_secret)
    outcomes = load.recorder.snapshot()
    backlog = [s["pending_messages"] for s in samples if s["pending_messages"] is not None]
    adds = [o for o in outcomes if o.kind in ("add", "ws_add")]
    return {
        "config": {k: options[k] for k in CONFIG_OPTIONS},
        "load_seconds": round(load_seconds, 1),
        "served_adds_per_s": round(sum(1 for o in adds if o.status == 201) / load_seconds, 2),
        **summarise(outcomes, started=started),
        "memory": _memory(samples, warmup=options["warmup"]),
        "backlog": {"max_pending_messages": max(backlog) if backlog else None, "drain_seconds": drained},
        "samples": samples,
    }


def _drain(url: str, pid: int | None, started: float, samples: list[dict], options, operator_secret: str | None) -> float | None:
    """Sample until the backlog is empty (appended to ``samples``): seconds it took, None if it did not."""
    drain_started = time.monotonic()
    while time.monotonic() - drain_started < options["drain_timeout"]:
        sample = _sample(url, pid, started, operator_secret)
        samples.append({**sample, "draining": True})
        if sample["pending_messages"] == 0:
            return round(time.monotonic() - drain_started, 1)
        if sample["pending_messages"] is None:  # no operator key, or no answer: no backlog figure
            return None
        time.sleep(options["sample_seconds"])
    return None


def _memory(samples: list[dict], *, warmup: float, window: float = SLOPE_WINDOW_S) -> dict:
    """Per process group: the slope (MB/hour) of the samples after ``warmup`` s, and of each
    ``window`` s after it (``slopes_by_window``: ``[start s, end s, slope]``, a last window
    shorter than half of ``window`` joined to the one before: whether the growth slows), first,
    max, last; also of the per-user cache's bytes (``user_cache_mb``, bounded by
    ``USER_CACHE_MB``), of the web process without them (``web_rss_without_cache_mb``): what the
    cache filling up to its bound explains, and what it does not; and of the web process's C
    heap, its bytes in use and the free bytes its arenas hold (``heap_in_use_mb``,
    ``heap_free_mb``)."""
    for sample in samples:
        web, cache = sample["web_rss_mb"], sample.get("user_cache_mb")
        sample["web_rss_without_cache_mb"] = round(web - cache, 1) if web is not None and cache is not None else None
    steady = [s for s in samples if not s.get("draining") and s["t_s"] >= warmup]
    memory = {}
    names = ("web_rss_mb", "inference_rss_mb", "user_cache_mb", "web_rss_without_cache_mb", "heap_in_use_mb", "heap_free_mb")
    for name in names:
        values = [(s["t_s"], s[name]) for s in steady if s.get(name) is not None]
        all_values = [s[name] for s in samples if s.get(name) is not None]
        memory[name] = {
            "slope_mb_per_hour": slope_mb_per_hour(values),
            "slopes_by_window": _window_slopes(values, start=warmup, window=window),
            "first": all_values[0] if all_values else None,
            "max": max(all_values) if all_values else None,
            "last": all_values[-1] if all_values else None,
        }
    return memory


def _window_slopes(values: list[tuple[float, float]], *, start: float, window: float) -> list[list[float | None]]:
    if not values:
        return []
    end = values[-1][0]
    bounds = [start + i * window for i in range(int((end - start) // window) + 1)] + [end]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < window / 2:
        del bounds[-2]
    return [
        [lo, hi, slope_mb_per_hour([(t, mb) for t, mb in values if lo <= t <= hi])]
        for lo, hi in zip(bounds, bounds[1:])
        if hi > lo
    ]


def _operator_figures(url: str, operator_secret: str | None) -> dict:
    """From the server's ``GET admin/stats`` (with an operator key): the backlog (pending
    messages, the oldest one's age in s), its per-user cache and its C heap's bytes in use and
    free, in MB (``{}`` without a key or an answer)."""
    if not operator_secret:
        return {}
    try:
        response = requests.get(
            url.rstrip("/") + "/api/v1/admin/stats", headers={"Authorization": f"Bearer {operator_secret}"}, timeout=5
        )
        data = response.json()["data"]
        ram = data["process"].get("ram") or {}
        return {
            "pending_messages": data["buffers"]["pending_messages"],
            "oldest_pending_age_s": data["buffers"]["oldest_pending_age_s"],
            "user_cache_mb": round(data["user_cache"]["bytes"] / 2**20, 1),
            "heap_in_use_mb": ram.get("heap_in_use_mb"),
            "heap_free_mb": ram.get("heap_free_mb"),
        }
    except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _sample(url: str, pid: int | None, started: float, operator_secret: str | None = None) -> dict:
    figures = health(url) or {}
    children = children_rss_mb(pid)
    return {
        "t_s": round(time.monotonic() - started, 1),
        "web_rss_mb": rss_mb(pid),
        "inference_rss_mb": children[1] if children is not None else None,
        "user_cache_mb": None,
        "heap_in_use_mb": None,
        "heap_free_mb": None,
        "pending_messages": None,
        "oldest_pending_age_s": None,
        **_operator_figures(url, operator_secret),
        "health": figures.get("status"),
    }
