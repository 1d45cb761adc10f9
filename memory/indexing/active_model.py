"""The write side of the active embedding model (``memory.embedding_model`` reads it): every
write of embeddings runs ``guard_write`` in its transaction, and ``reembed``'s switch takes
``SWITCH_LOCK_KEY`` exclusively."""

from __future__ import annotations

from memory.embedding_model import forget_active_model

# pg_advisory_xact_lock key of the switch (exclusive) and of embedding writes (shared).
SWITCH_LOCK_KEY = 0x6D656D66_7573_0001 & 0x7FFF_FFFF_FFFF_FFFF


class ModelChanged(Exception):
    """The stored vectors were switched to another model after this write's texts were
    embedded: embed them again (``follow_active_model(force=True)`` first)."""


def guard_write(cursor, *, generation: int | None) -> None:
    """In the transaction of an embedding write: block the switch until it commits, and raise
    ``ModelChanged`` when the active model is no longer ``generation`` (what
    ``follow_active_model`` returned before embedding)."""
    cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", [SWITCH_LOCK_KEY])
    cursor.execute("SELECT id FROM memory_embeddingmodel WHERE state = 'active'")
    row = cursor.fetchone()
    if (row[0] if row else None) != generation:
        forget_active_model()
        raise ModelChanged(f"the stored vectors are now those of embedding model {row[0] if row else None}")
