"""Import of a user's memory from records of the export format (``memory.portability``).

Passes over the source, each holding one line (or one batch of rows) in memory at a time:

1. **Validate, then write the user, agents and sessions**, in one transaction. Every line is
   checked (``records.check_record``) as it is copied into a temporary table, where SQL
   checks the rest (``staging``): duplicates (ids, names, a session's positions), references
   (a session's agent, a message's session, above it), then what the database already holds.
   Past ``MAX_BACKLOG_MESSAGES`` the import is refused (503). Only then are the user, the
   agents and the sessions written, each checked in that transaction to be the tenant's and
   the user's. Any error is ``InvalidInput``, ``Conflict``, ``Forbidden`` or ``TooLarge``
   naming the line and the field, and **nothing is written**.
2. **The messages**, one transaction per run of one session's lines (at most ``RUN_ROWS``),
   inserted ``WRITE_BATCH`` rows at a time: an interrupted import leaves whole sessions.
3. **The knowledge items**, one transaction per batch of ``FLUSH_BATCH_SIZE``, embedded
   before it at background priority, as a flush embeds.

Every insert is ``ON CONFLICT DO NOTHING`` and then checked in its transaction: a record
already there (the same id, as the file has it) counts as existing; one that clashes (its id
another user's, or another message at its position) is a ``Conflict`` and its transaction is
rolled back. Importing a file twice changes nothing, and importing it again after an
interruption adds what is missing (resumable).

A user key's import (``scope``) creates no agent: each agent of the file must be one of the
tenant's (by id, or by name), as the REST API and MCP refuse agent creation to user keys.

``created_at`` and positions are kept. Embeddings of the file are written only when the
header's model and dimension are those of the stored vectors (the active model, read from
the database when the import starts: ``memory.embedding_model``): those messages are stored
as flushed (context embeddings derived as a flush does). Otherwise messages are pending, and
a flush is queued as an add past the size trigger does; knowledge items are embedded during
the import (their add embeds them too). Each write of vectors checks the model in its
transaction (``embedding_guard.guard_write``): when a ``reembed`` switches the model in the
middle of an import, the rest of the file's messages are written pending and its knowledge
items embedded again, by the new model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction

from buffers import backlog
from buffers import services as buffers
from buffers.models import Priority, Reason
from buffers.pending import pending_summary
from memory import embedding_model
from memory.errors import Conflict, Forbidden, NotFound, TooLarge, Unavailable
from memory.facts.portability import facts_import
from memory.indexing import flush
from memory.inference import registry
from memory.models import KeyScope, User
from memory.portability import records, staging
from memory.portability.import_rows import write_knowledge, write_messages
from memory.portability.records import Source, invalid
from memory.portability.staging import TABLE
from memory.retrieval import cache


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
    skipped; a line that is not JSON (or holds ``NaN``/``Infinity``) is ``InvalidInput`` naming
    it, a line over ``IMPORT_MAX_LINE_BYTES`` (its newline aside) ``TooLarge`` (413) naming it:
    a line is read with a bounded ``readline``, so a longer one is never held whole.

    Decoded by the C decoder without the API's per-number hook (``memory.api.limits.loads``):
    a line with an embedding holds hundreds of numbers, and ``records.check_record`` checks
    what the hook would (finite numbers, nesting of the metadata).
    """

    def read() -> Iterator[tuple[int, object]]:
        limit = settings.MEMFUSE["IMPORT_MAX_LINE_BYTES"]
        handle = open(path_or_file, "rb") if not hasattr(path_or_file, "read") else path_or_file  # noqa: SIM115
        try:
            handle.seek(0)
            number = 0
            while raw := handle.readline(limit + 1):
                number += 1
                if len(raw) > limit and not raw.endswith(b"\n"):
                    raise TooLarge(
                        f"Invalid import file: line {number}: longer than {limit} bytes (IMPORT_MAX_LINE_BYTES)",
                        field=f"lines[{number}]",
                    )
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


