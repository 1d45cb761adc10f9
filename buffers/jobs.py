"""The rules of flush jobs written once: the pending summary, the size trigger, the job upsert.

They are SQL fragments because the hottest write of the service, ``memory.services.messages.
messages_add``, applies them inside its own single statement (one exchange with the database, one commit);
``buffers.services`` composes the same fragments for its own statements. A composing
statement binds ``%(user)s`` to the user's id and adds the parameters of ``job_params`` (and,
for the size trigger, ``size_trigger_params``).

The job states are ``buffers.models.State``; a fragment writes them as literals taken from
it, since an ``ON CONFLICT`` clause must repeat the unique index's predicate as it is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction

from buffers import events
from buffers.models import WAITING_STATES, Priority, Reason, State


def sql_states(states) -> str:
    """``states`` as a SQL list of literals: ``'queued', 'retrying'``."""
    return ", ".join(f"'{State(state).value}'" for state in states)


@dataclass(frozen=True)
class PendingSummary:
    """A user's pending messages: how many, estimated tokens (chars / 4), oldest change age (s)."""

    messages: int
    tokens: int
    oldest_age_seconds: float


def pending_sql(*, plus: str | None = None) -> str:
    """A ``SELECT`` of one row ``(messages, chars, oldest_age)``: the pending (not yet flushed)
    messages of user ``%(user)s``, from the partial index on them; ``oldest_age`` is seconds
    since the oldest one changed, at least 0 (an add stamps ``updated_at`` with its own
    clock, which may run a moment ahead of ``now()``).

    ``plus`` names a relation of rows with a ``chars`` column that the statement's snapshot
    cannot see yet (the rows an ``INSERT`` of the same statement adds): they are counted too.
    """
    added_messages = f" + (SELECT count(*) FROM {plus})" if plus else ""
    added_chars = f" + (SELECT coalesce(sum(chars), 0) FROM {plus})" if plus else ""
    return f"""SELECT count(*){added_messages} AS messages,
           coalesce(sum(length(index_text)), 0){added_chars} AS chars,
           greatest(extract(epoch FROM now() - min(updated_at)), 0) AS oldest_age
    FROM memory_message WHERE user_id = %(user)s AND flushed_at IS NULL"""


