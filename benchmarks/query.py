"""``memfuse_bench query``: memory queries over a large bulk-loaded database.

1,000 users x 200 flushed messages bulk-loaded into this process's database
(``benchmarks.dataset``, reused across runs), then queries over HTTP: one to each of 10 users
and one to every other user (server memory read after each), an open-loop phase at a fixed
rate and a closed-loop phase, each with p50/p95/p99 and how many queries were a user's first
(cold). Before the server starts, in this process: recall@10 of the served per-user vector
search and of a filtered HNSW search against an exact numpy scan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError

from benchmarks.client import Api, QueryOutcome
from benchmarks.server import ServerProcess, children_rss_mb, rss_mb
from benchmarks.stats import latency_summary, recall_at_k, scheduled_offsets
from benchmarks.texts import LOCOMO_DEV

HNSW_SETTINGS = [  # (hnsw.ef_search, hnsw.iterative_scan) tried by the exactness check
    (40, "off"), (100, "off"), (40, "relaxed_order"), (100, "relaxed_order"), (40, "strict_order"), (200, "strict_order"),
]
MEMORY_FIRST_USERS = 10  # the server's memory is read after this many users are cached, then after all


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
                                 "dropped after it (a long build on a large dataset)")
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
        from benchmarks.dataset import QueryDataset

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
        with ``--hnsw-index`` (an index on ``embedding`` over every user's rows, which the
        service does not have: its HNSW indexes are partial, per bucket, on context embeddings)."""
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

