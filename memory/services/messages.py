"""Messages: add (write-behind, one statement), update and delete."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from pgvector import Vector

from buffers import backlog, events
from buffers import jobs as buffers_jobs
from buffers.models import Priority
from buffers.pending import pending_sql
from memory import metrics
from memory.errors import NotFound, Unavailable
from memory.indexing.context import context_refresh
from memory.inference import registry
from memory.models import Message, Session
from memory.pgvector_binary import VectorArray, use_binary_vectors
from memory.selectors import messages_by_ids
from memory.services.common import _delete_messages, memory_version_bump
from memory.services.sessions import session_get_or_create
from memory.services.users import user_get_or_create
from memory.tenancy import Principal


@dataclass(frozen=True)
class MessageIn:
    """One message to store. ``metadata`` may carry ``speaker`` and ``image_caption``."""

    role: str
    content: str
    metadata: dict = field(default_factory=dict)
    created_at: datetime | None = None


def message_index_text(*, content: str, metadata: dict) -> str:
    """The text that is embedded and full-text indexed for a message.

    What was said: ``"speaker: content"`` (the speaker's display name from
    ``metadata["speaker"]``, when given) plus ``metadata["image_caption"]``, the caption of an
    image shared with the message, which is part of what was said.
    """
    speaker = metadata.get("speaker")
    text = f"{speaker}: {content}" if isinstance(speaker, str) and speaker else content
    caption = metadata.get("image_caption")
    if isinstance(caption, str) and caption:
        text = f"{text} [image: {caption}]"
    return text


class AddedMessages(list):
    """The stored messages, in input order, with ``pending``: the user's messages awaiting a flush,
    and ``oldest_pending_age_s``: how long (s) the oldest of them has waited (0 when none did)."""

    def __init__(self, rows: list[Message], *, pending: int, oldest_pending_age_s: float = 0.0) -> None:
        super().__init__(rows)
        self.pending = pending
        self.oldest_pending_age_s = oldest_pending_age_s


_ADD_SQL = f"""
WITH bumped AS (
    -- First, as in every writer of a user's messages: the user row lock orders this add
    -- against edits and a cascade delete (see memory_version_bump). It is the FOR NO KEY
    -- UPDATE lock of a plain UPDATE: a flush's write (FOR KEY SHARE) does not block it.
    UPDATE memory_user SET memory_version = memory_version + 1 WHERE id = %(user)s RETURNING id
), slot AS (
    -- The session row lock serialises adds to one session; the counter gives their positions.
    UPDATE memory_session SET next_position = next_position + %(count)s
    WHERE id = %(session)s AND EXISTS (SELECT FROM bumped)
    RETURNING next_position - %(count)s AS start
), added AS (
    -- The arrays are bound in binary format (the b placeholders): in the text format psycopg
    -- quotes and escapes every element in Python, and this statement runs on every add.
    INSERT INTO memory_message (id, session_id, user_id, position, role, content, metadata, index_text,
                                flush_count, created_at, updated_at)
    SELECT m.id, %(session)s, %(user)s, slot.start + m.ord - 1, m.role, m.content, m.metadata,
           m.index_text, 0, m.created_at, %(now)s
    FROM slot, unnest(%(ids)b::uuid[], %(roles)b::text[], %(contents)b::text[], %(metadata)b::jsonb[],
                      %(index_texts)b::text[], %(created)b::timestamptz[]) WITH ORDINALITY
               AS m(id, role, content, metadata, index_text, created_at, ord)
    RETURNING position, length(index_text) AS chars
), pending AS (
    -- The user's pending messages as before this add (one snapshot) plus the added ones;
    -- oldest_age is the backpressure figure for the client.
    {pending_sql(plus="added")}
), job AS (
    -- The size trigger, in the same statement so the add commits once. An existing job of
    -- the same or a higher priority is left alone (nothing written).
    {buffers_jobs.size_trigger_sql(condition="EXISTS (SELECT FROM added)")}
)
SELECT (SELECT min(position) FROM added), messages, EXISTS (SELECT FROM job), oldest_age FROM pending
"""


def messages_add(*, session: Session, messages: list[MessageIn]) -> AddedMessages:
    """Store ``messages`` at the end of ``session``; returns them in input order (``AddedMessages``).

    Write-behind: the rows are written (and full-text indexed) by ONE statement, which takes
    the user row's lock, then the session row's (its ``next_position`` counter gives the
    positions), inserts the rows, reads the user's pending summary and, past the size
    trigger, queues a flush job (``buffers.jobs``' fragments); they are durable when this
    returns. Embedding is left to that flush (``memory.indexing.flush``, run by ``buffers``' workers).
    One statement is all or nothing, one exchange with the database and one commit (one WAL
    flush): the add is the hottest write of the service. Raises ``NotFound`` (field
    ``session_id``) when the session was deleted meanwhile, ``Unavailable`` (503) when the
    flush backlog of the session's tenant would pass ``MAX_BACKLOG_MESSAGES`` (or the
    tenant holds its share of a backlog past ``MAX_BACKLOG_MESSAGES_TOTAL``: ``buffers.backlog``);
    then nothing is stored.
    """
    if not messages:
        return AddedMessages([], pending=0)
    try:
        backlog.check_accepting(tenant_id=_tenant_of(session), adding=len(messages))
    except backlog.BacklogFull as exc:
        raise Unavailable(exc.message, retry_after=exc.retry_after) from None
    now = timezone.now()
    rows = [
        Message(
            id=uuid.uuid4(),
            session=session,
            user_id=session.user_id,
            role=m.role,
            content=m.content,
            metadata=m.metadata,
            index_text=message_index_text(content=m.content, metadata=m.metadata),
            created_at=m.created_at or now,
            updated_at=now,
        )
        for m in messages
    ]
    _start_embeddings(rows)
    with connection.cursor() as cursor:
        cursor.execute(
            _ADD_SQL,
            {
                "user": session.user_id,
                "session": session.pk,
                "count": len(rows),
                "now": now,
                "ids": [row.id for row in rows],
                "roles": [row.role for row in rows],
                "contents": [row.content for row in rows],
                "metadata": [json.dumps(row.metadata) for row in rows],
                "index_texts": [row.index_text for row in rows],
                "created": [row.created_at for row in rows],
                **buffers_jobs.size_trigger_params(),
            },
        )
        start, count, job_queued, oldest_age = cursor.fetchone()
    if start is None:
        raise NotFound(f"Session '{session.pk}' not found", field="session_id")
    for offset, row in enumerate(rows):
        row.position = start + offset
        row._state.adding, row._state.db = False, connection.alias
    if job_queued:
        transaction.on_commit(lambda: events.notify_flush(user_id=session.user_id, priority=Priority.NORMAL))
    transaction.on_commit(lambda: metrics.MESSAGES_ADDED.inc(len(rows)))
    return AddedMessages(rows, pending=count, oldest_pending_age_s=round(float(oldest_age), 3))


def messages_add_to_named_session(
    *, principal: Principal, user: uuid.UUID | str | None, agent_name: str, session_name: str, messages: list[MessageIn]
) -> tuple[Session, AddedMessages]:
    """Store ``messages`` at the end of the session called ``session_name`` of the user
    ``principal`` names by ``user`` (an id, a name, or ``None`` for a user key's own user).

    The user (``user_get_or_create``), the session and its agent called ``agent_name``
    (``session_get_or_create``) are created on first use, in the add's transaction: with the
    add, or not at all. Returns the session and ``messages_add``'s rows. Raises what those
    raise: ``InvalidInput`` or ``NotFound`` (field ``user``), ``Forbidden`` (field ``agent``),
    and ``messages_add``'s refusals.
    """
    with transaction.atomic():
        owner = user_get_or_create(principal=principal, user=user)
        session = session_get_or_create(principal=principal, user=owner, name=session_name, agent_name=agent_name)
        return session, messages_add(session=session, messages=messages)


def _tenant_of(session: Session) -> uuid.UUID:
    """The tenant of ``session``'s user, from what its lookup loaded (``selectors.session_ref``
    and ``session_get`` load the user with it, ``session_create`` was given it); one query
    otherwise."""
    return session.user.tenant_id


def _newest_to_embed(rows: list[Message]) -> list[Message]:
    """The rows of an add that a query right after it embeds (read your writes): the newest
    ``PENDING_EMBED_MAX``, when the vector retriever, the read-ahead (``READ_AHEAD_MAX``) and
    the query model's recent calls that hold its results (``RECENT_EMBEDDINGS``) are on."""
    config = settings.MEMFUSE
    bound = config["PENDING_EMBED_MAX"]
    if bound <= 0 or config["VECTOR_WEIGHT"] <= 0 or config["READ_AHEAD_MAX"] <= 0:
        return []
    if config["RECENT_EMBEDDINGS"] <= 0 or config["RECENT_EMBEDDINGS_PER_USER"] <= 0:
        return []
    return rows[-bound:]


def _start_embeddings(rows: list[Message]) -> None:
    """Start the query model on the newest of ``rows`` while they are written: the query that
    follows an add finds them embedded, or nearly, among the model's recent calls of the user
    (``RecentEmbeddings``, shared by text), and so does their flush. Behind every query,
    bounded per user and tenant (``registry.read_ahead``: past the bound the oldest are
    cancelled); wasted only if the add fails."""
    newest = _newest_to_embed(rows)
    if newest:
        tenant_id = _tenant_of(newest[0].session)
        for row in newest:
            registry.read_ahead(row.index_text, user_id=row.user_id, tenant_id=tenant_id)


def messages_update(*, session: Session, message_ids: list[uuid.UUID], new_messages: list[MessageIn]) -> list[Message]:
    """Replace role, content and metadata of the given messages; they are pending again.

    ``message_ids[i]`` gets ``new_messages[i]``. The old embedding is dropped with the old text
    and the claim of any flush under way is cleared, so that flush cannot write a stale
    embedding. Raises ``NotFound`` (field ``message_ids``) when any id is not a message of
    ``session``; then nothing is changed.
    """
    with transaction.atomic():
        bucket = memory_version_bump(session.user_id)
        rows = messages_by_ids(session=session, message_ids=message_ids, for_update=True)
        now = timezone.now()  # bulk_update does not apply auto_now
        for row, new in zip(rows, new_messages):
            row.role, row.content, row.metadata = new.role, new.content, new.metadata
            row.index_text = message_index_text(content=new.content, metadata=new.metadata)
            row.embedding = row.context_embedding = row.flushed_at = row.flush_claim = row.claimed_until = None
            row.ann_bucket = None
            row.updated_at = now
        Message.objects.bulk_update(
            rows,
            ["role", "content", "metadata", "index_text", "embedding", "context_embedding", "ann_bucket", "flushed_at",
             "flush_claim", "claimed_until", "updated_at"],
        )
        with connection.cursor() as cursor:
            # A new change number: cached indexes replace the old text (memory.retrieval.store).
            cursor.execute("UPDATE memory_message SET seq = nextval('memory_change_seq') WHERE id = ANY(%s)", [message_ids])
            # The neighbours' context embeddings lose the old text's embedding.
            context_refresh(cursor, seeds=[(row.session_id, row.position) for row in rows], bucket=bucket)
        buffers_jobs.note_pending(user_id=session.user_id)
    return rows


def messages_delete(*, session: Session, message_ids: list[uuid.UUID]) -> None:
    """Delete the given messages. Raises ``NotFound`` when any id is not in ``session``."""
    with transaction.atomic():
        bucket = memory_version_bump(session.user_id)
        messages_by_ids(session=session, message_ids=message_ids, for_update=True)
        seeds = _delete_messages("session_id = %s AND id = ANY(%s)", [session.pk, list(message_ids)])
        with connection.cursor() as cursor:
            context_refresh(cursor, seeds=seeds, bucket=bucket)  # the neighbours' windows move on


_INSERT_BULK_SQL = """
INSERT INTO memory_message (id, session_id, user_id, position, role, content, metadata, index_text,
                            embedding, flushed_at, flush_count, created_at, updated_at)
SELECT m.id, m.session_id, %(user)s, m.position, m.role, m.content, m.metadata, m.index_text,
       m.embedding, CASE WHEN m.embedding IS NULL THEN NULL ELSE %(now)s::timestamptz END,
       CASE WHEN m.embedding IS NULL THEN 0 ELSE 1 END, m.created_at, %(now)s
FROM unnest(%(ids)s::uuid[], %(sessions)s::uuid[], %(positions)s::int[], %(roles)s::text[],
            %(contents)s::text[], %(metadata)s::jsonb[], %(index_texts)s::text[], %(vectors)s::vector[],
            %(created)s::timestamptz[])
     AS m(id, session_id, position, role, content, metadata, index_text, embedding, created_at)
ORDER BY m.position
ON CONFLICT DO NOTHING
RETURNING id, session_id, position, embedding IS NOT NULL
"""


def messages_insert_bulk(
    cursor, *, user_id: uuid.UUID, rows: list[dict], embeddings: list[Vector | None], bucket: int | None
) -> list[tuple[uuid.UUID, uuid.UUID, int, bool]]:
    """Insert messages as they are given, ids, positions and ``created_at`` kept, in one
    statement: the bulk path of an import (``memory.portability``). Returns the rows inserted,
    ``[(id, session_id, position, embedded)]``; a row whose id or position is taken is left
    out (``ON CONFLICT DO NOTHING``: the caller tells an existing row from a clash).

    ``rows``: dicts with ``id``, ``session_id``, ``position``, ``role``, ``content``,
    ``metadata`` (a dict), ``metadata_json`` (its JSON) and ``created_at``; ``embeddings[i]``:
    row ``i``'s document embedding, or ``None`` (the row is pending; with one it is stored as
    flushed and the context embeddings around it are derived as a flush does). The caller's
    transaction holds the user's lock (``memory_version_bump``, whose ``ann_bucket`` is
    ``bucket``) and, with embeddings, the write guard (``embedding_guard.guard_write``).
    ``next_position`` of the sessions is the caller's to move past the rows.
    """
    now = timezone.now()
    use_binary_vectors(cursor)
    cursor.execute(
        _INSERT_BULK_SQL,
        {
            "user": user_id,
            "now": now,
            "ids": [v["id"] for v in rows],
            "sessions": [v["session_id"] for v in rows],
            "positions": [v["position"] for v in rows],
            "roles": [v["role"] for v in rows],
            "contents": [v["content"] for v in rows],
            "metadata": [v["metadata_json"] for v in rows],
            "index_texts": [message_index_text(content=v["content"], metadata=v["metadata"]) for v in rows],
            "vectors": VectorArray(embeddings),
            "created": [v["created_at"] for v in rows],
        },
    )
    inserted = cursor.fetchall()
    context_refresh(cursor, seeds=[(s, p) for _, s, p, embedded in inserted if embedded], bucket=bucket)
    return inserted
