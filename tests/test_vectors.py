"""pgvector literals: exact for float32, and what PostgreSQL stores is the computed vector."""

import numpy as np
import pytest

from memory.vectors import vector_literal, vector_literals


def test_literals_give_back_every_float32_exactly():
    """Extremes, subnormals, negatives and random values all parse back to the same float32."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(50, 384)).astype(np.float32)
    vectors[0, :4] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -1e-45, 0.0]

    parsed = np.array([[float(x) for x in text[1:-1].split(",")] for text in vector_literals(vectors)], dtype=np.float32)

    assert parsed.tobytes() == vectors.tobytes()
    assert vector_literal(vectors[3]) == vector_literals(vectors)[3]


@pytest.mark.django_db
def test_postgresql_stores_the_literal_as_the_same_vector():
    """pgvector parses the literal into exactly the float32 values it came from."""
    from django.db import connection
    from pgvector import Vector

    vector = np.random.default_rng(8).normal(size=384).astype(np.float32)
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::vector::text", [vector_literal(vector)])
        stored = Vector._from_db(cursor.fetchone()[0])

    assert np.asarray(stored, dtype=np.float32).tobytes() == vector.tobytes()
