"""The users and sessions a load runs against, made over HTTP (the soak, the WebSocket connections)."""

from __future__ import annotations

from dataclasses import dataclass

import requests

from benchmarks.errors import BenchError

REQUEST_TIMEOUT = 30.0  # s


@dataclass(frozen=True)
class Target:
    """A session to load: its user, the session, and the key to use."""

    user_id: str
    session_id: str


def soak_targets(url: str, key: str, users: int, run: str) -> list[Target]:
    """``users`` users ``soak-<run>-<i>`` of one agent, a session each, made over HTTP."""
    headers = {"Authorization": f"Bearer {key}"}
    base = url.rstrip("/") + "/api/v1"

    def post(path: str, body: dict) -> dict:
        response = requests.post(base + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT)
        if response.status_code != 201:
            raise BenchError(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["data"]

    agent = post("/agents", {"name": f"soak-{run}"})["agent"]
    targets = []
    for index in range(users):
        user = post("/users", {"name": f"soak-{run}-{index}"})["user"]
        session = post("/sessions", {"user_id": user["id"], "agent_id": agent["id"], "name": f"soak-{run}-{index}"})[
            "session"
        ]
        targets.append(Target(user_id=user["id"], session_id=session["id"]))
    return targets
