"""Extraction: a job's window of turns, and the facts an LLM finds in it, each with the turns
that state it and its date resolved against the session's (``memory.facts.times``).

One LLM call per chunk of ``FACTS_WINDOW_TURNS`` turns, with the ``FACTS_CONTEXT_TURNS``
turns before it as context (``memory.facts.prompts``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

from django.conf import settings
from django.db import connection

from memory.facts import budget, prompts, times
from memory.facts.models import FactJob


@dataclass
class Turn:
    """A message of the window, at the version (``seq``) it was read in."""

    id: uuid.UUID
    seq: int
    position: int
    text: str
    created_at: datetime


def window(job: FactJob) -> list[Turn]:
    """The job's messages that still exist, in session order."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, seq, position, index_text, created_at FROM memory_message "
            "WHERE session_id = %s AND user_id = %s AND id = ANY(%s::uuid[]) ORDER BY position",
            [job.session_id, job.user_id, [str(i) for i in job.message_ids]],
        )
        return [Turn(*row) for row in cursor.fetchall()]


def _context(*, session_id: uuid.UUID, before: int, count: int) -> list[str]:
    if count <= 0:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT index_text FROM memory_message WHERE session_id = %s AND position < %s AND position >= %s ORDER BY position",
            [session_id, before, before - count],
        )
        return [row[0] for row in cursor.fetchall()]


def _valid_from(fact: prompts.ExtractedFact, *, on: date) -> date | None:
    """The fact's date: its time words resolved here when they are a known form
    (``memory.facts.times``), else the LLM's ISO date when it gave a valid one."""
    if fact.time_expression:
        resolved = times.resolve(fact.time_expression, on=on)
        if resolved is not None:
            return resolved
    if fact.valid_from:
        try:
            return date.fromisoformat(fact.valid_from[:10])
        except ValueError:
            return None
    return None


@dataclass
class NewFact:
    """A fact extracted from ``sources``; ``embedding`` (``(dim,)`` float32) is set before
    consolidation."""

    text: str
    kind: str
    entities: list[str]
    valid_from: date | None
    time_expression: str
    confidence: float
    sources: list[Turn]
    embedding: object = None


def extract(job: FactJob, turns: list[Turn]) -> list[NewFact]:
    """One LLM call per chunk of ``FACTS_WINDOW_TURNS`` turns. Raises ``llm.LLMError``."""
    config = settings.LLM
    extracted: list[NewFact] = []
    size = max(1, config["WINDOW_TURNS"])
    for start in range(0, len(turns), size):
        chunk = turns[start : start + size]
        on = chunk[0].created_at.date()
        prompt = prompts.extract_prompt(
            session_date=f"{on.isoformat()} ({on.strftime('%A')})",
            context=_context(session_id=job.session_id, before=chunk[0].position, count=config["CONTEXT_TURNS"]),
            turns=[turn.text for turn in chunk],
        )
        answer = budget.call(job, purpose="extract", system=prompts.EXTRACT_SYSTEM, user=prompt, schema=prompts.Extraction)
        for fact in answer.facts:
            sources = [chunk[n - 1] for n in dict.fromkeys(fact.sources) if 1 <= n <= len(chunk)]
            if not sources:
                continue  # a fact no turn of the window states has no provenance: dropped
            extracted.append(
                NewFact(
                    text=fact.text.strip(),
                    kind=fact.kind,
                    entities=[e.strip()[:255] for e in fact.entities if e.strip()],
                    valid_from=_valid_from(fact, on=on),
                    time_expression=fact.time_expression.strip(),
                    confidence=fact.confidence,
                    sources=sources,
                )
            )
    return extracted
