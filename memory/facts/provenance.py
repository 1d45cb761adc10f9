"""Provenance: a fact lives while one of its source messages still exists at the version
(``seq``) it was read in; a deleted or edited message takes its facts with it. Reads skip
such facts themselves (``memory.facts.selectors``); the sweep reclaims their rows."""

from __future__ import annotations

from django.db import connection, transaction


def facts_sweep() -> int:
    """Delete the facts none of whose sources still exists at the version it was read in
    (their messages deleted or edited; an edited message is flushed again and its new text
    extracted again), and the sources that no longer hold. Returns the facts deleted.

    Reads already skip such facts (``memory.facts.selectors``); this reclaims their rows.
    A fact's older versions go with it: they share its sources."""
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