def memory_import(
    *,
    tenant_id: uuid.UUID,
    source: Source,
    user: User | None = None,
    user_id: uuid.UUID | None = None,
    user_name: str | None = None,
    scope: str = KeyScope.TENANT,
    queue_flush: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import one user's records from ``source`` into tenant ``tenant_id``.

    The target user: ``user`` (an existing user: the file's user record only names what it
    was), else the user ``user_id`` (created with it, and the file's name, when it does not
    exist), else the user named ``user_name`` (created when missing), else the file's user
    id (created when missing). ``scope``: that of the key the import acts for (a command acts
    as the tenant); with ``KeyScope.USER`` every agent of the file must be one of the tenant's.
    ``queue_flush``: queue a flush of the pending messages (off for callers that flush at
    once). ``progress(n)``: called as records are written, with how many.

    Raises, with nothing written: ``InvalidInput`` / ``Conflict`` naming
    ``lines[<n>].<field>``; ``TooLarge`` for a line over ``IMPORT_MAX_LINE_BYTES`` or the
    records past ``IMPORT_MAX_RECORDS``; ``Forbidden`` for an agent a user key would create;
    ``NotFound`` for a user id of another tenant; ``Unavailable`` (503) when the flush backlog
    is at ``MAX_BACKLOG_MESSAGES``. A ``Conflict`` of a record written concurrently by another
    import may come after some sessions' messages were written (run it again to finish).
    """
    # Long for its passes over one file sharing their state; each pass is a function below.
    generation = embedding_model.follow_active_model(force=True)
    report, plan, use_embeddings = _validate_and_write_sessions(
        tenant_id=tenant_id, source=source, user=user, user_id=user_id, user_name=user_name, scope=scope
    )
    target_id = report.user_id
    if progress:
        progress(2 + plan.agents + plan.sessions)  # with the header
    written = 0
    if plan.messages:
        written, use_embeddings = write_messages(
            source, target_id=target_id, use_embeddings=use_embeddings, generation=generation, progress=progress
        )
    report.created["messages"], report.existing["messages"] = written, plan.messages - written
    written = 0
    if plan.knowledge:
        written = write_knowledge(
            source, target_id=target_id, use_embeddings=use_embeddings, generation=generation, progress=progress
        )
    report.created["knowledge"], report.existing["knowledge"] = written, plan.knowledge - written
    if plan.facts:  # the facts layer's records, after the messages they cite
        written = facts_import(records=(values for _, values in records.checked_records(source, ("fact",))), user_id=target_id)
        report.created["facts"], report.existing["facts"] = written, plan.facts - written

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


def _backlog_check(tenant_id) -> Callable[[staging.Staged], None]:
    """What pass 1 calls as it reads (``staging.stage``'s ``progress``): ``Unavailable`` (503)
    as soon as the messages read so far that the import would leave pending (those without
    an embedding of this service's document model) would take the tenant past its backlog
    limit (``backlog.check_accepting``). Validating a large file costs the web process and the
    database seconds: a tenant at (or near) its limit is refused after a few lines, not after
    the whole file. On the figures read before pass 1 (its connection is busy with the
    ``COPY`` meanwhile); the exact check, with the file's count, follows it."""
    model = registry.document_model()
    accepting = backlog.accepting(tenant_id=tenant_id)

    def check(staged: staging.Staged) -> None:
        adding = staged.messages - (staged.embedded_messages if staged.embedding == model else 0)
        if adding:
            try:
                accepting(adding)
            except backlog.BacklogFull as exc:
                raise Unavailable(exc.message, retry_after=exc.retry_after) from None

    return check


def _validate_and_write_sessions(
    *, tenant_id, source: Source, user: User | None, user_id, user_name: str | None, scope: str
) -> tuple[ImportReport, staging.Staged, bool]:
    """Pass 1 (``staging``), then the user, agents and sessions, in one transaction:
    ``(report so far, what the file holds, whether its embeddings are used)``."""
    with transaction.atomic(), connection.cursor() as cursor:
        plan = staging.stage(cursor, source, progress=_backlog_check(tenant_id))
        staging.check_file(cursor)
        target = _target_user(tenant_id=tenant_id, plan=plan, user=user, user_id=user_id, user_name=user_name)
        use_embeddings = plan.embedding is not None and plan.embedding == registry.document_model()
        adding = plan.messages - (plan.embedded_messages if use_embeddings else 0)
        if adding:  # an import that leaves nothing pending adds nothing to the backlog
            try:
                backlog.check_accepting(tenant_id=tenant_id, adding=adding)
            except backlog.BacklogFull as exc:
                raise Unavailable(exc.message, retry_after=exc.retry_after) from None
        if target is None:
            target_id = _create_user(cursor, tenant_id=tenant_id, values=plan.user, user_id=user_id, name=user_name)
        else:
            target_id = target.pk
        report = ImportReport(user_id=target_id)
        report.created["user"], report.existing["user"] = int(target is None), int(target is not None)
        created = _write_agents(cursor, tenant_id=tenant_id, scope=scope)
        report.created["agents"], report.existing["agents"] = created, plan.agents - created
        created = _write_sessions(cursor, target_id=target_id)
        report.created["sessions"], report.existing["sessions"] = created, plan.sessions - created
        staging.check_stored(cursor, target_id=target_id)
        staging.drop(cursor)
    return report, plan, use_embeddings


def _target_user(*, tenant_id, plan: staging.Staged, user: User | None, user_id, user_name: str | None) -> User | None:
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


def _create_user(cursor, *, tenant_id, values: dict, user_id, name: str | None) -> uuid.UUID:
    """Insert the user (``user_id``, else the file's id; ``name``, else the file's); returns its id.

    Checked in the transaction: an id another tenant took meanwhile is ``NotFound``, as
    ``_target_user`` answers; a name the tenant has is ``Conflict``."""
    values = {**values, "id": user_id or values["id"], "name": name or values["name"]}
    cursor.execute(
        "INSERT INTO memory_user (id, tenant_id, name, description, metadata, created_at, updated_at, memory_version) "
        "VALUES (%(id)s, %(tenant)s, %(name)s, %(description)s, %(metadata)s, %(created_at)s, now(), 0) "
        "ON CONFLICT DO NOTHING",
        {**values, "tenant": tenant_id, "metadata": json.dumps(values["metadata"])},
    )
    if cursor.rowcount == 0:
        cursor.execute("SELECT tenant_id FROM memory_user WHERE id = %s", [values["id"]])
        row = cursor.fetchone()
        if row is None:
            raise Conflict(f"User with name '{values['name']}' already exists", field="name")
        if row[0] != tenant_id:
            raise NotFound(f"User '{values['id']}' not found", field="user_id")
    return values["id"]


def _write_agents(cursor, *, tenant_id, scope: str) -> int:
    """Map the file's agents (``staging.TABLE``) to the tenant's and create those missing;
    returns how many were created.

    A file's agent is the tenant's agent of the same id, else the tenant's agent of the same
    name, else a new agent (the file's id, or a fresh one when that id is another tenant's).
    A user key creates none: ``Forbidden`` naming the first such line, worded alike whether
    the id is unknown or another tenant's."""
    cursor.execute(
        f"""
        UPDATE {TABLE} f SET target = coalesce(
            (SELECT g.id FROM memory_agent g WHERE g.id = f.id AND g.tenant_id = %(tenant)s),
            (SELECT g.id FROM memory_agent g WHERE g.tenant_id = %(tenant)s AND g.name = f.name))
        WHERE f.kind = 'a'
        """,
        {"tenant": tenant_id},
    )
    if scope == KeyScope.USER:
        cursor.execute(f"SELECT line, name FROM {TABLE} WHERE kind = 'a' AND target IS NULL ORDER BY line LIMIT 1")
        row = cursor.fetchone()
        if row is not None:
            raise Forbidden(
                f"Invalid import file: line {row[0]}: agent '{row[1]}' does not exist and a user key cannot create "
                "agents: use a tenant key",
                field=f"lines[{row[0]}].name",
            )
        return 0
    cursor.execute(
        f"""
        UPDATE {TABLE} f SET new = true, target = CASE
            WHEN EXISTS (SELECT FROM memory_agent g WHERE g.id = f.id) THEN gen_random_uuid() ELSE f.id END
        WHERE f.kind = 'a' AND f.target IS NULL
        """
    )
    cursor.execute(
        f"""
        INSERT INTO memory_agent (id, tenant_id, name, description, metadata, created_at, updated_at)
        SELECT target, %(tenant)s, name, description, metadata::jsonb, created_at, now() FROM {TABLE}
        WHERE kind = 'a' AND new ORDER BY line
        ON CONFLICT DO NOTHING
        """,
        {"tenant": tenant_id},
    )
    created = cursor.rowcount
    # What another writer took meanwhile (a name, an id) and the insert skipped.
    cursor.execute(
        f"""
        SELECT f.line, f.name FROM {TABLE} f LEFT JOIN memory_agent g ON g.id = f.target AND g.tenant_id = %(tenant)s
        WHERE f.kind = 'a' AND g.id IS NULL ORDER BY f.line LIMIT 1
        """,
        {"tenant": tenant_id},
    )
    row = cursor.fetchone()
    if row is not None:
        raise staging.conflict(row[0], "name", "agent", row[1])
    return created


def _write_sessions(cursor, *, target_id) -> int:
    """Insert the file's sessions (``staging.TABLE``) for user ``target_id``; returns how many
    were new. Each must then be that user's: an id held by anyone else, or a name the user
    gives another session, is a ``Conflict`` naming the first such line."""
    cursor.execute(
        f"""
        INSERT INTO memory_session (id, user_id, agent_id, name, description, metadata, next_position,
                                    created_at, updated_at)
        SELECT s.id, %(user)s, a.target, s.name, '', s.metadata::jsonb, 0, s.created_at, now()
        FROM {TABLE} s JOIN {TABLE} a ON a.kind = 'a' AND a.id = s.ref
        WHERE s.kind = 's' ORDER BY s.line
        ON CONFLICT DO NOTHING
        """,
        {"user": target_id},
    )
    created = cursor.rowcount
    cursor.execute(
        f"""
        SELECT s.line, s.id, s.name, m.id IS NULL FROM {TABLE} s LEFT JOIN memory_session m ON m.id = s.id
        WHERE s.kind = 's' AND (m.id IS NULL OR m.user_id <> %(user)s) ORDER BY s.line LIMIT 1
        """,
        {"user": target_id},
    )
    row = cursor.fetchone()
    if row is not None:
        line, session_id, name, name_taken = row
        if name_taken:
            raise staging.conflict(line, "name", "session", name)
        raise staging.conflict(line, "id", "session", session_id)
    return created


def records_of(lines: Iterable[dict]) -> Source:
    """A ``Source`` over records already decoded (``locomo.locomo_records``), numbered from 1."""
    materialised = list(lines)

    def read() -> Iterator[tuple[int, object]]:
        yield from enumerate(materialised, start=1)

    return read
