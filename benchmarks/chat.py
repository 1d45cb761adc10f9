"""``manage.py memfuse_bench chat``: memory as chat apps use it, over HTTP.

A chat app does two calls a turn: it queries memory for the new message, then adds the
round. Histories grow, and more users come and go than any cache holds. Phases, over real
HTTP against a server the command starts (or ``--url``), with LoCoMo turns and questions as
the text (``benchmarks.chat_dataset``, bulk-loaded into this process's database):

1. **history** (one client, sequential): for each size of ``--sizes``, ``--rounds`` times: add
   a round (two messages), query (the query *right after an add*), query again (*no write
   since the last query*). p50/p95 of both, their ratio, the add's latency; then the curve's
   slope: the exponent b of ``p95 = a * size^b`` by least squares on logs (b < 1: sub-linear).
2. **backlog**: ``--backlog-users`` times, add ``--backlog-messages`` messages in one request
   and query at once for the last of them: latency, and whether it was found (read your writes).
3. **many users**: the ``many`` users (``--user-size``, 200 messages each), drawn with Zipf's law (exponent
   ``--zipf``) over a random order; ``--clients`` clients each do turns (query, then add the
   round, for one user): open loop at ``--rate`` turns/s for ``--duration`` s (latency from the
   scheduled time), then closed loop for ``--closed-duration`` s (queries/s flat out). Against
   a second server whose cache is ``--many-cache-mb`` (``USER_CACHE_MB``), smaller than the
   active set's indexes, so users are evicted and come back; its cache figures (bytes, count,
   hits, evictions) are read from its stats.
4. **cold**: a second server whose cache holds no user (``USER_CACHE_MB`` below one user's
   index), so every query loads the user as a process that never saw them does (snapshot,
   catch-up); ``--clients`` clients, open loop at ``--cold-rate`` queries/s, at 200
   (``--user-size``) and at 10,000 (``--cold-size``) messages.
5. **fresh**: histories as they arrive, on a database the phase creates and migrates, with a
   server of its own: users loaded over the REST API (adds of ``MAX_BATCH_MESSAGES``, and an
   import), measured from the first query after their flush; the chat pattern and the
   backlog on such users (``benchmarks.chat_fresh``).

Before the server starts, in this process: recall@10 of the approximate (HNSW) vector search
of every user that has it against an exact scan of their context embeddings (ties count), on
the cycled users (texts repeat, as the bench's do) and on the distinct user.

The many-users phase also reports the CPU of a turn by process group (the server, its
inference processes, and the host's PostgreSQL processes when the database runs there), and
next to it the turn's floor, measured in this process after the phase (``floor_ms_per_turn``:
the model's CPU for the turn's one-text embeddings and PostgreSQL's for its statements, each
alone: ``benchmarks.chat_floor``) and the ratio of the two (``ratio_to_floor``).
The phases on servers of their own (many users, cold, fresh) run after the main server is stopped:
flush jobs are rows that any process may claim, and its flush workers would take theirs.
The server's and its inference processes' resident memory is read after each phase: each
process's RSS summed (`total_mb`) and their proportional set sizes summed (`total_pss_mb`, the
pages the inference processes share with the forkserver counted once).
Whatever a run cannot measure (no server of its own with ``--url``, say) is listed in
``not_measured`` rather than left out.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError

from benchmarks.chat_dataset import ChatDataset, ChatUser
from benchmarks.chat_floor import turn_floor
from benchmarks.chat_fresh import fresh_phase
from benchmarks.client import Api
from benchmarks.server import ServerProcess, bench_rate_limit, children_rss_mb, cpu_seconds, rss_mb, tree_pss_mb
from benchmarks.stats import latency_summary, recall_at_k
from benchmarks.texts import LOCOMO_DEV, chat_rounds, locomo_turn_texts

DEFAULT_SIZES = "200,2000,10000,30000,100000"
PHASES = ("history", "backlog", "many", "cold", "fresh")
DATASET_PHASES = {"history", "backlog", "many", "cold"}  # the phases on the bulk-loaded dataset
COLD_CACHE_MB = 0.01  # smaller than any user's index: nothing stays cached


def slope(sizes: list[int], values: list[float]) -> float | None:
    """The exponent b of ``value = a * size^b`` fitted by least squares on logs (None with
    fewer than two points)."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    """Zipf's law over ``count`` ranks: ``p(r) ∝ 1 / r^exponent``, ``(count,)`` summing to 1."""
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