def pending_summary(*, user_id: uuid.UUID) -> PendingSummary:
    """The user's pending (not yet flushed) messages (``pending_sql``)."""
    with connection.cursor() as cursor:
        cursor.execute(pending_sql(), {"user": user_id})
        count, chars, age = cursor.fetchone()
    return PendingSummary(messages=count, tokens=int(chars) // 4, oldest_age_seconds=float(age))


def unclaimed_pending(*, user_id: uuid.UUID, session_id: uuid.UUID | None = None) -> bool:
    """Whether the user (or one session) has pending messages that no live flush claims: what
    a flush that stopped at the end of its time slice left to do."""
    session_filter = "AND session_id = %(session)s" if session_id is not None else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT EXISTS (SELECT FROM memory_message
                               WHERE user_id = %(user)s {session_filter} AND flushed_at IS NULL
                                 AND (claimed_until IS NULL OR claimed_until < now()))""",
            {"user": user_id, "session": session_id},
        )
        return cursor.fetchone()[0]


def job_upsert_sql(*, source: str = "", session: bool = False) -> str:
    """An ``INSERT ... RETURNING id`` of a waiting flush job for ``%(user)s``: user-wide, or of
    the session ``%(session)s`` with ``session``. The job carries the user's tenant (claims
    take turns over tenants: ``buffers.services.claim_next_job``).

    At most one job waits per user and scope (the unique indexes ``buffers_one_waiting_job_per_user``
    and ``buffers_one_waiting_job_per_session``): on conflict, a request of a higher priority
    (a lower number) raises the waiting job's priority, takes its reason and makes it runnable
    now; any other leaves it as it is and returns no row.

    ``source`` is a ``FROM ... WHERE ...`` clause: the job is queued only when it selects a
    row (at most one). Parameters: ``job_params``.
    """
    scope, conflict = ("%(session)s", "session_id IS NOT NULL") if session else ("NULL", "session_id IS NULL")
    target = "session_id" if session else "user_id"
    return f"""INSERT INTO buffers_flushjob
        (user_id, tenant_id, session_id, priority, reason, state, attempts, max_attempts, last_error,
         messages_flushed, worker, created_at, next_attempt_at)
    SELECT %(user)s, (SELECT tenant_id FROM memory_user WHERE id = %(user)s), {scope}, %(job_priority)s,
           %(job_reason)s, '{State.QUEUED.value}', 0, %(job_max_attempts)s, '', 0, '', now(), now()
    {source}
    ON CONFLICT ({target}) WHERE state IN ({sql_states(WAITING_STATES)}) AND {conflict}
    DO UPDATE SET priority = LEAST(buffers_flushjob.priority, EXCLUDED.priority),
                  reason = CASE WHEN EXCLUDED.priority < buffers_flushjob.priority
                                THEN EXCLUDED.reason ELSE buffers_flushjob.reason END,
                  next_attempt_at = CASE WHEN EXCLUDED.priority < buffers_flushjob.priority
                                         THEN now() ELSE buffers_flushjob.next_attempt_at END
    WHERE EXCLUDED.priority < buffers_flushjob.priority
    RETURNING id"""


def waiting_job_sql(*, session: bool = False) -> str:
    """A ``SELECT id, priority`` of the waiting job of ``%(user)s`` (user-wide, or of the
    session ``%(session)s`` with ``session``), if any."""
    scope = "session_id = %(session)s" if session else "user_id = %(user)s AND session_id IS NULL"
    return f"SELECT id, priority FROM buffers_flushjob WHERE {scope} AND state IN ({sql_states(WAITING_STATES)})"


def job_params(*, priority: int, reason: str) -> dict:
    """The parameters of ``job_upsert_sql``."""
    return {"job_priority": priority, "job_reason": reason, "job_max_attempts": settings.BUFFERS["MAX_ATTEMPTS"]}


def size_trigger_sql(*, pending: str = "pending", condition: str = "TRUE") -> str:
    """The size trigger: ``job_upsert_sql`` of a normal-priority flush, queued when the
    relation ``pending`` (``pending_sql``'s columns) is at ``SIZE_MESSAGES`` messages or
    ``SIZE_TOKENS`` tokens (chars / 4), and ``condition`` holds. Parameters:
    ``size_trigger_params``."""
    return job_upsert_sql(
        source=f"FROM {pending} WHERE ({condition}) "
        f"AND ({pending}.messages >= %(size_messages)s OR {pending}.chars / 4 >= %(size_tokens)s)"
    )


def size_trigger_params() -> dict:
    """The parameters of ``size_trigger_sql`` (the ``BUFFERS`` thresholds, the job's)."""
    return {
        "size_messages": settings.BUFFERS["SIZE_MESSAGES"],
        "size_tokens": settings.BUFFERS["SIZE_TOKENS"],
        **job_params(priority=Priority.NORMAL, reason=Reason.SIZE),
    }


_NOTE_PENDING_SQL = f"""
WITH pending AS (
    {pending_sql()}
), job AS (
    {size_trigger_sql()}
)
SELECT messages, chars, oldest_age, EXISTS (SELECT FROM job) FROM pending
"""


def note_pending(*, user_id: uuid.UUID) -> PendingSummary:
    """After a write of the user's messages (in its transaction): apply the size trigger.

    Returns the user's pending summary. Workers are notified when the transaction commits,
    if a job was queued or raised; should the process die before, the periodic time trigger
    still flushes the messages (they are rows).
    """
    with connection.cursor() as cursor:
        cursor.execute(_NOTE_PENDING_SQL, {"user": user_id, **size_trigger_params()})
        count, chars, age, queued = cursor.fetchone()
    if queued:
        transaction.on_commit(lambda: events.notify_flush(user_id=user_id, priority=Priority.NORMAL))
    return PendingSummary(messages=count, tokens=int(chars) // 4, oldest_age_seconds=float(age))
