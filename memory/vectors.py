"""Embeddings as pgvector text literals, for the SQL that writes and searches them."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _literal_format(dimension: int) -> str:
    return "[" + ",".join(["%.9g"] * dimension) + "]"


def vector_literals(vectors: np.ndarray) -> list[str]:
    """Each row of ``vectors`` (``(n, dim)`` float32) as pgvector's text literal ``[x,y,...]``.

    Nine significant digits give back every float32 exactly (IEEE 754: 9 decimal digits
    round-trip a binary32), so the stored vector equals the computed one. One ``%``
    formatting per vector instead of ``pgvector.Vector._to_db``'s conversion per element:
    it runs holding the GIL of the process that flushes, usually the web process, so its
    time is taken from requests.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    template = _literal_format(vectors.shape[1])
    return [template % tuple(row) for row in vectors.tolist()]


def vector_literal(vector: np.ndarray) -> str:
    """One ``(dim,)`` vector as a pgvector literal (see ``vector_literals``)."""
    return vector_literals(np.asarray(vector).reshape(1, -1))[0]
