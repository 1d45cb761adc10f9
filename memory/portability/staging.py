"""Pass 1 of an import (``importer``): the file's records into a temporary table, checked there.

Each line is checked alone as it is read (``records.check_record``). What relates records to
each other (unique ids, one name per agent and per session, one message per position of a
session, a session's agent and a message's session above it) and to what is stored is
checked by SQL over ``TABLE``, filled by ``COPY`` as the lines are read. So validating a file
holds one line at a time in memory, whatever its number of records (PostgreSQL sorts and
hashes within ``work_mem``, spilling to disk), in near-linear time: sorts and hash joins,
never a comparison of every pair.

The table lives only in the transaction that validates the file and writes its user, agents
and sessions (``ON COMMIT DROP``, and dropped at its end): a pooled connection (or a
transaction-pooling PgBouncer) never keeps it, and a failed import rolls it back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from memory.errors import Conflict, InvalidInput, TooLarge
from memory.portability import records
from memory.portability.records import invalid

TABLE = "pg_temp.memfuse_import"
PROGRESS_RECORDS = 256  # records between two calls of stage()'s progress

# One row per record: ``kind`` u(ser), a(gent), s(ession), m(essage), k(nowledge); ``ref`` a
# session's agent or a message's session; ``name`` .. ``created_at`` only for agents and
# sessions, which the import writes from this table; ``target`` the tenant's agent a file's
# agent maps to, ``new`` whether the import creates it (``importer._write_agents``).
_CREATE = f"""
CREATE TEMPORARY TABLE {TABLE.removeprefix("pg_temp.")} (
    line integer NOT NULL, kind "char" NOT NULL, id uuid NOT NULL, ref uuid, position integer,
    name text, description text, metadata text, created_at timestamptz, target uuid, new boolean
) ON COMMIT DROP
"""
_COLUMNS = "line, kind, id, ref, position, name, description, metadata, created_at"
_KINDS = {"user": "u", "agent": "a", "session": "s", "message": "m", "knowledge": "k"}


@dataclass
class Staged:
    """What pass 1 learned besides the table: the header's ``embedding`` (``{"model",
    "dimension"}`` or ``None``), the user record's values, and how many records of each kind
    (``embedded_messages``: messages that carry an embedding)."""

    embedding: dict | None = None
    user: dict | None = None
    agents: int = 0
    sessions: int = 0
    messages: int = 0
    embedded_messages: int = 0
    knowledge: int = 0
    facts: int = 0


def stage(cursor, source, *, progress: Callable[[Staged], None] | None = None) -> Staged:
    """Read every record of ``source`` (``records.Source``) into ``TABLE``, created here in the
    caller's transaction, checking each line alone and the order the format asks (header
    first, then one user before the rest). Raises ``InvalidInput`` naming the line and field,
    ``TooLarge`` (413) at the line past ``IMPORT_MAX_RECORDS``. ``progress(staged)``, with the
    counts so far, is called at the file's first message and every ``PROGRESS_RECORDS``
    records after it; what it raises stops the reading."""
    cursor.execute(_CREATE)
    staged = Staged()
    cap = settings.MEMFUSE["IMPORT_MAX_RECORDS"]
    count = 0
    with cursor.copy(f"COPY {TABLE} ({_COLUMNS}) FROM STDIN") as copy:
        for line, record in source():
            count += 1
            if count > cap:
                raise TooLarge(
                    f"Invalid import file: line {line}: more than {cap} records (IMPORT_MAX_RECORDS)",
                    field=f"lines[{line}]",
                )
            if count == 1:
                if not isinstance(record, dict):
                    raise invalid(line, None, "Must be a JSON object.")
                staged.embedding = records.check_header(line, record)
                continue
            kind, values = records.check_record(
                line, record, dimension=staged.embedding and staged.embedding["dimension"]
            )
            if kind == "user":
                if staged.user is not None:
                    raise invalid(line, "type", "A file holds one user.")
                staged.user = values
            elif staged.user is None:
                raise invalid(line, "type", "The user record must come before the others.")
            if kind == "fact":  # written after the messages it cites (importer), no staged row
                staged.facts += 1
                continue
            copy.write_row(_row(line, kind, values))
            if kind == "agent":
                staged.agents += 1
            elif kind == "session":
                staged.sessions += 1
            elif kind == "message":
                staged.messages += 1
                staged.embedded_messages += values["embedding"] is not None
                if progress is not None and staged.messages == 1:
                    progress(staged)
            elif kind == "knowledge":
                staged.knowledge += 1
            if progress is not None and staged.messages and count % PROGRESS_RECORDS == 0:
                progress(staged)
    if count == 0:
        raise InvalidInput("Invalid import file: it is empty (no header line)", field="lines")
    if staged.user is None:
        raise InvalidInput("Invalid import file: no user record", field="lines")
    cursor.execute(f"ANALYZE {TABLE}")  # the planner's row counts for the checks' joins
    return staged


def _row(line: int, kind: str, values: dict) -> tuple:
    if kind in ("agent", "session"):
        return (
            line,
            _KINDS[kind],
            values["id"],
            values.get("agent_id"),
            None,
            values["name"],
            values.get("description", ""),
            json.dumps(values["metadata"]),
            values["created_at"],
        )
    if kind == "message":
        return (line, "m", values["id"], values["session_id"], values["position"], None, None, None, None)
    return (line, _KINDS[kind], values["id"], None, None, None, None, None, None)


# (field, message, query): each query gives the first line at fault and the value named.
_FILE_CHECKS = (
    (
        "id",
        "Duplicate id {} in the file.",
        f"SELECT line, id::text FROM (SELECT line, id, row_number() OVER (PARTITION BY id ORDER BY line) AS nth "
        f"FROM {TABLE}) ranked WHERE nth = 2 ORDER BY line LIMIT 1",
    ),
    (
        "name",
        "Duplicate {} in the file.",
        f"SELECT line, CASE kind WHEN 'a' THEN 'agent' ELSE 'session' END || ' name ' || quote_literal(name) FROM "
        f"(SELECT line, kind, name, row_number() OVER (PARTITION BY kind, name ORDER BY line) AS nth "
        f"FROM {TABLE} WHERE kind IN ('a', 's')) ranked WHERE nth = 2 ORDER BY line LIMIT 1",
    ),
    (
        "position",
        "Duplicate position {} in its session.",
        f"SELECT line, position FROM (SELECT line, position, "
        f"row_number() OVER (PARTITION BY ref, position ORDER BY line) AS nth FROM {TABLE} WHERE kind = 'm') ranked "
        f"WHERE nth = 2 ORDER BY line LIMIT 1",
    ),
    (
        "agent_id",
        "No agent {} above this line.",
        f"SELECT s.line, s.ref::text FROM {TABLE} s WHERE s.kind = 's' AND NOT EXISTS "
        f"(SELECT FROM {TABLE} a WHERE a.kind = 'a' AND a.id = s.ref AND a.line < s.line) ORDER BY s.line LIMIT 1",
    ),
    (
        "session_id",
        "No session {} above this line.",
        f"SELECT m.line, m.ref::text FROM {TABLE} m WHERE m.kind = 'm' AND NOT EXISTS "
        f"(SELECT FROM {TABLE} s WHERE s.kind = 's' AND s.id = m.ref AND s.line < m.line) ORDER BY m.line LIMIT 1",
    ),
)


def check_file(cursor) -> None:
    """The records against each other; raises ``InvalidInput`` naming the first line at fault."""
    faults = []
    for field, message, query in _FILE_CHECKS:
        cursor.execute(query)
        row = cursor.fetchone()
        if row is not None:
            faults.append((row[0], field, message.format(row[1])))
    if faults:
        line, field, message = min(faults)
        raise invalid(line, field, message)


def check_stored(cursor, *, target_id: uuid.UUID) -> None:
    """The file's messages and knowledge items against what is stored, for user ``target_id``
    (whose sessions of the file are written): a message id stored with another user, session
    or position, a position of a session held by another message, a knowledge item id of
    another user. Raises ``Conflict`` naming the first line at fault, worded alike whoever
    holds the id (``conflict``)."""
    # Each join on its own unique index (an OR of the two would scan).
    cursor.execute(
        f"""
        SELECT f.line, 'id', 'message', f.id, NULL::integer FROM {TABLE} f JOIN memory_message m ON m.id = f.id
        WHERE f.kind = 'm' AND (m.user_id, m.session_id, m.position) IS DISTINCT FROM (%(user)s, f.ref, f.position)
        UNION ALL
        SELECT f.line, 'position', 'message', f.ref, f.position FROM {TABLE} f
        JOIN memory_message m ON m.session_id = f.ref AND m.position = f.position
        WHERE f.kind = 'm' AND m.id <> f.id
        UNION ALL
        SELECT f.line, 'id', 'knowledge', f.id, NULL FROM {TABLE} f JOIN memory_knowledge k ON k.id = f.id
        WHERE f.kind = 'k' AND k.user_id <> %(user)s
        ORDER BY 1 LIMIT 1
        """,
        {"user": target_id},
    )
    row = cursor.fetchone()
    if row is not None:
        line, field, kind, value, position = row
        raise conflict(line, field, kind, value, position)


def conflict(line: int, field: str, kind: str, value, position: int | None = None) -> Conflict:
    """The ``Conflict`` of a record that cannot be written as the file has it, naming
    ``lines[<line>].<field>``: an id already taken (worded as the API's "already exists",
    whichever user, session or tenant holds it: the answer tells no more than that the id is
    taken), or a position of the user's session that holds another message."""
    what = {"agent": "Agent", "session": "Session", "message": "Message", "knowledge": "Knowledge item"}[kind]
    if field == "position":
        text = f"Position {position} of session {value} holds another message"
    else:
        text = f"{what} with {field} '{value}' already exists"
    return Conflict(f"Invalid import file: line {line}: {text}", field=f"lines[{line}].{field}")


def drop(cursor) -> None:
    """Drop ``TABLE`` at the end of its transaction's work (under an outer transaction, as in
    the tests, ``ON COMMIT DROP`` would keep it until that one ends)."""
    cursor.execute(f"DROP TABLE {TABLE}")
