"""Provenance: a fact lives while one of its source messages still exists at the version
(``seq``) it was read in; a deleted or edited message takes its facts with it. Reads skip
such facts themselves (``memory.facts.selectors``); the sweep reclaims their rows."""

from __future__ import annotations

import threading
import uuid

from django.db import connection, transaction

# Where this process's batched sweep goes on from (fact ids in their order; wraps round).
# Processes sweep independently: deleting what no longer holds is the same from any of them.
_after = uuid.UUID(int=0)
_after_lock = threading.Lock()


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
    if batch is None:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                """
                DELETE FROM memory_factsource s WHERE NOT EXISTS (
                    SELECT 1 FROM memory_message m WHERE m.id = s.message_id AND m.seq = s.message_seq)
                """
            )
            cursor.execute(
                "DELETE FROM memory_fact f WHERE NOT EXISTS (SELECT 1 FROM memory_factsource s WHERE s.fact_id = f.id)"
            )
            return cursor.rowcount
    global _after
    with _after_lock:
        after = _after
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT array(SELECT id FROM memory_fact WHERE id > %s ORDER BY id LIMIT %s)", [after, batch]
        )
        ids = cursor.fetchone()[0]
        if ids:
            cursor.execute(
                """
                DELETE FROM memory_factsource s WHERE s.fact_id = ANY(%(ids)s) AND NOT EXISTS (
                    SELECT 1 FROM memory_message m WHERE m.id = s.message_id AND m.seq = s.message_seq)
                """,
                {"ids": ids},
            )
            cursor.execute(
                "DELETE FROM memory_fact f WHERE f.id = ANY(%(ids)s) "
                "AND NOT EXISTS (SELECT 1 FROM memory_factsource s WHERE s.fact_id = f.id)",
                {"ids": ids},
            )
        deleted = cursor.rowcount if ids else 0
    with _after_lock:
        _after = ids[-1] if len(ids) == batch else uuid.UUID(int=0)
    return deleted