class ChatBench:
    """The chat pattern over growing histories, backlogs, cold users and many users."""

    name = "chat"
    help = "the chat pattern (query then add) over histories of 200 to 100,000 messages, backlogs, cold and many users"

    @staticmethod
    def add_arguments(parser) -> None:
        parser.set_defaults(clients=16)
        parser.add_argument("--sizes", default=DEFAULT_SIZES, help="history sizes of the curve, comma-separated")
        parser.add_argument("--rounds", type=int, default=60, help="add, query, query rounds per history size")
        parser.add_argument("--backlog-users", type=int, default=20, help="users of the backlog phase")
        parser.add_argument("--backlog-messages", type=int, default=500, help="messages of each backlog add")
        parser.add_argument("--many-users", type=int, default=10_000, help="users of the many-users phase")
        parser.add_argument("--user-size", type=int, default=200, help="messages of each of those users")
        parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the many-users phase")
        parser.add_argument("--rate", type=float, default=50.0, help="turns per second offered (open loop, many users)")
        parser.add_argument("--duration", type=float, default=30.0, help="seconds of the open-loop phase")
        parser.add_argument("--closed-duration", type=float, default=30.0, help="seconds of the closed-loop phase")
        parser.add_argument("--many-cache-mb", type=float, default=32.0,
                            help="USER_CACHE_MB of the many-users phase's server (0: the main server's cache)")
        parser.add_argument("--cold-users", type=int, default=16, help="users of the cold phase's long histories")
        parser.add_argument("--cold-size", type=int, default=10_000, help="messages of each of those users")
        parser.add_argument("--cold-rate", type=float, default=40.0, help="cold queries per second offered")
        parser.add_argument("--cold-duration", type=float, default=15.0, help="seconds of each cold phase")
        parser.add_argument("--distinct-size", type=int, default=10_000, help="messages of the distinct-text user (0: none)")
        parser.add_argument("--recall-queries", type=int, default=30, help="queries per user of the recall check (0: skip)")
        parser.add_argument("--top-k", type=int, default=10, help="results per query")
        parser.add_argument("--settle-timeout", type=float, default=1800.0,
                            help="most seconds to wait before each phase for the server to flush what is pending (0: no wait)")
        parser.add_argument("--fresh-sizes", default="10000,100000",
                            help="fresh phase: sizes of the users loaded over REST and by import, measured from their first query")
        parser.add_argument("--fresh-chat-sizes", default="200,2000,10000", help="fresh phase: sizes of the chat pattern's users")
        parser.add_argument("--fresh-queries", type=int, default=30, help="fresh phase: queries from the first after a user's load")
        parser.add_argument("--fresh-rounds", type=int, default=20, help="fresh phase: add, query, query rounds per chat size")
        parser.add_argument("--keep", action="store_true", help="keep the fresh phase's database (default: drop it)")
        parser.add_argument("--skip", default="", help=f"phases not to run, comma-separated ({','.join(PHASES)})")
        parser.add_argument("--tag", default="default", help="name of the bench dataset (reused while its shape matches)")
        parser.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if it exists")
        parser.add_argument("--data", type=Path, default=LOCOMO_DEV, help="LoCoMo file of the conversations")

    @staticmethod
    def validate(options: dict) -> None:
        try:
            sizes = [int(size) for size in options["sizes"].split(",") if size.strip()]
        except ValueError:
            raise CommandError(f"--sizes: comma-separated integers expected (got {options['sizes']!r})") from None
        if not sizes or min(sizes) < 10:
            raise CommandError(f"--sizes: each size must be at least 10 (got {options['sizes']!r})")
        options["size_list"] = sizes
        for option in ("fresh_sizes", "fresh_chat_sizes"):
            try:
                options[f"{option[:-1]}_list"] = [int(size) for size in options[option].split(",") if size.strip()]
            except ValueError:
                raise CommandError(f"--{option.replace('_', '-')}: comma-separated integers expected (got {options[option]!r})") from None
            if any(size <= 0 for size in options[f"{option[:-1]}_list"]):
                raise CommandError(f"--{option.replace('_', '-')}: each size must be > 0 (got {options[option]!r})")
        for option in ("rounds", "backlog_messages", "many_users", "user_size", "cold_size", "top_k", "fresh_queries", "fresh_rounds"):
            if options[option] <= 0:
                raise CommandError(f"--{option.replace('_', '-')} must be > 0 (got {options[option]})")
        for option in ("backlog_users", "cold_users", "many_cache_mb", "distinct_size", "recall_queries", "settle_timeout"):
            if options[option] < 0:
                raise CommandError(f"--{option.replace('_', '-')} must be >= 0 (got {options[option]})")
        for option in ("rate", "duration", "closed_duration", "cold_rate", "cold_duration", "zipf"):
            if options[option] <= 0:
                raise CommandError(f"--{option.replace('_', '-')} must be > 0 (got {options[option]})")
        if options["backlog_messages"] > settings.MEMFUSE["MAX_BATCH_MESSAGES"]:
            raise CommandError(f"--backlog-messages: at most MAX_BATCH_MESSAGES ({settings.MEMFUSE['MAX_BATCH_MESSAGES']})")
        skip = {phase for phase in options["skip"].split(",") if phase}
        if skip - set(PHASES):
            raise CommandError(f"--skip: unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}")
        options["skip_set"] = skip
        if not options["data"].exists():
            raise CommandError(f"--data: no such file {options['data']}")

    def __init__(self, options: dict, *, run_id: str) -> None:
        self.options = options
        self.run_id = run_id
        self.rng = random.Random(options["seed"])
        self._asked = itertools.count(1)
        many_users, cold_users = self.dataset_users(options)
        try:
            self.dataset = ChatDataset(
                tag=options["tag"], sizes=options["size_list"], cold_users=cold_users,
                cold_size=options["cold_size"], many_users=many_users, user_size=options["user_size"],
                distinct_size=options["distinct_size"], path=options["data"],
            )
            self.texts = locomo_turn_texts(options["data"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommandError(f"--data: {exc}") from None
        self.users: dict[str, list[ChatUser]] = {}
        self.not_measured: list[str] = []
        self.operator_key = None
        self.backlog_users: set = set()
        self._log = print

    @staticmethod
    def dataset_users(options: dict) -> tuple[int, int]:
        """``(many users, cold users)`` the phases to run need built: the many users serve the
        many-users and cold phases, and the backlog phase only its ``--backlog-users`` of them;
        the long histories only the cold phase."""
        skip = options["skip_set"]
        if {"many", "cold"} - skip:
            many = options["many_users"]
        elif "backlog" not in skip:
            many = min(options["backlog_users"], options["many_users"])
        else:
            many = 0
        return many, 0 if "cold" in skip else options["cold_users"]

    def config(self) -> dict:
        keys = ("sizes", "rounds", "backlog_users", "backlog_messages", "many_users", "user_size", "zipf", "rate",
                "many_cache_mb", "duration", "closed_duration", "cold_users", "cold_size", "cold_rate", "cold_duration", "distinct_size",
                "top_k", "tag", "skip", "settle_timeout", "fresh_sizes", "fresh_chat_sizes", "fresh_queries", "fresh_rounds")
        return {
            **{key: self.options[key] for key in keys},
            "data": str(self.options["data"]),
            "settings": {key: settings.MEMFUSE[key] for key in (
                "USER_CACHE_MB", "PENDING_EMBED_MAX", "ANN_MIN_MESSAGES", "ANN_EF_SEARCH", "BM25_WEIGHT", "VECTOR_WEIGHT",
                "SPEAKER_WEIGHT", "QUERY_EMBEDDING", "BACKGROUND_EMBEDDING")},
        }

    def key_tenant(self):
        return self.dataset.tenant()

    def prepare(self, log) -> dict:
        self._log = log  # for the phases' progress lines
        report: dict = {"dataset": None}
        if DATASET_PHASES - self.options["skip_set"]:  # the fresh phase alone loads its own users
            started = time.perf_counter()
            built = self.dataset.ensure(rebuild=self.options["rebuild"], log=log)
            self.users = self.dataset.users()
            log(f"dataset: {'reused' if built['reused'] else 'built'} in {time.perf_counter() - started:.1f} s")
            report["dataset"] = {**built, "users": {group: len(members) for group, members in self.users.items()}}
        from memory.models import KeyScope
        from memory.services.api_keys import api_key_create

        # To read the server's cache figures (GET admin/stats); deleted in finish().
        self.operator_key, self._operator_secret = api_key_create(scope=KeyScope.OPERATOR, name=f"bench {self.run_id}")
        if self.options["recall_queries"]:
            log("recall of the approximate search ...")
            report["ann_recall"] = self._ann_recall()
        return report

    def _ann_recall(self) -> list[dict]:
        """Recall@k of the approximate search of each user in an HNSW bucket against an exact scan of
        their context embeddings (tie-aware: ``recall_at_k``), with both latencies."""
        from django.db import connection

        from memory.inference import registry
        from memory.models import User
        from memory.retrieval import vector

        k = self.options["top_k"]
        report = []
        candidates = [user for group in ("history", "distinct", "cold") for user in self.users.get(group, [])[: 3 if group == "cold" else None]]
        for user in candidates:
            bucket = User.objects.filter(pk=user.user_id).values_list("ann_bucket", flat=True).first()
            if bucket is None:
                continue
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT id, context_embedding::text FROM memory_message WHERE user_id = %s AND context_embedding IS NOT NULL",
                    [user.user_id],
                )
                rows = cursor.fetchall()
            ids = [row[0] for row in rows]
            matrix = np.array([np.fromstring(text[1:-1], sep=",", dtype=np.float32) for _, text in rows])
            recalls, ann_ms, exact_ms = [], [], []
            for text in self.rng.sample(user.queries, min(self.options["recall_queries"], len(user.queries))):
                query = registry.embed_query([text])[0]
                exact = dict(zip(ids, (matrix @ query).tolist()))
                begun = time.perf_counter()
                served, _, _ = vector.candidates(user_id=user.user_id, embedding=query, limit=100, ann_bucket=bucket)
                ann_ms.append((time.perf_counter() - begun) * 1000)
                begun = time.perf_counter()
                vector.candidates(user_id=user.user_id, embedding=query, limit=100)
                exact_ms.append((time.perf_counter() - begun) * 1000)
                recalls.append(recall_at_k([key.id for key, _ in served if key.kind == "message"][:k], exact, k=k))
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM memory_message WHERE ann_bucket = %s", [bucket])
                in_bucket = cursor.fetchone()[0]
            report.append({
                "group": user.group, "messages": len(ids), "bucket_messages": in_bucket, "queries": len(recalls),
                "recall_at_k_mean": round(float(np.mean(recalls)), 4), "recall_at_k_min": round(float(np.min(recalls)), 4),
                "ann_latency_ms": latency_summary(ann_ms), "exact_scan_latency_ms": latency_summary(exact_ms),
            })
        return report

    async def bench_users(self, api: Api, created: list[str]) -> list:
        return []

    def finish(self) -> dict:
        if self.operator_key is not None:
            self.operator_key.delete()
        return {"not_measured": self.not_measured}

    # --- phases ----------------------------------------------------------------------------

    async def run(self, api: Api, users: list, server: ServerProcess | None) -> dict:
        skip = self.options["skip_set"]
        results: dict = {"memory": {"start": self._memory(server)}, "settled": {}}
        if server is None:
            self.not_measured.append("resident memory: the server was not started by the bench (--url)")
        # Each phase starts with nothing pending: the flush of one phase's writes (a backlog
        # of 10,000 messages takes minutes to embed) must not be measured as the next one's.
        results["settled"]["start"] = await self._settle(api)
        if "history" not in skip:
            results["history"] = await self._history(api)
            results["memory"]["after_history"] = self._memory(server)
            results["settled"]["after_history"] = await self._settle(api)
        if "backlog" not in skip:
            results["backlog"] = await self._backlog(api)
            results["settled"]["after_backlog"] = await self._settle(api)
        if "many" not in skip:
            if self.options["many_cache_mb"]:
                await self._stop_main_server(server, results)
            results["many_users"] = await self._many(api, server)
            # The server the phase ran on: the main one, or its own (then in its section).
            results["memory"]["after_many_users"] = self._memory(server) or results["many_users"].get("memory")
        if "cold" not in skip:
            await self._stop_main_server(server, results)
            results["cold"] = await self._cold(api, server)
        if "fresh" not in skip:
            await self._stop_main_server(server, results)
            if server is None:
                self.not_measured.append("fresh phase: needs a server the bench starts (on a database it creates)")
            else:
                results["fresh"] = await fresh_phase(self, http=api.http, kind=server.kind, log=self._log)
        return results

    @staticmethod
    async def _stop_main_server(server: ServerProcess | None, results: dict) -> None:
        """Stop the main server before a phase runs on a server of its own: its flush workers
        would take that server's flush jobs (they are rows any process may claim), on CPU the
        phase is measuring. ``results["main_server_stop"]``: what the stop said."""
        if server is not None and server.pid is not None:
            results["main_server_stop"] = await asyncio.to_thread(server.stop)

    @staticmethod
    def _memory(server: ServerProcess | None) -> dict | None:
        if server is None or server.pid is None:
            return None
        children = children_rss_mb(server.pid)
        web = rss_mb(server.pid)
        return {"web_mb": web, "inference_processes": children[0], "inference_mb": children[1],
                "total_mb": round(web + children[1], 1), "total_pss_mb": tree_pss_mb(server.pid)}

    def _unique(self, text: str) -> str:
        """``text`` with a number of its own: LoCoMo has a few thousand texts, which the phases
        would send again and again, while a real user's new message is new. The service
        remembers a user's recent texts (``RECENT_EMBEDDINGS``), which would otherwise spare
        the bench's repeats their embedding."""
        return f"{text} #{next(self._asked)}"

    def _rounds(self, count: int) -> list[tuple[str, str]]:
        return chat_rounds(self.texts, count=count, start=self.rng.randrange(len(self.texts)))

    async def _timed(self, coroutine) -> tuple[float, int, dict | None]:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        status, payload = await coroutine
        return (loop.time() - begun) * 1000, status, payload

    async def _add(self, api: Api, user: ChatUser, messages: list[dict]):
        return await self._timed(api.call("POST", f"/sessions/{user.session_id}/messages", {"messages": messages}))

    async def _query(self, api: Api, user: ChatUser, text: str):
        return await self._timed(api.call("POST", f"/users/{user.user_id}/query", {"query": text, "top_k": self.options["top_k"]}))

    async def _history(self, api: Api) -> dict:
        rounds = self.options["rounds"]
        curve, errors = [], 0
        for user in self.users.get("history", []):
            after_add, no_write, adds = [], [], []
            for user_text, assistant_text in self._rounds(rounds):
                messages = [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]
                ms, status, _ = await self._add(api, user, messages)
                adds.append(ms)
                errors += status != 201
                for latencies in (after_add, no_write):
                    ms, status, _ = await self._query(api, user, self._unique(self.rng.choice(user.queries)))
                    latencies.append(ms)
                    errors += status != 200
            after, before = latency_summary(after_add), latency_summary(no_write)
            curve.append({
                "messages": user.size, "query_after_add_ms": after, "query_no_write_ms": before,
                "p95_ratio": round(after["p95"] / before["p95"], 3) if before["p95"] else None,
                "add_ms": latency_summary(adds),
            })
        sizes = [point["messages"] for point in curve]
        return {
            "rounds": rounds, "errors": errors, "curve": curve,
            "slope_p95_after_add": slope(sizes, [p["query_after_add_ms"]["p95"] for p in curve]),
            "slope_p50_after_add": slope(sizes, [p["query_after_add_ms"]["p50"] for p in curve]),
            "slope_p95_no_write": slope(sizes, [p["query_no_write_ms"]["p95"] for p in curve]),
        }

    async def _backlog(self, api: Api) -> dict:
        count = self.options["backlog_messages"]
        many = self.users.get("many", [])
        chosen = self.rng.sample(many, min(self.options["backlog_users"], len(many)))
        self.backlog_users = {user.user_id for user in chosen}  # the many-users phase leaves them out
        queries, adds, found, errors = [], [], 0, 0
        for user in chosen:
            texts = [text for pair in self._rounds((count + 1) // 2) for text in pair][:count]
            newest = f"{texts[-1]} (note {self.rng.randrange(10**9)})"  # its own words: what the query looks for
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts[:-1] + [newest])]
            ms, status, payload = await self._add(api, user, messages)
            adds.append(ms)
            errors += status != 201
            newest_id = payload["data"]["message_ids"][-1] if status == 201 else None
            ms, status, payload = await self._query(api, user, newest)
            queries.append(ms)
            errors += status != 200
            if status == 200 and newest_id in [r["id"] for r in payload["data"]["results"]]:
                found += 1
        return {
            "users": len(chosen), "messages_per_add": count, "errors": errors,
            "add_ms": latency_summary(adds), "query_right_after_ms": latency_summary(queries),
            "newest_found": found, "pending_embedded_at_most": settings.MEMFUSE["PENDING_EMBED_MAX"],
        }

    async def _many(self, api: Api, server: ServerProcess | None) -> dict:
        cache_mb = self.options["many_cache_mb"]
        if not cache_mb or server is None:
            if server is None:
                self.not_measured.append("many users beyond the cache: needs a server the bench starts (--many-cache-mb)")
            return {**await self._many_phase(api), "server_cache": await self._server_cache(api)}
        result = await self._on_own_server(api, server, label="many", cache_mb=cache_mb, phase=self._many_phase)
        # CPU of a turn (a query and an add, and their flush) by process group, over both loops.
        turns = result["open_loop"]["turns"] + result["closed_loop"]["turns"]
        result["cpu_ms_per_turn"] = {group: round(1000 * used / turns, 2) for group, used in result["cpu_seconds"].items()}
        result["cpu_ms_per_turn"]["total"] = round(sum(result["cpu_ms_per_turn"].values()), 2)
        many = [user for user in self.users.get("many", []) if user.user_id not in self.backlog_users]
        floor = await asyncio.to_thread(turn_floor, self, many)
        result["floor_ms_per_turn"] = floor
        if floor["postgres_local"] is None:
            self.not_measured.append("PostgreSQL's floor: the database does not run on this host")
        else:
            result["ratio_to_floor"] = round(result["cpu_ms_per_turn"]["total"] / floor["total_ms"], 2)
        return result

    async def _on_own_server(self, api: Api, server: ServerProcess, *, label: str, cache_mb: float, phase) -> dict:
        """``await phase(api)`` against a second server the bench starts with ``USER_CACHE_MB=cache_mb``,
        plus that server's cache figures and resident memory; the server is stopped after it."""
        own = ServerProcess(
            log_path=Path(f"/tmp/memfuse-bench-{self.run_id}-{label}.log"), kind=server.kind,
            # Every client of the bench is one tenant's: its concurrency bound would answer the
            # clients past it 429 (a turn that costs nothing) instead of serving them.
            env={"API_RATE_LIMIT": bench_rate_limit(), "USER_CACHE_MB": str(cache_mb),
                 "API_TENANT_CONCURRENCY": str(max(self.options["clients"], settings.MEMFUSE["API_TENANT_CONCURRENCY"]))},
        )
        url = await asyncio.to_thread(own.start)
        try:
            own_api = Api(api.http, url, api_key=api.api_key)
            before = cpu_seconds(own.pid)
            result = {"user_cache_mb": cache_mb, **await phase(own_api)}
            after = cpu_seconds(own.pid)
            result["cpu_seconds"] = {group: round(after[group] - before[group], 2) for group in after}
            result["server_cache"] = await self._server_cache(own_api)
            result["memory"] = self._memory(own)
        finally:
            result["server_stop"] = await asyncio.to_thread(own.stop)
        return result

    # Its open and closed loops share one turn() and its counters.
    async def _many_phase(self, api: Api) -> dict:
        many = [user for user in self.users.get("many", []) if user.user_id not in self.backlog_users]
        self.rng.shuffle(many)  # Zipf's ranks over a random order of the users
        weights = zipf_weights(len(many), self.options["zipf"])
        numpy_rng = np.random.default_rng(self.options["seed"])
        loop = asyncio.get_running_loop()
        rounds = self._rounds(10_000)
        query_ms: list[float] = []
        add_ms: list[float] = []
        errors = {"query": 0, "add": 0}
        limit = asyncio.Semaphore(self.options["clients"])
        counter = iter(range(10**9))

        async def turn(user: ChatUser, scheduled: float | None) -> None:
            async with limit:
                user_text, assistant_text = rounds[next(counter) % len(rounds)]
                user_text = self._unique(user_text)  # the turn's query, then its user message
                begun = loop.time()
                status, _ = await api.call("POST", f"/users/{user.user_id}/query", {"query": user_text, "top_k": self.options["top_k"]})
                query_ms.append((loop.time() - (scheduled if scheduled is not None else begun)) * 1000)
                errors["query"] += status != 200
                body = {"messages": [{"role": "user", "content": user_text}, {"role": "assistant", "content": assistant_text}]}
                begun = loop.time()
                status, _ = await api.call("POST", f"/sessions/{user.session_id}/messages", body)
                add_ms.append((loop.time() - begun) * 1000)
                errors["add"] += status != 201

        # Open loop: turn i at t0 + i / rate, whatever the earlier ones are doing.
        picks = numpy_rng.choice(len(many), size=int(self.options["rate"] * self.options["duration"]), p=weights)
        t0 = loop.time() + 0.05
        tasks = []
        for i, pick in enumerate(picks):
            scheduled = t0 + i / self.options["rate"]
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(turn(many[pick], scheduled)))
        await asyncio.gather(*tasks)
        open_loop = {
            "offered_turns_per_s": self.options["rate"], "turns": len(picks),
            "served_turns_per_s": round(len(picks) / (loop.time() - t0), 2),
            "query_ms": latency_summary(query_ms), "add_ms": latency_summary(add_ms), "errors": dict(errors),
            "distinct_users": int(len(set(picks.tolist()))),
        }
        query_ms.clear()
        add_ms.clear()
        errors.update(query=0, add=0)
        # Closed loop: every client does turn after turn until the time is up.
        deadline = loop.time() + self.options["closed_duration"]
        started = loop.time()

        async def client() -> None:
            while loop.time() < deadline:
                await turn(many[int(numpy_rng.choice(len(many), p=weights))], None)

        await asyncio.gather(*(client() for _ in range(self.options["clients"])))
        seconds = loop.time() - started
        closed_loop = {
            "clients": self.options["clients"], "seconds": round(seconds, 1), "turns": len(query_ms),
            "queries_per_s": round(len(query_ms) / seconds, 2), "adds_per_s": round(len(add_ms) / seconds, 2),
            "query_ms": latency_summary(query_ms), "add_ms": latency_summary(add_ms), "errors": dict(errors),
        }
        return {
            "users": len(many), "zipf": self.options["zipf"], "open_loop": open_loop, "closed_loop": closed_loop,
        }

    async def _settle(self, api: Api) -> dict:
        """Wait until the server has no pending message (its stats, every 2 s), at most
        ``--settle-timeout`` s: ``{"seconds", "pending_at_start", "pending_left"}``."""
        timeout = self.options["settle_timeout"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = left = None
        while True:
            status, payload = await api.call("GET", "/admin/stats", api_key=self._operator_secret)
            left = payload["data"]["buffers"]["pending_messages"] if status == 200 else None
            first = left if first is None else first
            if not left or loop.time() - started >= timeout:
                break
            await asyncio.sleep(2.0)
        return {"seconds": round(loop.time() - started, 1), "pending_at_start": first, "pending_left": left}

    async def _server_cache(self, api: Api) -> dict | None:
        """The server's per-user cache figures (``GET admin/stats``, with an operator key made here)."""
        status, payload = await api.call("GET", "/admin/stats", api_key=self._operator_secret)
        return payload["data"]["user_cache"] if status == 200 else None

    async def _cold(self, api: Api, server: ServerProcess | None) -> dict:
        if server is None:
            self.not_measured.append("cold phase: needs a server the bench starts (with a cache that holds no user)")
            return {}

        async def phases(cold_api: Api) -> dict:
            result = {}
            for label, members in (("many", self.users.get("many", [])), ("long", self.users.get("cold", []))):
                if members:
                    result[label] = {"messages": members[0].size, **await self._cold_phase(cold_api, members)}
            return result

        return await self._on_own_server(api, server, label="cold", cache_mb=COLD_CACHE_MB, phase=phases)

    async def _cold_phase(self, api: Api, members: list[ChatUser]) -> dict:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.options["clients"])
        latencies, errors = [], 0
        rate, duration = self.options["cold_rate"], self.options["cold_duration"]

        async def query(user: ChatUser, scheduled: float) -> None:
            nonlocal errors
            async with limit:
                status, _ = await api.call("POST", f"/users/{user.user_id}/query",
                                           {"query": self._unique(self.rng.choice(user.queries)), "top_k": self.options["top_k"]})
                latencies.append((loop.time() - scheduled) * 1000)
                errors += status != 200

        order = list(members)
        self.rng.shuffle(order)
        t0 = loop.time() + 0.05
        tasks = []
        for i in range(int(rate * duration)):
            scheduled = t0 + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(query(order[i % len(order)], scheduled)))
        await asyncio.gather(*tasks)
        return {"offered_per_s": rate, "queries": len(tasks), "errors": errors, "latency_ms": latency_summary(latencies)}

    @staticmethod
    def summary(report: dict) -> list[str]:
        lines = []
        history = report.get("history")
        if history:
            for point in history["curve"]:
                lines.append(
                    f"history {point['messages']}: query after add p50/p95 {point['query_after_add_ms']['p50']}/"
                    f"{point['query_after_add_ms']['p95']} ms, no write {point['query_no_write_ms']['p50']}/"
                    f"{point['query_no_write_ms']['p95']} ms (ratio {point['p95_ratio']}), add p95 {point['add_ms']['p95']} ms"
                )
            lines.append(f"history slope (p95 after add): {history['slope_p95_after_add']}")
        backlog = report.get("backlog")
        if backlog:
            lines.append(
                f"backlog: query right after an add of {backlog['messages_per_add']}: p95 {backlog['query_right_after_ms']['p95']} ms, "
                f"newest found {backlog['newest_found']}/{backlog['users']}"
            )
        many = report.get("many_users")
        if many:
            opened, closed = many["open_loop"], many["closed_loop"]
            lines.append(
                f"many users: open loop {opened['served_turns_per_s']} turns/s, query p95 {opened['query_ms']['p95']} ms, "
                f"add p99 {opened['add_ms']['p99']} ms; closed loop {closed['queries_per_s']} queries/s"
            )
            if many.get("cpu_ms_per_turn"):
                lines.append("many users' CPU per turn (ms): " + ", ".join(f"{k} {v}" for k, v in many["cpu_ms_per_turn"].items()))
            floor = many.get("floor_ms_per_turn")
            if floor:
                lines.append(f"the turn's floor (ms): model {floor['inference']}, PostgreSQL {floor['postgres_local']}, "
                             f"total {floor['total_ms']}; measured / floor {many.get('ratio_to_floor')}")
            cache = many.get("server_cache") or {}
            lines.append(f"many users' cache: {cache.get('bytes')} bytes, {cache.get('size')} users, "
                         f"{cache.get('evictions')} evictions (USER_CACHE_MB {many.get('user_cache_mb', 'of the main server')})")
        cold = report.get("cold") or {}
        for label in ("many", "long"):
            if label in cold:
                lines.append(f"cold, {cold[label]['messages']} messages: p50/p95 {cold[label]['latency_ms']['p50']}/"
                             f"{cold[label]['latency_ms']['p95']} ms")
        fresh = report.get("fresh") or {}
        for point in fresh.get("first_queries", []):
            lines.append(f"fresh, {point['messages']} messages by {point['via']}: first query {point['first_ms']} ms, "
                         f"p50/p95 {point['query_ms']['p50']}/{point['query_ms']['p95']} ms (flush waited {point['flush_wait_seconds']} s)")
        for point in fresh.get("chat", []):
            lines.append(f"fresh chat, {point['messages']} messages: query after add p95 {point['query_after_add_ms']['p95']} ms, "
                         f"no write {point['query_no_write_ms']['p95']} ms (ratio {point['p95_ratio']})")
        if fresh.get("backlog"):
            backlog = fresh["backlog"]
            lines.append(f"fresh backlog: query right after an add of {backlog['messages_per_add']}: p95 "
                         f"{backlog['query_right_after_ms']['p95']} ms, newest found {backlog['newest_found']}/{backlog['users']}")
        for entry in report.get("ann_recall", []):
            lines.append(f"ann recall@k {entry['group']} {entry['messages']}: {entry['recall_at_k_mean']} (min {entry['recall_at_k_min']})")
        return lines
