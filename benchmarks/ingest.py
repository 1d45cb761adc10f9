"""``memfuse_bench ingest``: add latency under an open-loop load, then a burst and its time until flushed.

One add is one round (a user and an assistant message), from ``--clients`` users, each with
one agent and one session (not timed):

1. steady, OPEN loop: add i is scheduled at ``t0 + i / rate`` and fired as a task at that
   time whatever earlier adds are doing, from client ``i % clients``; its latency runs from
   the scheduled time to the answer, so queueing counts (no coordinated omission: Gil Tene,
   "How NOT to Measure Latency", and wrk2's constant-throughput mode);
2. burst, CLOSED loop: after the server has flushed phase 1, ``--burst`` messages as fast as
   the clients go, then the time until every message is flushed (embedded, vector-indexed);
   then, with the server idle, the embedding model's raw batched throughput on the same texts
   in this process: the ceiling of the ingest path on the same cores.

Each bench user gets a user key of its own for its adds: the rate limit counts per key, and
one key doing 100 adds/s would meet the default limit (6000/minute). Texts are chat turns:
the ``conversation`` turns' ``text`` of the LoCoMo development file when it exists (nothing
else of that file is read), else a small built-in generator (``benchmarks.texts``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

from django.conf import settings
from django.core.management.base import CommandError

from benchmarks.client import AddOutcome, Api, BenchUser, create_users, failed_jobs, wait_until_flushed
from benchmarks.server import ServerProcess
from benchmarks.stats import latency_summary, latency_windows, scheduled_offsets
from benchmarks.texts import LOCOMO_DEV, chat_rounds, generated_turn_texts, locomo_turn_texts

FLUSH_WAIT_TIMEOUT = 300.0  # s
SEARCH_CHECK_USERS = 4


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


def raw_model_throughput(texts: list[str]) -> dict:
    """Embed ``texts`` as a flush indexes them, in chunks as the batcher feeds the model.

    Chunks of ``EMBEDDING_MAX_BATCH_TEXTS`` texts (the most one batched model call takes),
    each encoded text by text (the int8 document model) or in batches of
    ``EMBEDDING_BATCH_SIZE`` (the full model). One untimed chunk first, as the
    server's model is warm by then. Returns ``{"messages_per_s", "seconds"}``.
    """
    import torch

    from memory.inference import registry
    from memory.services.messages import message_index_text

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

