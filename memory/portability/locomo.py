"""A LoCoMo file (Maharana et al., ACL 2024: a JSON list of conversations) as import records.

One user per conversation, one agent for the file, one session per LoCoMo session
(``session_<n>``), one message per turn: role ``user`` for ``speaker_a``'s turns and
``assistant`` for the other's, ``metadata`` ``{"speaker", "locomo_dia_id"[, "image_caption"]}``,
``created_at`` the session's date plus the turn's index in seconds (so turns keep their order;
2000-01-01 when the session has no date). Ids are UUIDv5 of the conversation, session and
turn (and ``seed``): importing the same file again finds the same records.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from memory.portability import FORMAT, VERSION

DIA_ID_KEY = "locomo_dia_id"
SESSION_KEY = re.compile(r"^session_(\d+)$")
NAMESPACE = uuid.UUID("8f0c5c1e-2a4b-4c52-9d1e-6b1f3f0a7e21")  # of this format's ids
NO_DATE = datetime(2000, 1, 1, tzinfo=UTC)


def parse_session_date(text: str) -> datetime:
    """``"1:56 pm on 8 May, 2023"`` -> an aware UTC datetime. ``ValueError`` if unparseable."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def conversation_sessions(conversation: dict) -> list[tuple[int, datetime | None, list[dict]]]:
    """``[(session number, date or None, turns)]`` for the sessions that have turn lists."""
    sessions = []
    for key, turns in conversation.items():
        match = SESSION_KEY.match(key)
        if not match or not isinstance(turns, list):
            continue
        number = int(match.group(1))
        date_text = conversation.get(f"session_{number}_date_time")
        try:
            date = parse_session_date(date_text) if date_text else None
        except ValueError:
            date = None
        sessions.append((number, date, turns))
    return sorted(sessions, key=lambda item: item[0])


def locomo_records(
    item: dict, *, index: int, user_name: Callable[[str], str], agent_name: str = "locomo", seed: str = ""
) -> Iterator[dict]:
    """The import records (``memory.portability``'s format) of LoCoMo conversation ``item``
    (the ``index``-th of its file): header, user ``user_name(sample_id)``, agent ``agent_name``,
    sessions, messages. ``seed`` goes into every id (distinct runs of one file, distinct ids)."""
    conversation = item["conversation"]
    sample_id = str(item.get("sample_id", f"conv-{index}"))

    def new_id(*parts) -> str:
        return str(uuid.uuid5(NAMESPACE, "/".join([seed, sample_id, *map(str, parts)])))

    now = NO_DATE.isoformat()
    yield {"type": "header", "format": FORMAT, "version": VERSION, "embedding": None}
    yield {"type": "user", "id": new_id("user"), "name": user_name(sample_id), "metadata": {}, "created_at": now}
    agent_id = str(uuid.uuid5(NAMESPACE, f"{seed}/agent/{agent_name}"))
    yield {"type": "agent", "id": agent_id, "name": agent_name, "metadata": {}, "created_at": now}
    speaker_a = conversation.get("speaker_a")
    sessions = conversation_sessions(conversation)
    for number, date, _ in sessions:
        yield {
            "type": "session",
            "id": new_id("session", number),
            "name": f"session_{number}",
            "agent_id": agent_id,
            "metadata": {},
            "created_at": (date or NO_DATE).isoformat(),
        }
    for number, date, turns in sessions:
        base = date or NO_DATE
        for position, turn in enumerate(turns):
            metadata = {"speaker": turn.get("speaker", ""), DIA_ID_KEY: turn.get("dia_id")}
            if turn.get("blip_caption"):
                metadata["image_caption"] = turn["blip_caption"]
            yield {
                "type": "message",
                "id": new_id("turn", number, position),
                "session_id": new_id("session", number),
                "position": position,
                "role": "user" if turn.get("speaker") == speaker_a else "assistant",
                "content": str(turn.get("text", "")),
                "metadata": metadata,
                "created_at": (base + timedelta(seconds=position)).isoformat(),
            }
