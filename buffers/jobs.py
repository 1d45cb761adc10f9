"""The rules of flush jobs written once: the size trigger and the job upsert (the pending
summary they read is ``buffers.pending``'s).

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

from django.conf import settings
from django.db import connection, transaction

from buffers import events
from buffers.models import WAITING_STATES, Priority, Reason, State, sql_states
from buffers.pending import PendingSummary, pending_sql


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
