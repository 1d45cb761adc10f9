"""Embeddings as query parameters: PostgreSQL stores exactly the float32 values computed."""

import numpy as np
import psycopg
import pytest
from django.db import connection
from pgvector import Vector
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import Format

from memory.pgvector_binary import VectorArray, use_binary_vectors


def _awkward_vectors(count: int) -> np.ndarray:
    """Random float32 rows, the first with the extremes: largest, smallest normal, a negative
    subnormal, zero."""
    vectors = np.random.default_rng(7).normal(size=(count, 384)).astype(np.float32)
    vectors[0, :4] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -1e-45, 0.0]
    return vectors


def _stored(text: str) -> bytes:
    return np.asarray(Vector.from_text(text).to_numpy(), dtype=np.float32).tobytes()


def _format(cursor, value) -> Format:
    """The wire format psycopg sends ``value`` in, as a ``%s`` parameter of ``cursor``."""
    return Transformer(cursor).get_dumper(value, PyFormat.AUTO).format


@pytest.mark.django_db
def test_a_vector_and_a_vector_array_are_sent_in_binary_and_stored_bit_for_bit():
    """One vector (``%s::vector``) and a ``VectorArray`` with a NULL (``%s::vector[]``) go in
    binary and come back as the same float32 values. A plain list of vectors would go as text."""
    vectors = _awkward_vectors(3)
    array = VectorArray([Vector(vectors[1]), None, Vector(vectors[2])])
    with connection.cursor() as cursor:
        use_binary_vectors(cursor)
        use_binary_vectors(cursor)  # once per connection; a second call changes nothing
        assert _format(cursor.cursor, Vector(vectors[0])) == _format(cursor.cursor, array) == Format.BINARY
        assert _format(cursor.cursor, list(array)) == Format.TEXT
        cursor.execute("SELECT %s::vector::text", [Vector(vectors[0])])
        single = cursor.fetchone()[0]
        cursor.execute("SELECT v::text FROM unnest(%s::vector[]) WITH ORDINALITY AS x(v, n) ORDER BY n", [array])
        listed = [row[0] for row in cursor.fetchall()]

    assert _stored(single) == vectors[0].tobytes()
    assert listed[1] is None
    assert [_stored(listed[0]), _stored(listed[2])] == [vectors[1].tobytes(), vectors[2].tobytes()]


@pytest.mark.django_db
def test_client_side_binding_sends_the_same_vector_as_text():
    """With client-side binding (``DB_SERVER_SIDE_BINDING=0``: values quoted into the SQL)
    the text dumpers are used, and the stored vectors are still exact."""
    vector, other = _awkward_vectors(2)
    connection.ensure_connection()
    with psycopg.ClientCursor(connection.connection) as cursor:
        use_binary_vectors(cursor)
        cursor.execute("SELECT %s::vector::text", [Vector(vector)])
        stored = cursor.fetchone()[0]
        cursor.execute("SELECT v::text FROM unnest(%s::vector[]) AS v", [VectorArray([Vector(other)])])
        [(listed,)] = cursor.fetchall()

    assert _stored(stored) == vector.tobytes() and _stored(listed) == other.tobytes()


@pytest.mark.django_db
def test_a_vector_without_the_dumpers_is_refused_by_psycopg():
    """A connection that was not prepared cannot send a ``Vector``: a clear error, not a
    silently wrong value (what ``use_binary_vectors`` is for)."""
    connection.ensure_connection()
    with psycopg.connect(**connection.get_connection_params()) as raw, raw.cursor() as cursor:
        with pytest.raises(psycopg.ProgrammingError, match="cannot adapt type 'Vector'"):
            cursor.execute("SELECT %s::vector::text", [Vector(np.ones(3, dtype=np.float32))])
