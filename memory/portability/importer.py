"""Import of a user's memory from records of the export format (``memory.portability``).

Two passes over the source:

1. **Validate** every line (``records.check_record``), its references (a session's agent, a
   message's session, above it), duplicates (ids, a session's positions), and what the
   database already holds (a session or message id of another user, a session name or a
   position taken by another record). Any error is ``InvalidInput`` or ``Conflict`` naming
   the line and the field, and **nothing is written**.
2. **Write**, in this order and these transactions: the user, agents and sessions (one);
   the messages of each session (one per session: an interrupted import leaves whole
   sessions); the knowledge items (one). Every insert is ``ON CONFLICT (id) DO NOTHING``:
   importing a file twice changes nothing, and importing it again after an interruption
   adds what is missing (resumable).

``created_at`` and positions are kept. Embeddings of the file are written only when the
header's model and dimension are those of the stored vectors (the active model, read from
the database when the import starts: ``memory.embedding_model``): those messages are stored
as flushed (context embeddings derived as a flush does). Otherwise messages are pending, and
a flush is queued as an add past the size trigger does; knowledge items are embedded during
the import (their add embeds them too). Each write of vectors checks the model in its
transaction (``embedding_model.guard_write``): when a ``reembed`` switches the model in the
middle of an import, the rest of the file's messages are written pending and its knowledge
items embedded again, by the new model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from pgvector import Vector

from memory import embedding_model
from memory.errors import Conflict, InvalidInput, NotFound
from memory.inference import registry
from memory.models import User
from memory.portability import records
from memory.portability.records import invalid

# _bump_memory_version: the user row lock every writer of a user's messages takes first.
from memory.services import _bump_memory_version, message_index_text
from memory.vectors import VectorArray, use_binary_vectors

WRITE_BATCH = 1000  # rows per INSERT statement

Source = Callable[[], Iterator[tuple[int, object]]]
"""A re-readable source of records: each call iterates ``(line number, decoded JSON)`` from the start."""


@dataclass
class ImportReport:
    """What an import did: the user, and per type (``user``, ``agents``, ``sessions``,
    ``messages``, ``knowledge``) how many records were written and how many were already there."""

    user_id: uuid.UUID
    created: dict = field(default_factory=dict)
    existing: dict = field(default_factory=dict)
    embeddings_used: bool = False
    pending_messages: int = 0

    def as_dict(self) -> dict:
        return {
            "user_id": str(self.user_id),
            "created": self.created,
            "existing": self.existing,
            "embeddings_used": self.embeddings_used,
            "pending_messages": self.pending_messages,
        }


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def jsonl_source(path_or_file) -> Source:
    """A ``Source`` over a JSON Lines file (a path, or a seekable binary file). Blank lines are
    skipped; a line that is not JSON (or holds ``NaN``/``Infinity``) is ``InvalidInput`` naming it.

    Decoded by the C decoder without the API's per-number hook (``memory.api.limits.loads``):
    a line with an embedding holds hundreds of numbers, and ``records.check_record`` checks
    what the hook would (finite numbers, nesting of the metadata).
    """

    def read() -> Iterator[tuple[int, object]]:
        handle = open(path_or_file, "rb") if not hasattr(path_or_file, "read") else path_or_file  # noqa: SIM115
        try:
            handle.seek(0)
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, json.loads(raw, parse_constant=_reject_constant)
                except RecursionError:
                    raise invalid(number, None, "Nested too deeply") from None
                except ValueError as exc:
                    raise invalid(number, None, f"Not valid JSON: {exc}") from None
        finally:
            if handle is not path_or_file:
                handle.close()

    return read


@dataclass
class _Plan:
    """What pass 1 learned: the header's model, the user, and what the database already holds."""

    embedding: dict | None = None
    user: dict | None = None
    agents: dict = field(default_factory=dict)  # file agent id -> values
    sessions: dict = field(default_factory=dict)  # file session id -> values
    messages: int = 0
    knowledge: int = 0


