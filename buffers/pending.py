"""The SQL of pending messages: ``memory_message`` rows not flushed yet (``flushed_at IS NULL``).

``memory`` writes the rows; for ``buffers`` they are the work to do, and every statement of
``buffers`` that reads them or frees their claims is here. Each goes through the partial
index of pending messages (by user): a filter on ``user_id`` where it can, else a scan of the
pending rows only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import connection

from buffers.models import ACTIVE_STATES, sql_states


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


# Per user first (the partial index is by user), then by tenant: the join reads one
# memory_user row per user with pending messages, not one per message.
_BY_TENANT_SQL = """
SELECT u.tenant_id, sum(p.messages)::bigint, max(p.oldest_age)
FROM (SELECT user_id, count(*) AS messages,
             greatest(extract(epoch FROM now() - min(updated_at)), 0) AS oldest_age
      FROM memory_message WHERE flushed_at IS NULL GROUP BY user_id) p
JOIN memory_user u ON u.id = p.user_id
GROUP BY u.tenant_id
"""


def pending_by_tenant() -> list[tuple[uuid.UUID, int, float]]:
    """``[(tenant_id, pending messages, oldest change age in s)]`` of the tenants with pending
    messages (the backlog, ``buffers.backlog``)."""
    with connection.cursor() as cursor:
        cursor.execute(_BY_TENANT_SQL)
        return cursor.fetchall()


def pending_total() -> int:
    """Pending messages of all users."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_message WHERE flushed_at IS NULL")
        return cursor.fetchone()[0]


def users_with_pending() -> list[uuid.UUID]:
    """The users with pending messages."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT user_id FROM memory_message WHERE flushed_at IS NULL")
        return [row[0] for row in cursor.fetchall()]


def users_due(*, older_than_seconds: float) -> list[uuid.UUID]:
    """The users with pending messages under no live claim, the oldest changed at least
    ``older_than_seconds`` ago, and no user-wide flush job waiting or running (the time
    trigger, and recovery with 0)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT m.user_id FROM memory_message m
            WHERE m.flushed_at IS NULL AND (m.claimed_until IS NULL OR m.claimed_until < now())
            GROUP BY m.user_id
            HAVING min(m.updated_at) <= now() - make_interval(secs => %s)
               AND NOT EXISTS (SELECT 1 FROM buffers_flushjob j
                               WHERE j.user_id = m.user_id AND j.session_id IS NULL
                                 AND j.state IN ({sql_states(ACTIVE_STATES)}))
            """,
            [older_than_seconds],
        )
        return [row[0] for row in cursor.fetchall()]


def release_claims(*, user_ids: Iterable[uuid.UUID], tokens: list[uuid.UUID]) -> int:
    """Free the claims of the pending messages claimed with ``tokens`` (of ``user_ids``: the
    update then uses the partial index); returns how many messages were released."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE memory_message SET flush_claim = NULL, claimed_until = NULL
            WHERE user_id = ANY(%(users)s) AND flushed_at IS NULL AND flush_claim = ANY(%(tokens)s)
            """,
            {"users": list(user_ids), "tokens": tokens},
        )
        return cursor.rowcount


def pending_overview(*, top_users: int) -> tuple[int, int, float, list[tuple[uuid.UUID, str, int, float]]]:
    """``(pending messages, users with some, oldest change age in s, top)``, ``top`` the
    ``top_users`` users with the most, ``[(user_id, name, messages, oldest age in s)]``. An
    add stamps ``updated_at`` with its own clock, which may run a moment ahead of ``now()``:
    ages are at least 0."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(DISTINCT user_id), greatest(extract(epoch FROM now() - min(updated_at)), 0) "
            "FROM memory_message WHERE flushed_at IS NULL"
        )
        total, users, oldest = cursor.fetchone()
        cursor.execute(
            """
            SELECT m.user_id, u.name, count(*), greatest(extract(epoch FROM now() - min(m.updated_at)), 0)
            FROM memory_message m JOIN memory_user u ON u.id = m.user_id
            WHERE m.flushed_at IS NULL
            GROUP BY m.user_id, u.name ORDER BY count(*) DESC, u.name LIMIT %s
            """,
            [top_users],
        )
        return total, users, oldest, cursor.fetchall()
