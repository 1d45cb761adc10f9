"""Provenance: a fact lives while one of its source messages still exists at the version
(``seq``) it was read in; a deleted or edited message takes its facts with it. Reads skip
such facts themselves (``memory.facts.selectors``); the sweep reclaims their rows."""

from __future__ import annotations

import uuid

from django.db import connection, transaction

# Where this process's batched sweep goes on from (fact ids in their order; wraps round).
# Threads and processes sweeping the same facts at once are harmless: deleting what no
# longer holds is the same from any of them.
_after = uuid.UUID(int=0)


def facts_sweep(*, batch: int | None = None) -> int:
    """Delete the facts none of whose sources still exists at the version it was read in
    (their messages deleted or edited; an edited message is flushed again and its new text
    extracted again), and the sources that no longer hold. Returns the facts deleted.

    ``batch``: look at no more than that many facts (and their sources, by the
    ``(fact, message_id)`` index), those after where this process's last batched sweep
    stopped, starting again from the first once it reaches the last: each run's work is
    bounded whatever the number of facts. ``None``: every fact at once (two anti-joins over
    all sources). Reads already skip such facts (``memory.facts.selectors``); this reclaims
    their rows. A fact's older versions go with it: they share its sources."""
    global _after
    with transaction.atomic(), connection.cursor() as cursor:
        if batch is None:
            return _delete_unsupported(cursor, ids=None)
        cursor.execute("SELECT array(SELECT id FROM memory_fact WHERE id > %s ORDER BY id LIMIT %s)", [_after, batch])
        ids = cursor.fetchone()[0]
        deleted = _delete_unsupported(cursor, ids=ids) if ids else 0
    _after = ids[-1] if len(ids) == batch else uuid.UUID(int=0)
    return deleted


def _delete_unsupported(cursor, *, ids: list[uuid.UUID] | None) -> int:
    """Delete the sources of facts ``ids`` (``None``: of every fact) whose message is gone or
    changed, then those facts left with no source; returns how many facts."""
    params = {"ids": ids} if ids is not None else None
    among = "s.fact_id = ANY(%(ids)s) AND" if ids is not None else ""
    cursor.execute(
        f"DELETE FROM memory_factsource s WHERE {among} NOT EXISTS ("
        "SELECT 1 FROM memory_message m WHERE m.id = s.message_id AND m.seq = s.message_seq)",
        params,
    )
    among = "f.id = ANY(%(ids)s) AND" if ids is not None else ""
    cursor.execute(
        f"DELETE FROM memory_fact f WHERE {among} NOT EXISTS (SELECT 1 FROM memory_factsource s WHERE s.fact_id = f.id)",
        params,
    )
    return cursor.rowcount
