"""The write side of the active embedding model (``memory.embedding_model`` reads it): every
write of embeddings runs ``guard_write`` in its transaction (``embed_guarded`` is the loop
around it), and ``reembed``'s switch takes ``SWITCH_LOCK_KEY`` exclusively.

Below every room that writes embeddings: the flush and ``reembed`` (``memory.indexing``), the
facts layer (``memory.facts``, which the flush calls), the services and the import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from memory.embedding_model import follow_active_model, forget_active_model

E = TypeVar("E")
R = TypeVar("R")

FOLLOW = object()  # embed_guarded's default generation: the active model, read when it starts

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


def embed_guarded(
    embed: Callable[[], E],
    write: Callable[[E, int | None], R],
    *,
    generation: int | None | object = FOLLOW,
    on_change: Callable[[], None] | None = None,
) -> R:
    """Embed, then write under ``guard_write``; both again while a ``reembed`` switches the
    model in between. Returns what ``write`` returns.

    ``embed()`` runs outside any transaction (model calls take seconds) and returns what
    ``write`` stores. ``write(embeddings, generation)`` opens the transaction, runs
    ``guard_write(cursor, generation=generation)`` in it before any vector is written, writes
    and returns. On ``ModelChanged`` (nothing was written: its transaction rolled back) this
    process follows the new model, ``on_change()`` runs (a caller drops the vectors of the
    old model it holds) and ``embed`` and ``write`` run again. ``generation``: the active
    model that ``embed``'s vectors come from, when the caller read it earlier (an import
    reads it once: the file's vectors are of it); by default read now
    (``follow_active_model``). Raises what ``embed`` and ``write`` raise, but ``ModelChanged``.
    """
    if generation is FOLLOW:
        generation = follow_active_model()
    while True:
        embeddings = embed()
        try:
            return write(embeddings, generation)
        except ModelChanged:
            generation = follow_active_model(force=True)
            if on_change is not None:
                on_change()
