"""The two prompts of the facts layer and the JSON schemas their answers must match.

Extraction reads a window of a session (a few earlier turns as context, then the turns to
extract from, numbered) and answers facts citing those numbers. Consolidation is the Mem0
update step (Chhikara et al. 2025, "Mem0: Building Production-Ready AI Agents with Scalable
Long-Term Memory", arXiv 2504.19413, section 2.1): each new fact, beside the user's most
similar existing facts, gets one of ADD, UPDATE, DELETE or NONE.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

KINDS = ("preference", "plan", "relation", "event", "attribute", "other")


class ExtractedFact(BaseModel):
    text: str = Field(min_length=1, max_length=1000)
    kind: Literal["preference", "plan", "relation", "event", "attribute", "other"] = "other"
    entities: list[str] = Field(default_factory=list, max_length=20)
    time_expression: str = Field(default="", max_length=255)
    valid_from: str | None = None
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)
    sources: list[int] = Field(min_length=1, max_length=100)


class Extraction(BaseModel):
    facts: list[ExtractedFact] = Field(default_factory=list, max_length=100)


class Decision(BaseModel):
    new: int
    event: Literal["ADD", "UPDATE", "DELETE", "NONE"]
    existing: int | None = None
    text: str | None = Field(default=None, max_length=1000)


class Consolidation(BaseModel):
    decisions: list[Decision] = Field(default_factory=list, max_length=200)


EXTRACT_SYSTEM = """You extract durable facts about the people in a conversation, for a long-term memory.
Write each fact as one self-contained sentence naming who it is about (never "I" or "you").
Kinds: preference, plan, relation, event, attribute, other.
For a fact that happened or holds at a time, copy the time words exactly as said into
"time_expression" (for example "last Saturday", "yesterday", "2 weeks ago") and give the date
you resolve them to, against the session date, in "valid_from" (YYYY-MM-DD).
"sources" lists the numbers of the turns (from the section "Turns to extract from") that state
the fact. Do not extract from the context turns alone. Skip greetings and small talk.
Answer JSON only: {"facts": [{"text", "kind", "entities", "time_expression", "valid_from", "confidence", "sources"}]}."""

CONSOLIDATE_SYSTEM = """You keep a user's memory of facts consistent. For each new fact, compare it
with the existing facts and choose one event:
ADD (new information), UPDATE (it refines or changes existing fact N: give the merged sentence
in "text"), DELETE (it contradicts existing fact N, which no longer holds), NONE (already known).
Answer JSON only: {"decisions": [{"new": <number>, "event": "ADD"|"UPDATE"|"DELETE"|"NONE", "existing": <number or null>, "text": <string or null>}]}."""


def extract_prompt(*, session_date: str, context: list[str], turns: list[str]) -> str:
    """The user message of an extraction call: the session's date (``YYYY-MM-DD (Weekday)``),
    the context turns (``"speaker: text"``), then the turns to extract from, numbered from 1."""
    lines = [f"Session date: {session_date}", ""]
    if context:
        lines.append("Context (earlier turns):")
        lines.extend(f"- {turn}" for turn in context)
        lines.append("")
    lines.append("Turns to extract from:")
    lines.extend(f"[{number}] {turn}" for number, turn in enumerate(turns, start=1))
    return "\n".join(lines)


def consolidate_prompt(*, existing: list[str], new: list[str]) -> str:
    """The user message of a consolidation call: existing facts and new facts, each numbered from 1."""
    lines = ["Existing facts:"]
    lines.extend(f"[{number}] {text}" for number, text in enumerate(existing, start=1))
    lines += ["", "New facts:"]
    lines.extend(f"[{number}] {text}" for number, text in enumerate(new, start=1))
    return "\n".join(lines)
