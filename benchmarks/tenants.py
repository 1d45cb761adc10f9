"""``manage.py soak_bench tenants``: a noisy neighbour. Three well-behaved tenants chat while a
fourth abuses the service; what the abuse costs the others.

Over real HTTP against a uvicorn subprocess started here on this process's database
(``benchmarks.server``, the README's production command, ``--server-env NAME=VALUE`` added to
its environment; unlike the other modes, ``API_RATE_LIMIT`` keeps the server's setting: the
limits are what is measured). Four tenants (``bench_tenant``), each with its tenant key:

- **well-behaved** (three tenants, ``--users`` users each, a session per user): the chat
  pattern, each user adding a round (a user and an assistant message, LoCoMo's turns) and then
  querying (the next round's user text), at ``--add-rate`` rounds per second over all of them
  (paced per user, the users spread over the interval);
- **abuser** (``--abuse-users`` users, a session each), doing at once the ``--abuse`` kinds:

  * ``adds``: batches of ``MAX_BATCH_MESSAGES``-sized adds (500) from ``ADD_THREADS`` threads at
    ``--abuse-add-rate`` messages per second (0: three times the flush rate, measured first
    by adding ``CALIBRATION_MESSAGES`` messages to an idle server and timing their flush);
  * ``flush-waits``: ``--flush-waits`` clients each sending ``POST users/{id}/flush
    {"wait": true}`` again as soon as the last one answered (after a refusal, ``REFUSED_PAUSE`` s);
  * ``imports``: ``POST users/{id}/import`` of a generated file of the export format of about
    ``--import-mb`` MB (sessions of ``SESSION_MESSAGES`` messages and a knowledge item each),
    one after another;
  * ``keyless``: bodies of ``--keyless-mb`` MiB with no key, streamed over a raw socket to an
    import path (``Content-Length``, and chunked) and to an add path (``Content-Length``),
    one after another: the answer and the bytes the socket had taken when it came;
  * ``backlog`` (not in the default set): adds as fast as answered; after a 503, the wait its
    ``Retry-After`` asks, then again.

Two runs of ``--duration`` s in one invocation, on the same server, each with users of its
own: the well-behaved tenants alone, then with the abuser (started first). After each run the
bench waits (up to ``--drain-timeout`` s) until the run's well-behaved messages are flushed.
Latency percentiles leave out the first ``--warmup`` s of each run; status counts do not.

The JSON has, per run and for the well-behaved tenants: answers by kind and status, add and
query latency (ms, p50/p95/p99 of 2xx answers, also per tenant), flush lag (s, from the add's
201 to the message's ``flushed_at``: the client's and the database's clocks, one host), the
server's resident memory (web process, and its inference processes summed) and the largest
backlog health reported; for the abuser, its answers per kind, and for keyless bodies the
bytes sent before the answer (an upper bound of what the server read: the socket's buffers
hold the rest). ``acknowledged``: every message answered 201 (or imported, 200) to anyone is
counted in the database at the end. ``goals``: issue 32's, each with its value and whether it
is met: ``well_behaved_only_2xx`` (with the abuser), ``query_p95_ratio`` (with / without,
at most ``QUERY_P95_RATIO_MAX``), ``flush_lag_p95_s`` (with, under ``FLUSH_LAG_P95_MAX_S``),
``nothing_lost``.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import requests
from django.core.management.base import CommandError

from benchmarks.abuse import (
    ABUSE_KINDS,
    ABUSE_TIMEOUT,
    ADD_BATCH,
    REQUEST_TIMEOUT,
    Abuser,
    Answer,
    ImportTemplate,
    Load,
    UserSession,
    http_session,
)
from benchmarks.errors import BenchError
from benchmarks.server import ServerProcess, bench_tenant, children_rss_mb, health, rss_mb
from benchmarks.stats import latency_summary
from benchmarks.texts import LOCOMO_DEV, chat_rounds, generated_turn_texts, locomo_turn_texts
from memory.models import Message

DEFAULT_ABUSE = "adds,flush-waits,imports,keyless"
# The options this mode reads whose default differs from the soak's (a run is short).
TENANTS_DEFAULTS = {"duration": 60.0, "warmup": 5.0, "add_rate": 6.0, "drain_timeout": 60.0}
WELL_BEHAVED_TENANTS = 3
QUERY_P95_RATIO_MAX = 1.5
FLUSH_LAG_P95_MAX_S = 10.0
CALIBRATION_MESSAGES = 2000
CALIBRATION_TIMEOUT = 300.0  # s
TOP_K = 5
FIRST_ERRORS = 10  # the well-behaved tenants' first refusals reported, with their messages


class Chat(Load):
    """The well-behaved tenants: per user, a round added then a query, paced."""

    def __init__(
        self, url: str, keys: list[str], users: list[UserSession], texts: list[str], *, rounds_per_s: float
    ) -> None:
        super().__init__(url)
        self.keys, self.users, self.texts = keys, users, texts
        self.interval = len(users) / rounds_per_s

    def start(self) -> None:
        for index, user in enumerate(self.users):
            self.spawn(self._chat, index, user)

    def _chat(self, index: int, user: UserSession) -> None:
        # Users spread over the interval: in phase, they would send bursts of as many rounds.
        with http_session(self.keys[user.tenant]) as http:
            for n in self.paced(self.interval, offset=self.interval * index / len(self.users)):
                (user_text, assistant_text), (next_text, _) = chat_rounds(
                    self.texts, count=2, start=997 * index + 2 * n
                )
                body = {
                    "messages": [
                        {"role": "user", "content": user_text},
                        {"role": "assistant", "content": assistant_text},
                    ]
                }
                self.post(
                    http,
                    "add",
                    user.tenant,
                    f"/api/v1/sessions/{user.session_id}/messages",
                    json=body,
                    timeout=REQUEST_TIMEOUT,
                )
                body = {"query": next_text, "top_k": TOP_K}
                self.post(
                    http,
                    "query",
                    user.tenant,
                    f"/api/v1/users/{user.user_id}/query",
                    json=body,
                    timeout=REQUEST_TIMEOUT,
                )


# --- the bench ---------------------------------------------------------------------------------


def tenants_bench(options: dict, env: dict) -> dict:
    """The report (see the module) of one server with ``env`` added to its environment.

    Raises ``CommandError`` naming a bad option, or when the run cannot go on (the server
    does not start or dies, a setup request is refused, the flush rate cannot be measured).
    """
    if options.get("url"):
        raise CommandError("tenants starts its own server: --url is not taken")
    kinds = [kind.strip() for kind in options["abuse"].split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(ABUSE_KINDS))
    if unknown:
        raise CommandError(f"--abuse takes kinds of {', '.join(ABUSE_KINDS)}, not {', '.join(unknown)}")
    for name in ("users", "abuse_users"):
        if options[name] <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive")
    for name in ("abuse_add_rate", "flush_waits", "import_mb", "keyless_mb", "warmup", "drain_timeout"):
        if options[name] < 0:
            raise CommandError(f"--{name.replace('_', '-')} may not be negative")
    options = {**options, "abuse": tuple(kinds)}
    texts = locomo_turn_texts(LOCOMO_DEV) if LOCOMO_DEV.exists() else generated_turn_texts(random.Random(0))
    run = uuid.uuid4().hex[:8]
    server = ServerProcess(log_path=Path(f"/tmp/memfuse-tenants-{run}-server.log"), env=env, kind="uvicorn")
    with ExitStack() as stack:
        keys = [stack.enter_context(bench_tenant(f"tenants-{run}-{index}"))[0] for index in range(WELL_BEHAVED_TENANTS)]
        abuser_key = stack.enter_context(bench_tenant(f"tenants-{run}-abuser"))[0]
        try:
            url = server.start()
            report, acknowledged = _bench(url, server.pid, keys, abuser_key, texts, options, run)
        except BenchError as exc:
            raise CommandError(str(exc)) from None
        finally:
            stopped = server.stop()
        # Before the tenants and all they hold are deleted.
        found = sum(
            Message.objects.filter(pk__in=acknowledged[i : i + 10000]).count()
            for i in range(0, len(acknowledged), 10000)
        )
    report["acknowledged"] = {"messages": len(acknowledged), "found": found, "lost": len(acknowledged) - found}
    report["goals"] = _goals(report)
    report["server"] = {"env": env, **stopped}
    return report


def _bench(
    url: str, pid: int, keys: list[str], abuser_key: str, texts: list[str], options: dict, run: str
) -> tuple[dict, list[str]]:
    """The report's runs, and the ids of every message acknowledged in them."""
    kinds = options["abuse"]
    abuser_agent = _created(url, abuser_key, "/api/v1/agents", {"name": f"tenants-{run}-abuser"})["agent"]
    abusers = _users(url, abuser_key, abuser_agent["id"], None, options["abuse_users"], f"tenants-{run}-abuser")
    rate, flush_rate = options["abuse_add_rate"], None
    if "adds" in kinds and not rate:
        flush_rate = _flush_rate(url, abuser_key, abusers, texts)
        rate = 3 * flush_rate
    template = None
    if "imports" in kinds:
        template = ImportTemplate(
            user_id=abusers[0].user_id, agent=abuser_agent, texts=texts, size_bytes=int(options["import_mb"] * 1e6)
        )
    agents = [_created(url, key, "/api/v1/agents", {"name": f"tenants-{run}"})["agent"]["id"] for key in keys]
    runs, acknowledged = {}, []
    for name in ("alone", "with_abuser"):
        users = [
            user
            for tenant, (key, agent) in enumerate(zip(keys, agents))
            for user in _users(url, key, agent, tenant, options["users"], f"tenants-{run}-{name}-{tenant}")
        ]
        abuser = None
        if name == "with_abuser":
            abuser = Abuser(
                url, abuser_key, abusers, texts=texts, kinds=kinds, add_rate=rate, flush_waits=options["flush_waits"],
                template=template, keyless_bytes=int(options["keyless_mb"] * 2**20),
            )  # fmt: skip
        runs[name], ids = _run(url, pid, keys, users, texts, abuser, options)
        acknowledged.extend(ids)
    config = (
        "duration",
        "warmup",
        "users",
        "add_rate",
        "abuse",
        "abuse_users",
        "flush_waits",
        "import_mb",
        "keyless_mb",
    )
    return {
        "config": {name: options[name] for name in config},
        "flush_rate_messages_per_s": flush_rate,
        "abuse_add_messages_per_s": round(rate, 1) if "adds" in kinds else None,
        "import_bytes": len(template.body) if template is not None else None,
        "runs": runs,
    }, acknowledged


