"""The facts' part of changing the embedding model: their vectors embedded again without the
LLM (a fact's text never changes), run by ``reembed`` after its switch and by the extraction
workers when idle."""

from __future__ import annotations

from django.db import connection, transaction
from pgvector import Vector

from memory import embedding_guard, embedding_model
from memory.inference import BACKGROUND, registry
from memory.pgvector_binary import VectorArray, use_binary_vectors


def facts_reembed(*, embed=None, generation: int | None = None, batch_size: int = 256) -> int:
    """Embed again, without the LLM, the facts whose embedding is not the active embedding
    model's (``Fact.embedding_generation``); returns how many. Run by ``reembed`` after its
    switch, and by the extraction workers when idle (so a switch made while the layer was off
    is caught up too).

    ``embed(texts) -> (n, dim)`` float32 (default: this process's background model, after
    ``follow_active_model``); ``generation``: the active ``EmbeddingModel`` id (default: read).
    When the active model's dimension is not the column's, the column is retyped first
    (``ALTER TABLE ... TYPE vector(dim) USING NULL``: every fact is then found by its words
    only until it is embedded again). A fact's text never changes, so a batch is written
    without a claim; the write takes the switch's shared lock (``guard_write``) and stops
    when another switch happened meanwhile."""

    if embed is None:
        generation = embedding_model.follow_active_model(force=True)
        embed = lambda texts: registry.embed(texts, priority=BACKGROUND)  # noqa: E731
    model = embedding_model.active_model(max_age=0.0)
    if generation is None:
        generation = model.id
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'memory_fact'::regclass AND attname = 'embedding'"
        )
        column_dimension = cursor.fetchone()[0]
        if model.dimension and model.dimension != column_dimension:
            cursor.execute(
                f"ALTER TABLE memory_fact ALTER COLUMN embedding TYPE vector({int(model.dimension)}) USING NULL"
            )
    done = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id, text FROM memory_fact WHERE embedding_generation IS DISTINCT FROM %s "
                "OR embedding IS NULL ORDER BY id LIMIT %s",
                [generation, batch_size],
            )
            rows = cursor.fetchall()
        if not rows:
            return done
        vectors = embed([text for _, text in rows])
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                embedding_guard.guard_write(cursor, generation=generation)
                use_binary_vectors(cursor)
                cursor.execute(
                    "UPDATE memory_fact f SET embedding = v.embedding, embedding_generation = %(generation)s "
                    "FROM unnest(%(ids)s::uuid[], %(vectors)s::vector[]) AS v(id, embedding) WHERE f.id = v.id",
                    {
                        "generation": generation,
                        "ids": [str(row[0]) for row in rows],
                        "vectors": VectorArray(Vector(vector) for vector in vectors),
                    },
                )
        except embedding_guard.ModelChanged:
            return done
        done += len(rows)
