"""The benchmarks' HTTP client: the REST API through aiohttp, bench users, flush waits, clean-up."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from benchmarks.errors import BenchError

REQUEST_TIMEOUT = 60.0  # s, per HTTP request
SETUP_CONCURRENCY = 8  # requests in flight while creating and deleting bench users


@dataclass(frozen=True)
class BenchUser:
    """One simulated client: its user, agent and session ids."""

    index: int
    user_id: str
    agent_id: str
    session_id: str
    api_key: str  # the user's own key (per-key rate limits)


@dataclass(frozen=True)
class Outcome:
    """One request: whether it got its success status, its latency (ms), when it answered (loop time, s)."""

    ok: bool
    latency_ms: float
    answered_at: float
    error: str = ""


@dataclass(frozen=True)
class AddOutcome(Outcome):
    """One add (201), with the user's pending messages it reported."""

    pending_messages: int = 0


@dataclass(frozen=True)
class QueryOutcome(Outcome):
    """One query (200), with how many results it returned and whether it was the user's first."""

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
        """The user's pending messages (``GET users/{id}/buffer``); ``BenchError`` on a refusal."""
        return (await self.data("GET", f"/users/{user.user_id}/buffer"))["pending_messages"]


async def create_users(api: Api, *, count: int, run_id: str, created: list[str]) -> list[BenchUser]:
    """``count`` users ``bench-<run>-<i>``, each with an agent and a session named alike.

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