def memory_import(
    *,
    tenant_id: uuid.UUID,
    source: Source,
    user: User | None = None,
    user_id: uuid.UUID | None = None,
    user_name: str | None = None,
    queue_flush: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import one user's records from ``source`` into tenant ``tenant_id``.

    The target user: ``user`` (an existing user: the file's user record only names what it
    was), else the user ``user_id`` (created with it, and the file's name, when it does not
    exist), else the user named ``user_name`` (created when missing), else the file's user
    id (created when missing). ``queue_flush``: queue a flush of the pending messages (off for
    callers that flush at once). ``progress(n)``: called as records are written, with how many.
    Raises ``InvalidInput`` / ``Conflict`` naming ``lines[<n>].<field>`` (nothing written),
    ``NotFound`` for a user id of another tenant.
    """
    # Long for its two passes over one file (validate everything, then write) sharing their state.
    plan = _validate(source)
    if plan.user is None:
        raise InvalidInput("Invalid import file: no user record", field="lines")
    target = _target_user(tenant_id=tenant_id, plan=plan, user=user, user_id=user_id, user_name=user_name)
    generation = embedding_model.follow_active_model(force=True)
    use_embeddings = plan.embedding is not None and plan.embedding == registry.document_model()
    existing_user = target is not None
    target_id = target.pk if target is not None else (user_id or plan.user["id"])
    agent_ids = _resolve_agents(tenant_id, plan)
    _check_against_database(source, plan, target_id=target_id, existing_user=existing_user)

    report = ImportReport(user_id=target_id)
    with transaction.atomic(), connection.cursor() as cursor:
        if not existing_user:
            values = {**plan.user, "id": target_id, "name": user_name or plan.user["name"]}
            try:
                with transaction.atomic():
                    cursor.execute(
                        "INSERT INTO memory_user (id, tenant_id, name, description, metadata, created_at, updated_at, "
                        "memory_version) VALUES (%(id)s, %(tenant)s, %(name)s, %(description)s, %(metadata)s, "
                        "%(created_at)s, now(), 0)",
                        {**values, "tenant": tenant_id, "metadata": json.dumps(values["metadata"])},
                    )
            except IntegrityError:
                raise Conflict(f"User with name '{values['name']}' already exists", field="name") from None
        report.created["user"], report.existing["user"] = int(not existing_user), int(existing_user)
        created = 0
        for file_id, values in plan.agents.items():
            if not values["_exists"]:
                cursor.execute(
                    "INSERT INTO memory_agent (id, tenant_id, name, description, metadata, created_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT (id) DO NOTHING",
                    [
                        agent_ids[file_id],
                        tenant_id,
                        values["name"],
                        values["description"],
                        json.dumps(values["metadata"]),
                        values["created_at"],
                    ],
                )
                created += cursor.rowcount
        report.created["agents"], report.existing["agents"] = created, len(plan.agents) - created
        created = 0
        for session_id, values in plan.sessions.items():
            cursor.execute(
                "INSERT INTO memory_session (id, user_id, agent_id, name, description, metadata, next_position, "
                "created_at, updated_at) VALUES (%s, %s, %s, %s, '', %s, 0, %s, now()) ON CONFLICT (id) DO NOTHING",
                [
                    session_id,
                    target_id,
                    agent_ids[values["agent_id"]],
                    values["name"],
                    json.dumps(values["metadata"]),
                    values["created_at"],
                ],
            )
            created += cursor.rowcount
        report.created["sessions"], report.existing["sessions"] = created, len(plan.sessions) - created
    if progress:
        progress(2 + len(plan.agents) + len(plan.sessions))  # with the header

    written, use_embeddings = _write_messages(
        source, target_id=target_id, use_embeddings=use_embeddings, generation=generation, progress=progress
    )
    report.created["messages"], report.existing["messages"] = written, plan.messages - written
    written = _write_knowledge(
        source, target_id=target_id, use_embeddings=use_embeddings, generation=generation, progress=progress
    )
    report.created["knowledge"], report.existing["knowledge"] = written, plan.knowledge - written

    from buffers import services as buffers
    from buffers.jobs import pending_summary
    from buffers.models import Priority, Reason
    from memory import flush
    from memory.retrieval import cache

    report.pending_messages = pending_summary(user_id=target_id).messages
    if report.pending_messages and queue_flush:
        with transaction.atomic():
            buffers.request_flush(user_id=target_id, priority=Priority.NORMAL, reason=Reason.SIZE)
    report.embeddings_used = use_embeddings
    if use_embeddings and report.created["messages"]:
        # The HNSW index past ANN_MIN_MESSAGES, the index snapshot and the planner statistics,
        # brought up to date before the answer: the user queries next.
        flush.maintain_indexes(target_id, current=True)
    cache.forget(target_id)
    return report


def _validate(source: Source) -> _Plan:
    """Pass 1 over the file alone (no database): every line, references, duplicates."""
    plan = _Plan()
    seen_ids: set[uuid.UUID] = set()
    positions: set[tuple[uuid.UUID, int]] = set()
    first = True
    for line, record in source():
        if first:
            if not isinstance(record, dict):
                raise invalid(line, None, "Must be a JSON object.")
            plan.embedding = records.check_header(line, record)
            first = False
            continue
        kind, values = records.check_record(line, record, dimension=plan.embedding and plan.embedding["dimension"])
        values["_line"] = line
        if values["id"] in seen_ids:
            raise invalid(line, "id", f"Duplicate id {values['id']} in the file.")
        if kind != "message":  # messages are many: their ids are checked with their positions
            seen_ids.add(values["id"])
        if kind == "user":
            if plan.user is not None:
                raise invalid(line, "type", "A file holds one user.")
            plan.user = values
            continue
        if plan.user is None:
            raise invalid(line, "type", "The user record must come before the others.")
        if kind == "agent":
            plan.agents[values["id"]] = values
        elif kind == "session":
            if values["agent_id"] not in plan.agents:
                raise invalid(line, "agent_id", f"No agent {values['agent_id']} above this line.")
            if any(s["name"] == values["name"] for s in plan.sessions.values()):
                raise invalid(line, "name", f"Duplicate session name {values['name']!r} in the file.")
            plan.sessions[values["id"]] = values
        elif kind == "message":
            if values["session_id"] not in plan.sessions:
                raise invalid(line, "session_id", f"No session {values['session_id']} above this line.")
            key = (values["session_id"], values["position"])
            if key in positions:
                raise invalid(
                    line, "position", f"Duplicate position {values['position']} in session {values['session_id']}."
                )
            positions.add(key)
            seen_ids.add(values["id"])
            plan.messages += 1
        else:
            plan.knowledge += 1
    if first:
        raise InvalidInput("Invalid import file: it is empty (no header line)", field="lines")
    return plan


def _target_user(*, tenant_id, plan: _Plan, user: User | None, user_id, user_name: str | None) -> User | None:
    """The existing user to import into, or ``None`` when one is to be created."""
    if user is not None:
        return user
    if user_id is not None or user_name is None:
        wanted = user_id or plan.user["id"]
        found = User.objects.filter(pk=wanted).first()
        if found is not None and found.tenant_id != tenant_id:
            raise NotFound(f"User '{wanted}' not found", field="user_id")
        return found
    return User.objects.filter(tenant_id=tenant_id, name=user_name).first()


def _resolve_agents(tenant_id, plan: _Plan) -> dict:
    """File agent id -> the tenant's agent id: the same id if it is the tenant's, else the
    tenant's agent of the same name, else a new agent (the file's id, or a fresh one when that
    id is another tenant's). Marks ``values["_exists"]`` on agents already there."""
    from memory.models import Agent

    by_id = dict(Agent.objects.filter(pk__in=list(plan.agents)).values_list("pk", "tenant_id"))
    names = [values["name"] for values in plan.agents.values()]
    by_name = dict(Agent.objects.filter(tenant_id=tenant_id, name__in=names).values_list("name", "pk"))
    resolved = {}
    for file_id, values in plan.agents.items():
        values["_exists"] = True
        if by_id.get(file_id) == tenant_id:
            resolved[file_id] = file_id
        elif values["name"] in by_name:
            resolved[file_id] = by_name[values["name"]]
        else:
            resolved[file_id] = file_id if file_id not in by_id else uuid.uuid4()
            values["_exists"] = False
    return resolved


def _check_against_database(source: Source, plan: _Plan, *, target_id, existing_user: bool) -> None:
    """Pass 1, second half: what the database holds must agree with the file (else ``Conflict``)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, user_id FROM memory_session WHERE id = ANY(%s)", [list(plan.sessions)])
        for session_id, owner in cursor.fetchall():
            values = plan.sessions[session_id]
            if owner != target_id:
                raise Conflict(f"Session {session_id} belongs to another user", field=f"lines[{values['_line']}].id")
        if existing_user:
            cursor.execute("SELECT name, id FROM memory_session WHERE user_id = %s", [target_id])
            names = dict(cursor.fetchall())
            for session_id, values in plan.sessions.items():
                if names.get(values["name"], session_id) != session_id:
                    raise Conflict(
                        f"The user already has a session named {values['name']!r}",
                        field=f"lines[{values['_line']}].name",
                    )
    batch: list[dict] = []
    for kind, values in _records(source, ("message", "knowledge"), plan):
        batch.append((kind, values))
        if len(batch) >= WRITE_BATCH:
            _check_batch(batch, target_id)
            batch = []
    _check_batch(batch, target_id)


def _check_batch(batch: list, target_id) -> None:
    messages = [v for kind, v in batch if kind == "message"]
    knowledge = [v for kind, v in batch if kind == "knowledge"]
    with connection.cursor() as cursor:
        if messages:
            # Two joins, each on its own unique index (an OR join would scan).
            cursor.execute(
                "WITH f AS (SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::int[], %s::int[]) AS f(id, session_id, position, line)) "
                "SELECT m.id, m.user_id, m.session_id, m.position, f.line FROM f JOIN memory_message m ON m.id = f.id "
                "UNION SELECT m.id, m.user_id, m.session_id, m.position, f.line FROM f JOIN memory_message m "
                "ON m.session_id = f.session_id AND m.position = f.position",
                [
                    [v["id"] for v in messages],
                    [v["session_id"] for v in messages],
                    [v["position"] for v in messages],
                    [v["_line"] for v in messages],
                ],
            )
            by_line = {v["_line"]: v for v in messages}
            for message_id, owner, session_id, position, line in cursor.fetchall():
                values = by_line[line]
                if message_id == values["id"] and (owner, session_id, position) != (
                    target_id,
                    values["session_id"],
                    values["position"],
                ):
                    raise Conflict(
                        f"Message {message_id} exists elsewhere (another user, session or position)",
                        field=f"lines[{line}].id",
                    )
                if message_id != values["id"]:
                    raise Conflict(
                        f"Position {position} of session {session_id} holds another message ({message_id})",
                        field=f"lines[{line}].position",
                    )
        if knowledge:
            cursor.execute(
                "SELECT id, user_id FROM memory_knowledge WHERE id = ANY(%s) AND user_id <> %s",
                [[v["id"] for v in knowledge], target_id],
            )
            row = cursor.fetchone()
            if row is not None:
                line = next(v["_line"] for v in knowledge if v["id"] == row[0])
                raise Conflict(f"Knowledge item {row[0]} belongs to another user", field=f"lines[{line}].id")


def _records(source: Source, kinds: tuple[str, ...], plan: _Plan | None = None) -> Iterator[tuple[str, dict]]:
    """Pass 2: the records of ``kinds``, checked again (they were in pass 1: the same file)."""
    dimension = None
    first = True
    for line, record in source():
        if first:
            embedding = records.check_header(line, record)
            dimension = embedding and embedding["dimension"]
            first = False
            continue
        if not isinstance(record, dict) or record.get("type") not in kinds:
            continue
        kind, values = records.check_record(line, record, dimension=dimension)
        values["_line"] = line
        yield kind, values


def _write_messages(
    source: Source, *, target_id, use_embeddings: bool, generation: int | None, progress
) -> tuple[int, bool]:
    """The messages, a transaction per run of one session's lines. Returns how many were new
    and whether the file's embeddings were still used at the end (not after a model switch)."""
    written = 0
    run: list[dict] = []

    def write() -> None:
        nonlocal written, use_embeddings
        try:
            written += _insert_messages(run, target_id=target_id, use_embeddings=use_embeddings, generation=generation)
        except embedding_model.ModelChanged:  # the run was rolled back: pending, like the rest
            use_embeddings = False
            written += _insert_messages(run, target_id=target_id, use_embeddings=False, generation=generation)
        if progress:
            progress(len(run))

    for _, values in _records(source, ("message",)):
        if run and (values["session_id"] != run[0]["session_id"] or len(run) >= WRITE_BATCH * 10):
            write()
            run = []
        run.append(values)
    if run:
        write()
    return written, use_embeddings


def _insert_messages(run: list[dict], *, target_id, use_embeddings: bool, generation: int | None) -> int:
    """One transaction; raises ``embedding_model.ModelChanged`` (nothing written) when it
    would write vectors and the active model is no longer ``generation``."""
    from memory.retrieval.vector import context_refresh

    now = timezone.now()
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        if use_embeddings:
            embedding_model.guard_write(cursor, generation=generation)
        bucket = _bump_memory_version(target_id)
        use_binary_vectors(cursor)
        for start in range(0, len(run), WRITE_BATCH):
            rows = run[start : start + WRITE_BATCH]
            vectors = VectorArray(_vector(v) if use_embeddings else None for v in rows)
            cursor.execute(
                """
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
                ON CONFLICT (id) DO NOTHING
                RETURNING session_id, position, embedding IS NOT NULL
                """,
                {
                    "user": target_id,
                    "now": now,
                    "ids": [v["id"] for v in rows],
                    "sessions": [v["session_id"] for v in rows],
                    "positions": [v["position"] for v in rows],
                    "roles": [v["role"] for v in rows],
                    "contents": [v["content"] for v in rows],
                    "metadata": [json.dumps(v["metadata"]) for v in rows],
                    "index_texts": [message_index_text(content=v["content"], metadata=v["metadata"]) for v in rows],
                    "vectors": vectors,
                    "created": [v["created_at"] for v in rows],
                },
            )
            inserted = cursor.fetchall()
            written += len(inserted)
            context_refresh(cursor, seeds=[(s, p) for s, p, has in inserted if has], bucket=bucket)
        # An add continues after the highest position (memory.services.messages_add).
        cursor.execute(
            "UPDATE memory_session SET next_position = GREATEST(next_position, %s) WHERE id = %s",
            [max(v["position"] for v in run) + 1, run[0]["session_id"]],
        )
    return written


def _vector(values: dict) -> Vector | None:
    """A record's embedding as a query parameter (``None``: the record has none)."""
    return None if values["embedding"] is None else Vector(values["embedding"])


def _write_knowledge(source: Source, *, target_id, use_embeddings: bool, generation: int | None, progress) -> int:
    items = [values for _, values in _records(source, ("knowledge",))]  # a user's facts: few
    if not items:
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM memory_knowledge WHERE id = ANY(%s)", [[v["id"] for v in items]])
        present = {row[0] for row in cursor.fetchall()}
    items = [v for v in items if v["id"] not in present]
    while True:  # again, all embedded by the new model, when a reembed switched it meanwhile
        try:
            written = _insert_knowledge(items, target_id=target_id, use_embeddings=use_embeddings, generation=generation)
            break
        except embedding_model.ModelChanged:
            use_embeddings = False
            generation = embedding_model.follow_active_model(force=True)
    if progress:
        progress(len(items))
    return written


def _insert_knowledge(items: list[dict], *, target_id, use_embeddings: bool, generation: int | None) -> int:
    missing = [v for v in items if not (use_embeddings and v["embedding"] is not None)]
    if missing:  # embedded before the transaction, as knowledge_add does
        for values, vector in zip(missing, registry.embed_documents([v["content"] for v in missing])):
            values["embedding"] = vector
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        embedding_model.guard_write(cursor, generation=generation)
        _bump_memory_version(target_id)
        use_binary_vectors(cursor)
        for values in items:
            cursor.execute(
                "INSERT INTO memory_knowledge (id, user_id, content, metadata, embedding, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s::vector, %s, now()) ON CONFLICT (id) DO NOTHING",
                [
                    values["id"],
                    target_id,
                    values["content"],
                    json.dumps(values["metadata"]),
                    _vector(values),
                    values["created_at"],
                ],
            )
            written += cursor.rowcount
    return written


def records_of(lines: Iterable[dict]) -> Source:
    """A ``Source`` over records already decoded (``locomo.locomo_records``), numbered from 1."""
    materialised = list(lines)

    def read() -> Iterator[tuple[int, object]]:
        yield from enumerate(materialised, start=1)

    return read
