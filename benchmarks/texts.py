"""Chat turns for the benchmarks' load: LoCoMo's conversation turns, or a small seeded generator."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

from memory.portability.locomo import conversation_sessions

LOCOMO_DEV = settings.BASE_DIR.parent / "shared" / "data" / "locomo" / "locomo-dev.json"


def chat_rounds(texts: Sequence[str], *, count: int, start: int) -> list[tuple[str, str]]:
    """``count`` rounds ``(user text, assistant text)`` of consecutive turns from ``start``, cycling.

    Raises ``ValueError`` with fewer than two texts.
    """
    if len(texts) < 2:
        raise ValueError("need at least two texts to make a chat round")
    n = len(texts)
    return [(texts[(start + 2 * i) % n], texts[(start + 2 * i + 1) % n]) for i in range(count)]


def locomo_turn_texts(path: Path) -> list[str]:
    """The ``text`` of every turn of every conversation's sessions, in conversation order.

    Only ``conversation.session_<n>`` turn lists are read (never questions, answers,
    summaries or observations). Raises ``OSError``/``ValueError`` when the file is unreadable.
    """
    data = json.loads(path.read_text())
    texts = []
    for item in data:
        for _, _, turns in conversation_sessions(item["conversation"]):
            texts.extend(turn["text"] for turn in turns if isinstance(turn.get("text"), str) and turn["text"].strip())
    return texts


_PEOPLE = ["my sister", "my brother", "my friend Maya", "my neighbour Tom", "my coworker Priya", "my dad", "my mom"]
_ACTIVITIES = ["went hiking", "tried a new recipe", "started pottery classes", "adopted a puppy",
               "ran a half marathon", "visited a museum", "planted tomatoes", "learned to play chess"]
_PLACES = ["near Lake Tahoe", "in Lisbon", "downtown", "at the community centre", "in the park", "at home"]
_WHEN = ["last weekend", "yesterday", "a few days ago", "last month", "this morning"]
_REPLIES = ["That sounds wonderful! How did {who} like it?", "Nice! Would you do it again {where}?",
            "How exciting. What was the best part?", "I remember you mentioned {who} before. How are they?",
            "That's great. Did anything surprise you?"]


def generated_turn_texts(rng: random.Random, *, count: int = 400) -> list[str]:
    """``count`` chat turns alternating a user's news and an assistant's reply (fallback texts)."""
    texts = []
    for _ in range(count // 2):
        who, where = rng.choice(_PEOPLE), rng.choice(_PLACES)
        texts.append(f"I {rng.choice(_ACTIVITIES)} with {who} {where} {rng.choice(_WHEN)}.")
        texts.append(rng.choice(_REPLIES).format(who=who, where=where))
    return texts
