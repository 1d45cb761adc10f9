"""Embeddings as query parameters, sent to PostgreSQL in pgvector's binary format.

Callers pass ``pgvector.Vector`` values (``Vector(ndarray)``), or a ``VectorArray`` of them
(``None`` for NULL) for a ``vector[]``, after ``use_binary_vectors(cursor)``. The binary
format carries the float32 values themselves, so the stored vector is the computed one bit
for bit, and encoding one takes a microsecond: a text literal of 384 floats takes about 80
µs, on the GIL of the process that flushes and queries (the web process), twice per chat
turn and once or twice per query.
"""

from __future__ import annotations

import psycopg
from pgvector import Vector
from pgvector.psycopg.vector import VectorBinaryDumper, VectorDumper
from psycopg.adapt import PyFormat
from psycopg.types import TypeInfo
from psycopg.types.array import ListBinaryDumper, ListDumper


class VectorArray(list):
    """A list of ``Vector`` (or ``None``) sent as one ``vector[]`` parameter, in binary.

    A plain list would go as a text array, with each vector as a text literal: psycopg picks
    its text list dumper for a ``%s`` placeholder, whatever its items' binary dumpers.
    """


def _has_dumpers(context) -> bool:
    try:
        context.adapters.get_dumper(Vector, PyFormat.BINARY)
    except psycopg.ProgrammingError:
        return False
    return True


def use_binary_vectors(cursor) -> None:
    """Let ``cursor`` (a Django cursor over psycopg 3, or a psycopg cursor) send ``Vector``
    and ``VectorArray`` parameters.

    The first time on a database connection, reads the ``vector`` type's oid (it differs
    between databases) and registers pgvector's own dumpers for ``Vector`` (and psycopg's
    list dumpers for ``VectorArray``) on that connection, the binary ones by default and the
    text ones for client-side binding (``DB_SERVER_SIDE_BINDING=0``); later cursors of the
    connection have them. Nothing else
    changes: ``vector`` columns are still read as text, and ``numpy`` arrays are not
    adapted. Raises ``psycopg.ProgrammingError`` when the database has no ``vector`` type
    (migrations not run).
    """
    if _has_dumpers(cursor):
        return
    raw = cursor.connection  # the psycopg connection (a Django cursor passes the attribute through)
    if not _has_dumpers(raw):
        info = TypeInfo.fetch(raw, "vector")
        if info is None:
            raise psycopg.ProgrammingError("the database has no vector type: run manage.py migrate")
        _register(raw, info, type("VectorTextDumper", (VectorDumper,), {"oid": info.oid}),
                  type("VectorBinaryDumper", (VectorBinaryDumper,), {"oid": info.oid}))
    # A cursor copies its connection's adapters when it is made: one made before the
    # connection had the dumpers gets them too.
    adapters = raw.adapters
    _register(cursor, adapters.types.get("vector"), adapters.get_dumper(Vector, PyFormat.TEXT),
              adapters.get_dumper(Vector, PyFormat.BINARY))


def _register(context, info: TypeInfo, text_dumper: type, binary_dumper: type) -> None:
    info.register(context)  # the vector[] oid, for lists of vectors
    # The binary dumpers last: they are the ones psycopg picks for a plain %s placeholder.
    context.adapters.register_dumper(Vector, text_dumper)
    context.adapters.register_dumper(Vector, binary_dumper)
    context.adapters.register_dumper(VectorArray, ListDumper)
    context.adapters.register_dumper(VectorArray, ListBinaryDumper)
