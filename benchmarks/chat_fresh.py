"""The chat benchmark's ``fresh`` phase: histories as they arrive, on a database just created.

The other phases of ``memfuse_bench chat`` run on a dataset written by COPY and vacuumed
(``benchmarks.chat_dataset``). A user's history does not arrive that way: it comes over the
API, in adds of up to ``MAX_BATCH_MESSAGES`` or in one import, into tables that the planner
has never analyzed, and is flushed while the user waits. This phase creates a database
(``<database>_fresh_<run id>``), migrates it, starts a server of its own on it
(``FreshDatabase``) and loads every user through the REST API only:

1. **first queries**: for each size of ``--fresh-sizes``, one user whose LoCoMo turns are
   added in adds of ``MAX_BATCH_MESSAGES`` (an add refused by the backlog bound, a 503, is
   sent again a second later), and one whose turns come in one import of a JSON Lines
   file that carries their embeddings (``POST users/{id}/import``, the export's format, as
   a move from another deployment). From the moment the user's buffer shows no pending
   message (polled every 0.2 s), ``--fresh-queries`` queries one after another: the first
   query's latency, p50/p95 of all, and what the planner knew of the tables at that moment
   (``pg_stat_user_tables``, ``pg_class.reltuples``).
2. **chat pattern**: for each size of ``--fresh-chat-sizes``, a user loaded over REST the
   same way (the first-queries user of that size, when there is one, after its queries),
   then ``--fresh-rounds`` rounds of an add of two messages, a query (*after an add*) and a
   query (*no write*): p95 of both and their ratio.
3. **backlog**: ``--backlog-users`` new users, each given ``--user-size`` messages (flushed),
   then one add of ``--backlog-messages`` and a query at once for the newest of them: its
   latency, and whether it was found. The next user starts once the flush is done.

The database is dropped at the end, unless ``--keep``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aiohttp
from django.conf import settings

from benchmarks.chat_dataset import ChatUser, cycled_turns
from benchmarks.client import Api
from benchmarks.dataset import Conversation, Turn, embed_texts
from benchmarks.errors import BenchError
from benchmarks.server import ServerProcess, bench_rate_limit
from benchmarks.stats import latency_summary

POLL_SECONDS = 0.2  # how often a user's buffer is read while waiting for the flush
RETRY_SECONDS = 1.0  # before an add the backlog bound refused is sent again
IMPORT_TIMEOUT = 3600.0  # s: one request that writes a whole history
TABLES = ("memory_message", "memory_session", "memory_user", "memory_indexsnapshot", "memory_indexsnapshotpart")


def database_url(database: dict, name: str) -> str:
    """A ``DATABASE_URL`` for database ``name`` on the server of Django's ``database``
    settings (host, port, user, password; a socket directory as host too)."""
    user = quote(database.get("USER") or "", safe="")
    password = database.get("PASSWORD") or ""
    credentials = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = quote(database.get("HOST") or "", safe="")
    port = f":{database['PORT']}" if database.get("PORT") else ""
    return f"postgres://{credentials}{host}{port}/{quote(name, safe='')}"


class FreshDatabase:
    """A database created for the phase on the server of this process's database, migrated
    and given a tenant by ``manage.py`` commands run against it, served by a server of its
    own, dropped by ``drop()``."""

    def __init__(self, *, run_id: str) -> None:
        default = settings.DATABASES["default"]
        self.name = f"{default['NAME']}_fresh_{run_id}"
        self.url = database_url(default, self.name)
        # The settings refuse DATABASE_URL without SECRET_KEY: the embedded default's own
        # key is in its data folder, not in the environment.
        self.env = {"DATABASE_URL": self.url, "SECRET_KEY": settings.SECRET_KEY}
        self.created = False

    def create(self) -> None:
        """``CREATE DATABASE`` and ``manage.py migrate``; ``BenchError`` when either fails."""
        from django.db import connection

        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            connection.close()  # run in a thread of its own: its connection goes back now
        self.created = True
        self.manage("migrate", "--noinput", "-v", "0")

    def manage(self, *args: str) -> str:
        """``manage.py <args>`` against this database; its stdout, stripped."""
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), *args]
        done = subprocess.run(command, cwd=settings.BASE_DIR, env={**os.environ, **self.env}, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"manage.py {' '.join(args)} on {self.name}: {done.stderr.strip()[-500:]}")
        return done.stdout.strip()

    def server(self, *, log_path: Path, kind: str) -> ServerProcess:
        return ServerProcess(log_path=log_path, kind=kind, env={**self.env, "API_RATE_LIMIT": bench_rate_limit()})

    def table_stats(self) -> dict:
        """What the planner and autovacuum know of the service's main tables now:
        ``{table: {"reltuples", "live", "dead", "modified_since_analyze", "analyzed"}}``
        (``analyzed``: the latest of the last manual and automatic ANALYZE, ISO time, or None)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT c.relname, c.reltuples, s.n_live_tup, s.n_dead_tup, s.n_mod_since_analyze, "
                "greatest(s.last_analyze, s.last_autoanalyze) FROM pg_class c "
                "JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relname = ANY(%s)",
                [list(TABLES)],
            ).fetchall()
        return {
            name: {"reltuples": int(reltuples), "live": live, "dead": dead, "modified_since_analyze": modified,
                   "analyzed": analyzed.isoformat() if analyzed else None}
            for name, reltuples, live, dead, modified, analyzed in rows
        }

    def drop(self) -> None:
        """``DROP DATABASE ... WITH (FORCE)`` (its server may still hold connections)."""
        from django.db import connection

        if not self.created:
            return
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            connection.close()
        self.created = False


