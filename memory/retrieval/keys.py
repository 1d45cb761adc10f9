"""``DocKey``: what identifies a retrievable document across the retrievers and the fusion."""

from __future__ import annotations

import uuid

# A document's kind as the BM25 index's arrays hold it (a code), and as a key names it.
MESSAGE, KNOWLEDGE = 0, 1
KINDS = ("message", "knowledge")


class DocKey(tuple):
    """A retrievable document: ``kind`` (``"message"`` or ``"knowledge"``) and ``id`` (its UUID).

    ``DocKey(kind, id)``. A tuple ``(kind, id.int)`` underneath, so that it is hashed and
    compared in C: the fusion hashes every candidate key several times per query.
    ``from_int`` makes a key from an id's integer without building a ``UUID``; ``id`` builds
    the ``UUID`` when it is asked for.
    """

    __slots__ = ()

    def __new__(cls, kind: str, id: uuid.UUID) -> DocKey:  # noqa: A002 (the field's name)
        return tuple.__new__(cls, (kind, id.int))

    @classmethod
    def from_int(cls, kind: str, value: int) -> DocKey:
        """The key of the document whose UUID's integer (``UUID.int``) is ``value``."""
        return tuple.__new__(cls, (kind, value))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def int(self) -> int:
        """The id as ``UUID.int``."""
        return self[1]

    @property
    def id(self) -> uuid.UUID:
        return uuid.UUID(int=self[1])

    def __repr__(self) -> str:
        return f"DocKey(kind={self[0]!r}, id={self.id!r})"

    def __reduce__(self):
        return DocKey, (self[0], self.id)
