"""``manage.py locomo_eval PATH``: retrieval recall@k on a LoCoMo-format file.

LoCoMo: Maharana et al., "Evaluating Very Long-Term Conversational Memory of LLM Agents",
ACL 2024. One user per conversation, one session per LoCoMo session, every turn stored
through the import (``memory.portability``: ``import_memory --format locomo``'s records,
stored pending as an add stores them, write-behind), each user then
flushed through ``memory.indexing.flush.flush_pending`` (what the flush workers run), and every
question outside category 5 asked through ``selectors.memory_query`` (the REST API's query
function). Flushing before querying measures the index as it stands in production; the
ingest time includes the flush (the embedding).

R@k = |evidence turns among the top k messages| / |evidence turns|, averaged over questions,
per category code and overall (percentages). Only ``conversation`` and each question's
``question``, ``evidence`` and ``category`` are read: never ``event_summary``,
``observation``, ``session_summary`` or the answers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError
from tqdm import tqdm

from memory import selectors
from memory.api.serializers import RetrievalOverrides
from memory.facts import worker
from memory.indexing.flush import flush_pending
from memory.inference import llm
from memory.models import Agent, Message, Tenant, User
from memory.portability import importer
from memory.portability.locomo import DIA_ID_KEY, conversation_sessions, locomo_records
from memory.retrieval import MemoryQuery, RetrievalConfig
from memory.services.agents import agent_create
from memory.services.tenants import tenant_create
from memory.services.users import user_delete
from runtime.embedded_pg import migrate_if_embedded

KS = (5, 10, 20)
EVIDENCE_ID = re.compile(r"D(\d+):(\d+)")
EVAL_TENANT = "locomo-eval"  # the tenant of the users and agent this command creates
OVERRIDE_OPTIONS = ("bm25_weight", "vector_weight", "rrf_k", "speaker_weight", "rerank", "rerank_top_n")
CATEGORY_NAMES = {"1": "multi-hop", "2": "temporal", "3": "open-domain", "4": "single-hop"}


def evidence_ids(evidence: list, known: set[str]) -> list[str]:
    """Valid evidence turn ids of a question: ``D<s>:<t>`` found by regex, unknown ids dropped."""
    ids = []
    for item in evidence or []:
        for session, turn in EVIDENCE_ID.findall(str(item)):
            dia_id = f"D{int(session)}:{int(turn)}"
            if dia_id in known and dia_id not in ids:
                ids.append(dia_id)
    return ids


def locomo_eval(options: dict, *, write) -> dict:
    """Ingest ``options["path"]``, ask its questions, print the table through ``write(str)``
    and write the report to ``options["json_out"]`` when set; returns the report.

    ``options``: the command's (``path``, ``json_out``, ``keep``, ``conversations``, and the
    retrieval overrides of ``OVERRIDE_OPTIONS``). Raises ``CommandError`` naming the bad
    argument before anything is stored.
    """
    conversations = load_file(options["path"])
    migrate_if_embedded()
    if options["conversations"] > 0:
        conversations = conversations[: options["conversations"]]
    if options["rerank"] and not settings.MEMFUSE["RERANKER_MODEL_PATH"]:
        raise CommandError("--rerank: no reranker is configured (set RERANKER_MODEL_PATH)")
    config = RetrievalConfig.from_settings(**retrieval_overrides(options))
    layers = eval_layers(options.get("layers") or "m0", write=write)
    run = uuid.uuid4().hex[:8]
    # Its own tenant, so its users and agent never share names with a client's.
    tenant = Tenant.objects.filter(name=EVAL_TENANT).first() or tenant_create(name=EVAL_TENANT)
    agent = Agent.objects.filter(tenant=tenant, name="locomo-eval").first() or agent_create(
        tenant_id=tenant.pk, name="locomo-eval"
    )
    users = []
    try:
        ingest_seconds, n_messages, users = ingest(conversations, agent, run)
        if "m1" in layers:
            extract_facts()
        hits, latencies = ask(conversations, users, config, layers=layers)
    finally:
        if not options["keep"]:
            for user in users:
                user_delete(user=user)
    report = {
        **recall_report(hits, latencies, n_messages, ingest_seconds),
        "retrieval": dataclasses.asdict(config),
        "layers": layers,
    }
    write(table(report))
    if options["json_out"]:
        options["json_out"].write_text(json.dumps(report, indent=2) + "\n")
        write(f"wrote {options['json_out']}")
    return report


def eval_layers(value: str, *, write) -> list[str]:
    """The layers of ``--layers`` (``"m0,m1"``); ``m1`` without an LLM (``LLM_BASE_URL``
    unset) is dropped, and the run says it reports M0 only. Raises ``CommandError`` for an
    unknown layer."""
    layers = [layer.strip() for layer in value.split(",") if layer.strip()]
    unknown = sorted(set(layers) - {"m0", "m1"})
    if unknown or not layers:
        raise CommandError(f"--layers: expected m0 and/or m1, not {value!r}")
    if "m1" in layers and not llm.enabled():
        write("--layers: no LLM is configured (LLM_BASE_URL is unset): the facts layer (m1) is off; reporting M0 only")
        layers = [layer for layer in layers if layer != "m1"] or ["m0"]
    return layers


def extract_facts() -> None:
    """Run the facts layer's extraction of the flushed conversations until no job is left
    (in this process: ``memory.facts.worker.run_once``)."""
    worker.run_once()


def retrieval_overrides(options: dict) -> dict:
    """The retrieval options given, checked by the API's own rules for per-query overrides
    (``RetrievalOverrides``: ranges, not both retrievers off). Raises ``CommandError``
    naming the option, before anything is stored."""
    given = {name: options[name] for name in OVERRIDE_OPTIONS if options.get(name) is not None}
    overrides = RetrievalOverrides(data=given)
    if not overrides.is_valid():
        raise CommandError(
            "; ".join(
                f"--{field.replace('_', '-')}: {' '.join(str(message) for message in messages)}"
                for field, messages in overrides.errors.items()
            )
        )
    return overrides.validated_data


def load_file(path: Path) -> list[dict]:
    """The conversations of a LoCoMo-format file; ``CommandError`` naming ``path`` otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(f"path: no such file: {path}") from None
    except (OSError, ValueError) as exc:
        raise CommandError(f"path: cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(c, dict) and "conversation" in c for c in data):
        raise CommandError("path: expected a JSON list of LoCoMo conversations (objects with 'conversation')")
    return data


def ingest(conversations: list[dict], agent, run: str) -> tuple[float, int, list[User]]:
    """Import each conversation as a user of ``agent``'s tenant, then flush every user.

    Returns ``(seconds, messages stored, users in conversation order)``.
    """
    users, n_messages = [], 0
    total = sum(len(turns) for c in conversations for _, _, turns in conversation_sessions(c["conversation"]))
    started = time.perf_counter()
    with tqdm(total=total, desc="ingest", unit="msg", disable=None) as progress:
        for index, item in enumerate(conversations):
            records = list(
                locomo_records(
                    item,
                    index=index,
                    user_name=lambda sample_id: f"locomo-{sample_id}-{run}",
                    agent_name=agent.name,
                    seed=run,
                )
            )
            messages = sum(1 for record in records if record["type"] == "message")
            report = importer.memory_import(
                tenant_id=agent.tenant_id, source=importer.records_of(records), queue_flush=False
            )
            users.append(User.objects.get(pk=report.user_id))
            n_messages += messages
            progress.update(messages)
    for user in tqdm(users, desc="flush", unit="user", disable=None):
        flush_pending(user_id=user.pk)
    return time.perf_counter() - started, n_messages, users


def ask(conversations: list[dict], users: list, config: RetrievalConfig, *, layers: list[str] | None = None):
    """Every question outside category 5 with known evidence, asked of its user, over
    ``layers`` (default ``["m0"]``): a fact (M1) counts as the turns it was extracted from.

    Returns ``(hits, latencies)``: ``[(category, sample id, {k: recall})]`` and query ms.
    """
    layers = tuple(layers or ["m0"])
    dia_ids = {}
    if "m1" in layers:
        dia_ids = {
            str(pk): metadata.get(DIA_ID_KEY)
            for pk, metadata in Message.objects.filter(user__in=users).values_list("pk", "metadata")
        }
    hits: list[tuple[str, str, dict[int, float]]] = []
    latencies: list[float] = []
    questions = []
    for index, (item, user) in enumerate(zip(conversations, users)):
        sample_id = item.get("sample_id", f"conv-{index}")
        known = {turn.get("dia_id") for _, _, turns in conversation_sessions(item["conversation"]) for turn in turns}
        for qa in item.get("qa", []):
            category = qa.get("category")
            if category == 5:
                continue
            evidence = evidence_ids(qa.get("evidence"), known)
            if evidence:
                questions.append((user, sample_id, str(category), qa["question"], evidence))
    for user, sample_id, category, question, evidence in tqdm(questions, desc="queries", unit="q", disable=None):
        user.refresh_from_db(fields=["memory_version"])
        started = time.perf_counter()
        results = selectors.memory_query(
            MemoryQuery(user=user, query=question, top_k=max(KS), config=config, layers=layers)
        )
        latencies.append((time.perf_counter() - started) * 1000)
        ranked = [
            r["metadata"].get(DIA_ID_KEY)
            if r.get("layer") != "m1"
            else next((dia_ids.get(source) for source in r["metadata"]["source_message_ids"]), None)
            for r in results
        ]
        hits.append((category, sample_id, {k: len(set(ranked[:k]) & set(evidence)) / len(evidence) for k in KS}))
    return hits, latencies


def recall_report(hits, latencies, n_messages: int, ingest_seconds: float) -> dict:
    """Recall (percent) overall, by category and by conversation; counts; ingest rate; query ms."""

    def mean_recall(rows):
        return {str(k): round(100 * float(np.mean([r[k] for r in rows])), 1) if rows else 0.0 for k in KS}

    categories = sorted({c for c, _, _ in hits}, key=lambda c: (len(c), c))
    samples = list(dict.fromkeys(sample for _, sample, _ in hits))
    return {
        "recall": {
            "overall": mean_recall([r for _, _, r in hits]),
            "by_category": {c: mean_recall([r for cat, _, r in hits if cat == c]) for c in categories},
            # A change that helps in most conversations, not only on average, is likelier
            # to help on conversations outside this file.
            "by_conversation": {s: mean_recall([r for _, sample, r in hits if sample == s]) for s in samples},
        },
        "n_questions": len(hits),
        "n_by_category": {c: sum(1 for cat, _, _ in hits if cat == c) for c in categories},
        "n_by_conversation": {s: sum(1 for _, sample, _ in hits if sample == s) for s in samples},
        "ingest": {
            "messages": n_messages,
            "seconds": round(ingest_seconds, 2),
            "messages_per_s": round(n_messages / ingest_seconds, 1) if ingest_seconds else 0.0,
        },
        "query_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1) if latencies else 0.0,
            "p95": round(float(np.percentile(latencies, 95)), 1) if latencies else 0.0,
        },
    }


def table(report: dict) -> str:
    """The report as a text table: R@k by category and overall, R@10 by conversation, rates."""
    lines = [f"{'category':<16}{'n':>6}" + "".join(f"{'R@' + str(k):>8}" for k in KS)]
    for code, recall in report["recall"]["by_category"].items():
        label = f"{code} {CATEGORY_NAMES.get(code, '')}".strip()
        lines.append(f"{label:<16}{report['n_by_category'][code]:>6}" + "".join(f"{recall[str(k)]:>8.1f}" for k in KS))
    overall = report["recall"]["overall"]
    lines.append(f"{'overall':<16}{report['n_questions']:>6}" + "".join(f"{overall[str(k)]:>8.1f}" for k in KS))
    lines.append(
        "R@10 by conversation: "
        + ", ".join(f"{sample} {recall['10']:.1f}" for sample, recall in report["recall"]["by_conversation"].items())
    )
    ingest, query_ms = report["ingest"], report["query_ms"]
    lines.append(
        f"ingest: {ingest['messages']} messages in {ingest['seconds']} s ({ingest['messages_per_s']}/s); "
        f"query: p50 {query_ms['p50']} ms, p95 {query_ms['p95']} ms"
    )
    return "\n".join(lines)