@dataclass
class FreshUser:
    """A user of the phase: its ids, how it was loaded and how long that took."""

    user_id: str
    session_id: str
    size: int
    via: str  # "rest" or "import"
    load_seconds: float = 0.0
    flush_wait_seconds: float = 0.0

    def chat_user(self, queries: list[str]) -> ChatUser:
        return ChatUser("fresh", self.size, uuid.UUID(self.user_id), uuid.UUID(self.session_id), queries)


class FreshPhase:
    """The phase over one ``FreshDatabase`` (see the module docstring). ``bench`` is the
    ``ChatBench`` it belongs to: its options, its query texts and its timed calls."""

    def __init__(self, bench, *, http: aiohttp.ClientSession, api_key: str, url: str) -> None:
        self.bench = bench
        self.options = bench.options
        self.api = Api(http, url, api_key=api_key)
        self.conversations: list[Conversation] = bench.dataset.conversations
        self.queries = bench.dataset.questions
        self.agent_id: str | None = None
        self.users = 0

    async def run(self, database: FreshDatabase) -> dict:
        options = self.options
        self.agent_id = (await self.api.data("POST", "/agents", {"name": "fresh"}, expect=201))["agent"]["id"]
        result: dict = {"database": database.name, "first_queries": [], "chat": [], "backlog": None}
        loaded: dict[int, FreshUser] = {}
        for size in options["fresh_size_list"]:
            for via in ("rest", "import"):
                user = await (self.load_rest(size) if via == "rest" else self.load_import(size))
                stats = await asyncio.to_thread(database.table_stats)
                result["first_queries"].append({**self._describe(user), **await self.first_queries(user), "tables": stats})
                if via == "rest":
                    loaded[size] = user
        for size in options["fresh_chat_size_list"]:
            user = loaded.get(size) or await self.load_rest(size)
            result["chat"].append({**self._describe(user), **await self.chat(user)})
        if options["backlog_users"]:
            result["backlog"] = await self.backlog()
        return result

    @staticmethod
    def _describe(user: FreshUser) -> dict:
        return {"messages": user.size, "via": user.via, "load_seconds": round(user.load_seconds, 1),
                "flush_wait_seconds": round(user.flush_wait_seconds, 1)}

    # --- loading --------------------------------------------------------------------------

    def _turns(self, size: int) -> list[Turn]:
        offset = self.users % len(self.conversations)  # users start in different conversations
        return cycled_turns(self.conversations[offset:] + self.conversations[:offset], size)

    async def _new_user(self, size: int, via: str) -> FreshUser:
        self.users += 1
        name = f"fresh-{via}-{size}-{self.users}"
        user = (await self.api.data("POST", "/users", {"name": name}, expect=201))["user"]
        body = {"user_id": user["id"], "agent_id": self.agent_id, "name": name}
        session = (await self.api.data("POST", "/sessions", body, expect=201))["session"]
        return FreshUser(user_id=user["id"], session_id=session["id"], size=size, via=via)

    async def add(self, user: FreshUser, turns: list[Turn]) -> tuple[float, dict]:
        """One add of ``turns`` to the user's session, sent again after ``Retry-After`` while
        the backlog bound refuses it: ``(ms of the accepted add, its data)``."""
        messages = [
            {"role": turn.role, "content": turn.content, "metadata": turn.metadata,
             **({"created_at": turn.date.isoformat()} if turn.date else {})}
            for turn in turns
        ]
        path = f"/sessions/{user.session_id}/messages"
        while True:
            begun = time.perf_counter()
            status, payload = await self.api.call("POST", path, {"messages": messages})
            ms = (time.perf_counter() - begun) * 1000
            if status == 201:
                return ms, payload["data"]
            if status != 503:
                raise BenchError(f"POST {path}: HTTP {status}: {payload}")
            await asyncio.sleep(RETRY_SECONDS)

    async def load_rest(self, size: int) -> FreshUser:
        """A new user of ``size`` turns added ``MAX_BATCH_MESSAGES`` at a time, flushed."""
        user = await self._new_user(size, "rest")
        turns = self._turns(size)
        batch = settings.MEMFUSE["MAX_BATCH_MESSAGES"]
        begun = time.perf_counter()
        for start in range(0, size, batch):
            await self.add(user, turns[start : start + batch])
        user.load_seconds = time.perf_counter() - begun
        user.flush_wait_seconds = await self.wait_flushed(user)
        return user

    async def load_import(self, size: int) -> FreshUser:
        """A new user of ``size`` turns in one import with their embeddings (nothing pending)."""
        self.users += 1
        user_id = str(uuid.uuid4())
        name = f"fresh-import-{size}-{self.users}"
        path = Path(f"/tmp/memfuse-bench-{self.bench.run_id}-fresh-{size}.jsonl")
        session_id = await asyncio.to_thread(self._write_import_file, path, user_id=user_id, name=name, size=size)
        user = FreshUser(user_id=user_id, session_id=session_id, size=size, via="import")
        try:
            begun = time.perf_counter()
            with path.open("rb") as body:
                async with self.api.http.post(
                    f"{self.api.base}/users/{user_id}/import", data=body,
                    headers={"Authorization": f"Bearer {self.api.api_key}", "Content-Type": "application/x-ndjson"},
                    timeout=aiohttp.ClientTimeout(total=IMPORT_TIMEOUT),
                ) as response:
                    if response.status != 200:
                        raise BenchError(f"POST /users/{user_id}/import: HTTP {response.status}: {(await response.text())[:500]}")
            user.load_seconds = time.perf_counter() - begun
        finally:
            path.unlink(missing_ok=True)
        user.flush_wait_seconds = await self.wait_flushed(user)
        return user

    def _write_import_file(self, path: Path, *, user_id: str, name: str, size: int) -> str:
        """The import file of a new user: the export's format with the document model's
        embeddings (each distinct text embedded once, in this process). Returns its session id."""
        from memory.inference import registry
        from memory.portability import FORMAT, VERSION

        turns = self._turns(size)
        texts = sorted({turn.index_text for turn in turns})
        vectors = {text: json.dumps([round(float(x), 7) for x in vector]) for text, vector in zip(texts, embed_texts(texts))}
        now = datetime.now(UTC).isoformat()
        agent_id, session_id = self.agent_id, str(uuid.uuid4())
        records = [
            {"type": "header", "format": FORMAT, "version": VERSION, "exported_at": now, "embedding": registry.document_model()},
            {"type": "user", "id": user_id, "name": name, "description": "", "metadata": {}, "created_at": now},
            {"type": "agent", "id": agent_id, "name": "fresh", "description": "", "metadata": {}, "created_at": now},
            {"type": "session", "id": session_id, "name": name, "agent_id": agent_id, "metadata": {}, "created_at": now},
        ]
        with path.open("w") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
            for position, turn in enumerate(turns):
                created = (turn.date or datetime(2000, 1, 1, tzinfo=UTC)) + timedelta(seconds=position)
                record = json.dumps({
                    "type": "message", "id": str(uuid.uuid4()), "session_id": session_id, "position": position,
                    "role": turn.role, "content": turn.content, "metadata": turn.metadata, "created_at": created.isoformat(),
                })
                out.write(f'{record[:-1]},"embedding":{vectors[turn.index_text]}}}\n')
        return session_id

    async def wait_flushed(self, user: FreshUser) -> float:
        """Seconds until the user's buffer shows no pending message (polled every
        ``POLL_SECONDS``); ``BenchError`` past ``--settle-timeout`` (or an hour with none)."""
        timeout = self.options["settle_timeout"] or 3600.0
        begun = time.perf_counter()
        while True:
            data = await self.api.data("GET", f"/users/{user.user_id}/buffer")
            if not data["pending_messages"]:
                return time.perf_counter() - begun
            if time.perf_counter() - begun > timeout:
                raise BenchError(f"user {user.user_id}: {data['pending_messages']} messages still pending after {timeout:.0f} s")
            await asyncio.sleep(POLL_SECONDS)

    # --- measuring ------------------------------------------------------------------------

    def _query_text(self) -> str:
        return self.bench._unique(self.bench.rng.choice(self.queries))

    async def first_queries(self, user: FreshUser) -> dict:
        """``--fresh-queries`` queries one after another, the first at once: latencies in order."""
        latencies, errors = [], 0
        for _ in range(self.options["fresh_queries"]):
            ms, status, _ = await self.bench._query(self.api, user.chat_user(self.queries), self._query_text())
            latencies.append(ms)
            errors += status != 200
        return {"errors": errors, "first_ms": round(latencies[0], 2), "query_ms": latency_summary(latencies),
                "latencies_ms": [round(ms, 1) for ms in latencies]}

    async def chat(self, user: FreshUser) -> dict:
        """``--fresh-rounds`` rounds of add, query, query (as the history phase's)."""
        chat_user = user.chat_user(self.queries)
        after_add, no_write, adds, errors = [], [], [], 0
        for user_text, assistant_text in self.bench._rounds(self.options["fresh_rounds"]):
            messages = [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]
            ms, status, _ = await self.bench._add(self.api, chat_user, messages)
            adds.append(ms)
            errors += status != 201
            for latencies in (after_add, no_write):
                ms, status, _ = await self.bench._query(self.api, chat_user, self._query_text())
                latencies.append(ms)
                errors += status != 200
        after, before = latency_summary(after_add), latency_summary(no_write)
        return {
            "rounds": self.options["fresh_rounds"], "errors": errors, "query_after_add_ms": after, "query_no_write_ms": before,
            "p95_ratio": round(after["p95"] / before["p95"], 3) if before["p95"] else None, "add_ms": latency_summary(adds),
        }

    async def backlog(self) -> dict:
        """Each of ``--backlog-users`` new users: ``--user-size`` messages flushed, then one
        add of ``--backlog-messages`` and a query at once for the newest of them."""
        count = self.options["backlog_messages"]
        queries, adds, found, errors = [], [], 0, 0
        for _ in range(self.options["backlog_users"]):
            user = await self.load_rest(self.options["user_size"])
            texts = [text for pair in self.bench._rounds((count + 1) // 2) for text in pair][:count]
            newest = f"{texts[-1]} (note {self.bench.rng.randrange(10**9)})"  # its own words: what the query looks for
            turns = [Turn(0, None, "", "user" if i % 2 == 0 else "assistant", t, {}, t) for i, t in enumerate(texts[:-1] + [newest])]
            ms, data = await self.add(user, turns)
            adds.append(ms)
            newest_id = data["message_ids"][-1]
            ms, status, payload = await self.bench._query(self.api, user.chat_user(self.queries), newest)
            queries.append(ms)
            errors += status != 200
            if status == 200 and newest_id in [r["id"] for r in payload["data"]["results"]]:
                found += 1
            await self.wait_flushed(user)
        return {
            "users": self.options["backlog_users"], "history_messages": self.options["user_size"], "messages_per_add": count,
            "errors": errors, "add_ms": latency_summary(adds), "query_right_after_ms": latency_summary(queries),
            "newest_found": found,
        }


async def fresh_phase(bench, *, http: aiohttp.ClientSession, kind: str, log) -> dict:
    """Create and migrate a database, start a server on it, run ``FreshPhase``, stop the
    server and drop the database (unless ``--keep``). The phase's report section."""
    database = FreshDatabase(run_id=bench.run_id)
    try:
        log(f"fresh: creating and migrating database {database.name} ...")
        await asyncio.to_thread(database.create)
        api_key = await asyncio.to_thread(database.manage, "create_tenant", "bench-fresh", "--quiet")
        server = database.server(log_path=Path(f"/tmp/memfuse-bench-{bench.run_id}-fresh.log"), kind=kind)
        url = await asyncio.to_thread(server.start)
        try:
            log(f"fresh: loading users over the REST API of {url} ...")
            result = await FreshPhase(bench, http=http, api_key=api_key, url=url).run(database)
        finally:
            stopped = await asyncio.to_thread(server.stop)
        return {**result, "server_stop": stopped}
    finally:
        if not bench.options["keep"]:
            await asyncio.to_thread(database.drop)
