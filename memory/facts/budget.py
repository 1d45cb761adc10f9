"""The facts layer's LLM calls and each tenant's budget of them: every call is an ``LlmCall``
row (tokens, latency, outcome), counted over every process, so that a tenant past
``LLM_TENANT_CALLS_PER_MINUTE`` or ``LLM_TENANT_TOKENS_PER_MINUTE`` waits for the minute to
slide on (``memory.facts.jobs.facts_claim`` skips its jobs)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import connection

from memory.facts.models import FactJob, LlmCall
from memory.inference import llm


def tenants_over_budget() -> list[uuid.UUID]:
    """Tenants whose calls or tokens in the last minute, counted over every process
    (``LlmCall``), reached ``LLM_TENANT_CALLS_PER_MINUTE`` or ``LLM_TENANT_TOKENS_PER_MINUTE``
    (a bound of 0 is none). Their jobs are not claimed until the minute slides on."""
    calls, tokens = settings.LLM["TENANT_CALLS_PER_MINUTE"], settings.LLM["TENANT_TOKENS_PER_MINUTE"]
    if not calls and not tokens:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT tenant_id FROM memory_llmcall WHERE at > now() - interval '1 minute'
            GROUP BY tenant_id
            HAVING (%(calls)s > 0 AND count(*) >= %(calls)s)
                OR (%(tokens)s > 0 AND sum(prompt_tokens + completion_tokens) >= %(tokens)s)
            """,
            {"calls": calls, "tokens": tokens},
        )
        return [row[0] for row in cursor.fetchall()]


def _record_call(
    *, tenant_id: uuid.UUID, purpose: str, usage: llm.Usage | None, ok: bool, latency_ms: float = 0.0
) -> None:
    LlmCall.objects.create(
        tenant_id=tenant_id,
        purpose=purpose,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        latency_ms=usage.latency_ms if usage else latency_ms,
        ok=ok,
    )


def call(job: FactJob, *, purpose: str, system: str, user: str, schema):
    """One LLM call for ``job`` (``llm.chat_json``), recorded against its tenant's budget
    whether it succeeds or not. ``purpose``: ``"extract"`` or ``"consolidate"``. Returns the
    answer as an instance of ``schema``; raises ``llm.LLMError``."""
    try:
        answer, usage = llm.chat_json(system=system, user=user, schema=schema, name=purpose)
    except llm.LLMError as exc:
        _record_call(tenant_id=job.tenant_id, purpose=purpose, usage=exc.usage, ok=False)
        raise
    _record_call(tenant_id=job.tenant_id, purpose=purpose, usage=usage, ok=True)
    return answer
