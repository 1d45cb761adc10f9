"""``manage.py soak_bench ws-connections``: what an open WebSocket connection holds in the web process.

A chat UI keeps one connection open per user while the user chats, so the web process holds
one connection's state per active user. The bench starts a uvicorn subprocess on this
process's database (``benchmarks.server``, with ``--server-env NAME=VALUE`` added to its
environment: ``UVICORN_WS_PER_MESSAGE_DEFLATE=false`` turns uvicorn's permessage-deflate off),
opens ``--connections`` connections over ``--users`` users' sessions, sends one query on each
and reads its answer, and keeps them all open. It reports the web process's resident memory
in MB before the first connection (after one warm-up connection), with all of them open, and
after all have closed, the KB per open connection, and the extension the server accepted
(``Sec-WebSocket-Extensions``; None when it compresses nothing). The client offers
permessage-deflate, as browsers do.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from django.core.management.base import CommandError
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from benchmarks.errors import BenchError
from benchmarks.server import ServerProcess, bench_rate_limit, bench_tenant, rss_mb
from benchmarks.targets import soak_targets

SETTLE_S = 2.0  # s between the last answer and a reading: the server's last writes are done
REQUEST_TIMEOUT = 30.0


def ws_connections(connections: int, users: int, env: dict) -> dict:
    """The report (see the module) of one server with ``env`` added to its environment.

    Raises ``CommandError`` when ``connections`` or ``users`` is not positive, or the run fails
    (the server does not start, a connection is refused, dropped or not answered in 30 s).
    """
    if connections <= 0 or users <= 0:
        raise CommandError("--connections and --users must be positive")
    run = uuid.uuid4().hex[:8]
    server = ServerProcess(
        log_path=Path(f"/tmp/memfuse-ws-connections-{run}-server.log"),
        env={"API_RATE_LIMIT": bench_rate_limit(), **env},
        kind="uvicorn",
    )
    with bench_tenant(f"ws-connections-{run}") as (key, _):
        try:
            url = server.start()
            sessions = [target.session_id for target in soak_targets(url, key, users, run)]
            report = asyncio.run(_measure(url, key, sessions, connections, server.pid))
        except (BenchError, OSError, TimeoutError, WebSocketException) as exc:
            # A refused, dropped or timed-out connection ends the run with what happened.
            raise CommandError(f"{type(exc).__name__}: {exc}") from None
        finally:
            stopped = server.stop()
    return {"connections": connections, "users": users, **report, "server": {"env": env, **stopped}}


async def _measure(url: str, key: str, sessions: list[str], connections: int, pid: int) -> dict:
    base = url.replace("http", "ws", 1)

    async def opened(index: int):
        ws = await connect(
            f"{base}/ws/v1/sessions/{sessions[index % len(sessions)]}/",
            origin="http://127.0.0.1",
            additional_headers={"Authorization": f"Bearer {key}"},
            open_timeout=REQUEST_TIMEOUT,
        )
        await ws.send(json.dumps({"type": "memory.query", "request_id": index, "query": f"what about topic {index}?"}))
        while True:
            answer = json.loads(await asyncio.wait_for(ws.recv(), REQUEST_TIMEOUT))
            if answer["type"] == "error":
                raise BenchError(f"connection {index}: {answer}")
            if answer.get("final"):
                return ws

    # One connection first: the server's first query loads what every later one reuses.
    warm = await opened(0)
    await warm.close()
    await asyncio.sleep(SETTLE_S)
    before = rss_mb(pid)
    started = time.monotonic()
    open_connections = [await opened(index) for index in range(connections)]
    open_s = time.monotonic() - started
    extension = open_connections[0].response.headers.get("Sec-WebSocket-Extensions")
    await asyncio.sleep(SETTLE_S)
    with_open = rss_mb(pid)
    for ws in open_connections:
        await ws.close()
    await asyncio.sleep(SETTLE_S)
    return {
        "extension": extension,
        "web_rss_mb": {"before": before, "open": with_open, "closed": rss_mb(pid)},
        "kb_per_connection": round((with_open - before) * 1024 / connections, 1),
        "open_seconds": round(open_s, 2),
    }