def _created(url: str, key: str, path: str, body: dict) -> dict:
    response = requests.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT)
    if response.status_code != 201:
        raise BenchError(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")
    return response.json()["data"]


def _users(url: str, key: str, agent_id: str, tenant: int | None, count: int, name: str) -> list[UserSession]:
    """``count`` users ``<name>-<i>`` with a session each with ``agent_id``, made over HTTP."""
    users = []
    for index in range(count):
        user = _created(url, key, "/api/v1/users", {"name": f"{name}-{index}"})["user"]
        body = {"user_id": user["id"], "agent_id": agent_id, "name": f"{name}-{index}"}
        session = _created(url, key, "/api/v1/sessions", body)["session"]
        users.append(UserSession(tenant=tenant, user_id=user["id"], session_id=session["id"]))
    return users


def _flush_rate(url: str, key: str, users: list[UserSession], texts: list[str]) -> float:
    """Messages per second the flush embeds on the idle server: ``CALIBRATION_MESSAGES`` added
    in batches over ``users``, from the first add until the last of them is flushed."""
    load = Abuser(url, key, users, texts=texts)
    started = time.monotonic()
    with http_session(key) as http:
        answers = [load.add(http, "calibration", n) for n in range(CALIBRATION_MESSAGES // ADD_BATCH)]
    refused = [answer.status for answer in answers if answer.status != 201]
    if refused:
        raise BenchError(f"the adds that measure the flush rate were refused: HTTP {refused}")
    ids = [message_id for answer in answers for message_id in answer.message_ids]
    while Message.objects.filter(pk__in=ids, flushed_at__isnull=True).exists():
        if time.monotonic() - started > CALIBRATION_TIMEOUT:
            raise BenchError(f"{len(ids)} messages not flushed within {CALIBRATION_TIMEOUT:.0f} s: no flush rate")
        time.sleep(0.2)
    return round(len(ids) / (time.monotonic() - started), 1)


def _run(
    url: str,
    pid: int,
    keys: list[str],
    users: list[UserSession],
    texts: list[str],
    abuser: Abuser | None,
    options: dict,
) -> tuple[dict, list[str]]:
    """One run: the abuser (if any) started, then the chat, for ``duration`` s, the server
    sampled every ``sample_seconds``; then the wait for the run's chat messages to be flushed,
    and for the abuser's last requests. The run's report, and the ids of the messages it had
    acknowledged."""
    chat = Chat(url, keys, users, texts, rounds_per_s=options["add_rate"])
    loads = [chat] if abuser is None else [abuser, chat]
    samples = []
    started = time.monotonic()
    for load in loads:
        load.start()
    try:
        while (left := options["duration"] - (time.monotonic() - started)) > 0:
            time.sleep(min(options["sample_seconds"], left))
            samples.append(_sample(url, pid))
    finally:
        for load in loads:
            load.stop()
    chat.join(timeout=REQUEST_TIMEOUT + 5)
    answers = chat.answers()
    lags, unflushed = _flush_lags(answers, timeout=options["drain_timeout"])
    samples.append(_sample(url, pid))
    result = {
        "seconds": round(time.monotonic() - started, 1),
        "well_behaved": _well_behaved(
            answers, started=started, warmup=options["warmup"], lags=lags, unflushed=unflushed
        ),
        "server_memory_mb": {
            name: _span([sample[name] for sample in samples]) for name in ("web_rss", "inference_rss")
        },
        "max_pending_messages": max(
            (s["pending_messages"] for s in samples if s["pending_messages"] is not None), default=None
        ),
    }
    if abuser is not None:
        abuser.join(timeout=ABUSE_TIMEOUT)  # a flush wait answers after FLUSH_TIMEOUT_SECONDS at most
        answers += abuser.answers()
        result["abuser"] = _abuse(abuser.answers())
    return result, [message_id for answer in answers if 200 <= answer.status < 300 for message_id in answer.message_ids]


def _sample(url: str, pid: int) -> dict:
    children = children_rss_mb(pid)
    backlog = (health(url) or {}).get("backlog") or {}
    return {
        "web_rss": rss_mb(pid),
        "inference_rss": children[1] if children is not None else None,
        "pending_messages": backlog.get("pending_messages"),
    }


def _span(values: list[float | None]) -> dict | None:
    values = [value for value in values if value is not None]
    return {"first": values[0], "max": max(values), "last": values[-1]} if values else None


def _flush_lags(answers: list[Answer], *, timeout: float) -> tuple[list[float], int]:
    """Seconds from each acknowledged add's 201 to its messages' ``flushed_at``, waiting up to
    ``timeout`` s for the last; a message still pending then counts with its wait so far.
    Returns ``(lags, messages still pending)``."""
    acked = {
        message_id: answer.acked_at for answer in answers if answer.kind == "add" for message_id in answer.message_ids
    }
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Message.objects.filter(pk__in=list(acked), flushed_at__isnull=True).exists():
        time.sleep(0.5)
    flushed = dict(Message.objects.filter(pk__in=list(acked)).values_list("pk", "flushed_at"))
    now, lags, unflushed = time.time(), [], 0
    for message_id, acked_at in acked.items():
        at = flushed.get(uuid.UUID(message_id))
        unflushed += at is None
        # A flush may write before the client has read the 201: a lag of 0.
        lags.append(max(0.0, (at.timestamp() if at is not None else now) - acked_at))
    return lags, unflushed


def _counts(answers: list[Answer]) -> dict:
    counts: dict[str, Counter] = {}
    for answer in answers:
        counts.setdefault(answer.kind, Counter())[str(answer.status)] += 1
    return {kind: dict(sorted(counter.items())) for kind, counter in sorted(counts.items())}


def _latency(answers: list[Answer], kind: str) -> dict:
    return latency_summary(
        [answer.seconds * 1000 for answer in answers if answer.kind == kind and 200 <= answer.status < 300]
    )


def _well_behaved(answers: list[Answer], *, started: float, warmup: float, lags: list[float], unflushed: int) -> dict:
    """Answers by kind and status; latency (ms) of the 2xx answers to requests sent after the
    warm-up, of all three tenants and per tenant; the first refusals; flush lag (s)."""
    steady = [answer for answer in answers if answer.sent - started >= warmup]
    by_tenant = {}
    for tenant in range(WELL_BEHAVED_TENANTS):
        own = [answer for answer in steady if answer.tenant == tenant]
        by_tenant[str(tenant)] = {
            "query_p95_ms": _latency(own, "query")["p95"],
            "add_p95_ms": _latency(own, "add")["p95"],
        }
    return {
        "answers": _counts(answers),
        "only_2xx": all(200 <= answer.status < 300 for answer in answers),
        "latency_ms": {kind: _latency(steady, kind) for kind in ("add", "query")},
        "by_tenant": by_tenant,
        "first_errors": [
            {
                "kind": a.kind,
                "tenant": a.tenant,
                "status": a.status,
                "at_s": round(a.sent - started, 1),
                "detail": a.detail,
            }
            for a in sorted(answers, key=lambda answer: answer.sent)
            if not 200 <= a.status < 300
        ][:FIRST_ERRORS],
        "flush_lag_s": {**latency_summary(lags), "messages": len(lags), "unflushed": unflushed},
    }


def _abuse(answers: list[Answer]) -> dict:
    """Per kind of abuse: answers by status, a message of each refusal's status, seconds to the
    answer (p50, p95, max), messages acknowledged, and for keyless bodies the bytes sent before
    the answer (median, max)."""
    report = {}
    for kind, statuses in _counts(answers).items():
        own = [answer for answer in answers if answer.kind == kind]
        seconds = latency_summary([answer.seconds for answer in own])
        entry = {"answers": statuses, "seconds": {name: seconds[name] for name in ("p50", "p95", "max")}}
        # One message per refusal's status: a 503 of the backlog limit and one of the pool differ.
        entry["errors"] = {str(a.status): a.detail for a in reversed(own) if not 200 <= a.status < 300 and a.detail}
        if kind.startswith("keyless"):
            sent = [answer.bytes_sent for answer in own]
            entry["bytes_sent_before_answer"] = {"median": int(np.median(sent)), "max": max(sent)}
        else:
            entry["messages_acknowledged"] = sum(
                len(answer.message_ids) for answer in own if 200 <= answer.status < 300
            )
        report[kind] = entry
    return report


def _goals(report: dict) -> dict:
    """Issue 32's goals for the well-behaved tenants with the abuser, and for every message
    acknowledged: ``{name: {"value", "limit" (where one applies), "met"}}``."""
    alone, abused = (report["runs"][name]["well_behaved"] for name in ("alone", "with_abuser"))
    p95_alone, p95_abused = alone["latency_ms"]["query"]["p95"], abused["latency_ms"]["query"]["p95"]
    ratio = round(p95_abused / p95_alone, 2) if p95_alone and p95_abused else None
    lag = abused["flush_lag_s"]["p95"]
    lost = report["acknowledged"]["lost"]
    return {
        "well_behaved_only_2xx": {"value": abused["only_2xx"], "met": abused["only_2xx"]},
        "query_p95_ratio": {
            "value": ratio,
            "limit": QUERY_P95_RATIO_MAX,
            "met": ratio is not None and ratio <= QUERY_P95_RATIO_MAX,
        },
        "flush_lag_p95_s": {
            "value": lag,
            "limit": FLUSH_LAG_P95_MAX_S,
            "met": lag is not None and lag < FLUSH_LAG_P95_MAX_S,
        },
        "nothing_lost": {"value": lost == 0, "met": lost == 0},
    }
