"""The facts layer's cost on a LoCoMo file: LLM calls per 100 messages and tokens per message,
as the deterministic test server (``tests.llm_server``) counts them, against one call per
message (``FACTS_WINDOW_TURNS=1``, no context turns).

    python -m benchmarks.facts_cost ../shared/data/locomo/locomo-dev.json --conversations 2

Each conversation is imported as a user of a tenant of its own, flushed (which queues the
extraction jobs, as in serving) and extracted in this process until no job is left; the
users are deleted after. Needs the database of ``DATABASE_URL`` (or the embedded one).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "memfuse_project.settings")
    import django

    django.setup()


def measure(conversations: list[dict], *, window_turns: int, context_turns: int) -> dict:
    """One run over ``conversations``: ``{"messages", "calls", "extract_calls",
    "consolidate_calls", "prompt_tokens", "completion_tokens", "facts", "calls_per_100_messages",
    "tokens_per_message"}``."""
    from django.conf import settings

    from memory.facts import worker
    from memory.facts.models import Fact, LlmCall
    from memory.indexing.flush import flush_pending
    from memory.portability import importer
    from memory.portability.locomo import locomo_records
    from memory.services.agents import agent_create
    from memory.services.tenants import tenant_create, tenant_delete
    from runtime.embedded_pg import migrate_if_embedded
    from tests.llm_server import LLMServer

    migrate_if_embedded()
    server = LLMServer()
    saved = settings.LLM
    settings.LLM = {
        **saved,
        "BASE_URL": server.base_url,
        "MODEL": "test-server",
        "WINDOW_TURNS": window_turns,
        "CONTEXT_TURNS": context_turns,
        "TENANT_CALLS_PER_MINUTE": 0,
        "TENANT_TOKENS_PER_MINUTE": 0,
    }
    tenant = tenant_create(name=f"facts-cost-{uuid.uuid4().hex[:8]}")
    agent = agent_create(tenant_id=tenant.pk, name="locomo")
    messages = 0
    try:
        for index, item in enumerate(conversations):
            records = list(
                locomo_records(item, index=index, user_name=lambda s: f"cost-{s}", agent_name=agent.name, seed="cost")
            )
            messages += sum(1 for record in records if record["type"] == "message")
            report = importer.memory_import(tenant_id=tenant.pk, source=importer.records_of(records), queue_flush=False)
            flush_pending(user_id=report.user_id)
            worker.run_once()
        calls = LlmCall.objects.filter(tenant=tenant)
        facts = Fact.objects.filter(user__tenant=tenant).count()
        result = {
            "window_turns": window_turns,
            "context_turns": context_turns,
            "messages": messages,
            "calls": calls.count(),
            "extract_calls": calls.filter(purpose="extract").count(),
            "consolidate_calls": calls.filter(purpose="consolidate").count(),
            "prompt_tokens": server.prompt_tokens,
            "completion_tokens": server.completion_tokens,
            "facts": facts,
        }
    finally:
        tenant_delete(tenant=tenant)
        settings.LLM = saved
        server.stop()
    result["calls_per_100_messages"] = round(100 * result["calls"] / max(1, messages), 2)
    result["tokens_per_message"] = round((result["prompt_tokens"] + result["completion_tokens"]) / max(1, messages), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="LoCoMo-format JSON file")
    parser.add_argument("--conversations", type=int, default=0, help="only the first N conversations (0: all)")
    args = parser.parse_args()
    _setup()
    conversations = json.loads(args.path.read_text())
    if args.conversations:
        conversations = conversations[: args.conversations]
    from django.conf import settings

    windowed = measure(
        conversations, window_turns=settings.LLM["WINDOW_TURNS"], context_turns=settings.LLM["CONTEXT_TURNS"]
    )
    per_message = measure(conversations, window_turns=1, context_turns=0)
    print(json.dumps({"windowed": windowed, "one_call_per_message": per_message}, indent=2))


if __name__ == "__main__":
    main()
