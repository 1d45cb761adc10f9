"""Export of a user's memory as JSON Lines (the format of ``memory.portability``), streamed."""

from __future__ import annotations

import json
from collections.abc import Iterator

from django.db import connection
from django.utils import timezone

from memory.facts.portability import fact_records
from memory.inference import registry
from memory.models import User
from memory.portability import FORMAT, VERSION

PAGE_ROWS = 200  # messages or knowledge items per query and per chunk: ~1 MB of lines with embeddings


def _line(record: dict, embedding: str | None = None) -> str:
    """One JSON line; ``embedding`` (pgvector's text output ``[x,y,...]``, valid JSON) is
    spliced in as it comes from the database rather than parsed into floats and dumped again."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    if embedding is not None:
        text = f'{text[:-1]},"embedding":{embedding}}}'
    return text + "\n"


def _iso(moment) -> str:
    return moment.isoformat()


def user_export(*, user: User, embeddings: bool = False, page_rows: int = PAGE_ROWS) -> Iterator[bytes]:
    """The memory of ``user`` as JSON Lines: chunks of UTF-8 bytes, each a few whole lines.

    ``embeddings``: include each message's and knowledge item's embedding (``None`` where a
    message is pending), and name their model in the header. Memory use is bounded by one
    page (``page_rows`` rows) whatever the user's size: every page is its own query, keyed on
    the last row seen (session and position; id for knowledge), so the rows are never all in
    memory, and no cursor stays open between chunks (each chunk may run on another thread,
    with its own database connection: the ASGI view does so).
    """
    # One generator of pages; most of its length is the pages' SQL text.
    header = {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "exported_at": timezone.now().isoformat(),
        "embedding": registry.document_model() if embeddings else None,
    }
    head = [
        _line(header),
        _line(
            {
                "type": "user",
                "id": str(user.pk),
                "name": user.name,
                "description": user.description,
                "metadata": user.metadata,
                "created_at": _iso(user.created_at),
            }
        ),
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, name, description, metadata, created_at FROM memory_agent "
            "WHERE id IN (SELECT agent_id FROM memory_session WHERE user_id = %s) ORDER BY created_at, id",
            [user.pk],
        )
        for agent_id, name, description, metadata, created_at in cursor.fetchall():
            record = {"type": "agent", "id": str(agent_id), "name": name, "description": description}
            head.append(_line({**record, "metadata": _json(metadata), "created_at": _iso(created_at)}))
        cursor.execute(
            "SELECT id, name, agent_id, metadata, created_at FROM memory_session WHERE user_id = %s ORDER BY created_at, id",
            [user.pk],
        )
        sessions = cursor.fetchall()
    for session_id, name, agent_id, metadata, created_at in sessions:
        record = {"type": "session", "id": str(session_id), "name": name, "agent_id": str(agent_id)}
        head.append(_line({**record, "metadata": _json(metadata), "created_at": _iso(created_at)}))
    yield "".join(head).encode()
    vector = "embedding::text" if embeddings else "NULL"
    for session_id, *_ in sessions:
        after = -1
        while True:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT id, position, role, content, metadata, created_at, {vector} FROM memory_message "
                    "WHERE session_id = %s AND position > %s ORDER BY position LIMIT %s",
                    [session_id, after, page_rows],
                )
                rows = cursor.fetchall()
            if not rows:
                break
            lines = []
            for message_id, position, role, content, metadata, created_at, embedding in rows:
                record = {
                    "type": "message",
                    "id": str(message_id),
                    "session_id": str(session_id),
                    "position": position,
                    "role": role,
                    "content": content,
                    "metadata": _json(metadata),
                    "created_at": _iso(created_at),
                }
                lines.append(_line(record, embedding if embeddings else None) if embedding else _line(record))
            yield "".join(lines).encode()
            after = rows[-1][1]
    after = None
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, content, metadata, created_at, {vector} FROM memory_knowledge "
                "WHERE user_id = %s AND (%s::uuid IS NULL OR id > %s::uuid) ORDER BY id LIMIT %s",
                [user.pk, after, after, page_rows],
            )
            rows = cursor.fetchall()
        if not rows:
            break
        lines = []
        for knowledge_id, content, metadata, created_at, embedding in rows:
            record = {
                "type": "knowledge",
                "id": str(knowledge_id),
                "content": content,
                "metadata": _json(metadata),
                "created_at": _iso(created_at),
            }
            lines.append(_line(record, embedding) if embedding else _line(record))
        yield "".join(lines).encode()
        after = rows[-1][0]
    # The facts layer's (memory.facts.portability), when the user has any.
    facts = [_line(record) for record in fact_records(user_id=user.pk)]
    if facts:
        yield "".join(facts).encode()


def _json(value):
    """A ``jsonb`` column as read by a raw cursor (psycopg decodes it; text on other adapters)."""
    return json.loads(value) if isinstance(value, str) else value
