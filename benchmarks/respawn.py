"""``manage.py soak_bench respawn``: how long the service takes to start, what its processes
hold, and how long a killed query process takes to come back.

Each of ``--repeats`` runs starts a uvicorn subprocess on this process's database
(``benchmarks.server``) and reports:

- ``start_s``: from the server's start to the first 200 of its health endpoint (its models
  loaded: ``MemoryConfig.ready()`` waits for them);
- ``memory``: after ``--users`` users have each added a round and queried, and the operator
  figures report no pending message (at most ``FLUSH_TIMEOUT_S`` s), each process of the
  server's tree (``web``, the ``query`` and ``background`` inference processes,
  multiprocessing's ``forkserver`` and ``resource_tracker``) in MB: resident (RSS),
  proportional (PSS: a page that n processes map counts 1/n in each) and unique (USS: the
  pages of that process alone), and their sums. RSS summed counts shared pages once per
  process; PSS summed is what the service holds;
- ``respawn``: the query process is killed with SIGKILL, and a query (of a new text each
  time) is sent every ``POLL_S`` s until one answers 200: the seconds that took and the
  answers before it, by status (a query that meets a dead query process answers 503, the next
  one waits for the new process).

The query process is found by its pid in the server's ``GET /api/v1/admin/stats``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import requests
from django.core.management.base import CommandError

from benchmarks.errors import BenchError
from benchmarks.server import ServerProcess, bench_rate_limit, bench_tenant, memory_mb

FLUSH_TIMEOUT_S = 60.0
POLL_S = 0.05
RESPAWN_TIMEOUT_S = 120.0
REQUEST_TIMEOUT = 30.0


def respawn(repeats: int, users: int, *, log) -> dict:
    """``repeats`` runs of a started server (see the module); the report.

    Raises ``CommandError`` when ``repeats`` or ``users`` is not positive, or a run fails.
    """
    if repeats <= 0 or users <= 0:
        raise CommandError("--repeats and --users must be positive")
    run = uuid.uuid4().hex[:8]
    runs = []
    with bench_tenant(f"respawn-{run}", operator=True) as (key, operator_secret):
        try:
            for index in range(repeats):
                runs.append(_run(f"{run}-{index}", key, operator_secret, users))
                log(f"run {index + 1}: {runs[-1]['start_s']} s to start, {runs[-1]['respawn']['seconds']} s to respawn")
        except BenchError as exc:
            raise CommandError(str(exc)) from None

    def median(values) -> float:
        return round(float(np.median(values)), 2)

    return {
        "repeats": repeats,
        "users": users,
        "start_s_median": median([r["start_s"] for r in runs]),
        "respawn_s_median": median([r["respawn"]["seconds"] for r in runs]),
        "total_mb_median": {kind: median([r["memory"]["total_mb"][kind] for r in runs]) for kind in ("rss", "pss", "uss")},
        "runs": runs,
    }


def _run(tag: str, key: str, operator_secret: str, users: int) -> dict:
    server = ServerProcess(
        log_path=Path(f"/tmp/memfuse-respawn-{tag}-server.log"), env={"API_RATE_LIMIT": bench_rate_limit()}, kind="uvicorn"
    )
    started = time.monotonic()
    url = server.start()
    start_s = time.monotonic() - started
    try:
        api = _Api(url, key)
        targets = _warm_up(api, tag, users)
        _wait_flushed(url, operator_secret)
        pids = _inference_pids(url, operator_secret)
        memory = _memory(server.pid, pids)
        respawned = _respawn(api, targets[0], pids["query"])
    finally:
        stopped = server.stop()
    return {"start_s": round(start_s, 2), "memory": memory, "respawn": respawned, "server_stop": stopped}


class _Api:
    def __init__(self, url: str, key: str) -> None:
        self.base = url.rstrip("/") + "/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict) -> requests.Response:
        return self.http.post(self.base + path, json=body, timeout=REQUEST_TIMEOUT)

    def created(self, path: str, body: dict) -> dict:
        response = self.post(path, body)
        if response.status_code != 201:
            raise BenchError(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["data"]


def _warm_up(api: _Api, tag: str, users: int) -> list[tuple[str, str]]:
    """``users`` users with a session, a round added and a query each: ``[(user_id, session_id)]``."""
    agent = api.created("/agents", {"name": f"respawn-{tag}"})["agent"]
    targets = []
    for index in range(users):
        user = api.created("/users", {"name": f"respawn-{tag}-{index}"})["user"]
        session = api.created("/sessions", {"user_id": user["id"], "agent_id": agent["id"]})["session"]
        api.created(f"/sessions/{session['id']}/messages", {"messages": [
            {"role": "user", "content": f"I took my dog number {index} hiking by the lake."},
            {"role": "assistant", "content": f"Dog {index} must have loved the lake."},
        ]})  # fmt: skip
        _query(api, user["id"])
        targets.append((user["id"], session["id"]))
    return targets


def _wait_flushed(url: str, operator_secret: str) -> None:
    """Until the server's backlog (``GET admin/stats``, an operator's figure) is empty."""
    deadline, backlog = time.monotonic() + FLUSH_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        try:
            backlog = requests.get(
                url.rstrip("/") + "/api/v1/admin/stats", headers={"Authorization": f"Bearer {operator_secret}"}, timeout=REQUEST_TIMEOUT
            ).json()["data"]["buffers"]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            backlog = {}
        if backlog.get("pending_messages") == 0:
            return
        time.sleep(0.2)
    pending = {name: backlog.get(name) for name in ("pending_messages", "oldest_pending_age_s")}
    raise BenchError(f"messages still pending {FLUSH_TIMEOUT_S:.0f} s after the warm-up: {pending}")


def _query(api: _Api, user_id: str) -> int:
    """A query of a text of its own: the service remembers the embeddings of recent texts
    (``RECENT_EMBEDDINGS``), and a repeated one would not need the query process."""
    body = {"query": f"where did the dog go hiking? ({uuid.uuid4().hex[:8]})", "top_k": 5}
    try:
        return api.post(f"/users/{user_id}/query", body).status_code
    except requests.RequestException:
        return 0


def _inference_pids(url: str, operator_secret: str) -> dict:
    response = requests.get(
        url.rstrip("/") + "/api/v1/admin/stats", headers={"Authorization": f"Bearer {operator_secret}"}, timeout=REQUEST_TIMEOUT
    )
    models = response.json()["data"]["models"]
    pids = {role: (models.get(f"{role}_embedding") or {}).get("pid") for role in ("query", "background")}
    if pids["query"] is None:
        raise BenchError("the server has no query process (QUERY_EMBEDDING=process is the default)")
    return pids


def _memory(pid: int, inference: dict) -> dict:
    """Each process of ``pid``'s tree by role, and the sums, in MB (see the module)."""
    import psutil

    roles = {pid: "web", **{child: role for role, child in inference.items() if child is not None}}
    server = psutil.Process(pid)
    processes = []
    for process in [server, *server.children(recursive=True)]:
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        figures = memory_mb(process)
        if figures is None:
            continue
        role = roles.get(process.pid) or next(
            (name for name in ("forkserver", "resource_tracker") if f"multiprocessing.{name}" in command), "other"
        )
        processes.append({"role": role, "pid": process.pid, **figures})
    total = {kind: round(sum(p[kind] for p in processes), 1) for kind in ("rss", "pss", "uss")}
    return {"processes": processes, "total_mb": total}


def _respawn(api: _Api, target: tuple[str, str], query_pid: int) -> dict:
    os.kill(query_pid, signal.SIGKILL)
    killed = time.monotonic()
    answers: Counter = Counter()
    while time.monotonic() - killed < RESPAWN_TIMEOUT_S:
        status = _query(api, target[0])
        if status == 200:
            return {"seconds": round(time.monotonic() - killed, 2), "answers_before": dict(answers)}
        answers[str(status)] += 1
        time.sleep(POLL_S)
    raise BenchError(f"no query answered 200 within {RESPAWN_TIMEOUT_S:.0f} s of the query process's kill: {dict(answers)}")
