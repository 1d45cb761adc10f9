"""Copies of a context embedding go into the user's HNSW index as one row.

pgvector's HNSW graph loses its links among many exact copies of a vector: a node holds at
most ten rows, and neighbour selection drops every other neighbour of a node in favour of a
copy at distance zero. A history that repeats itself (the same exchange again and again)
then hides even distinct vectors from the search. Each row of a user in an index gets the
digest of its context embedding (rounded to half precision, so that sums in another order
still match); of the rows sharing a digest one is in the index, the others are marked
``ann_duplicate`` and found through it (``memory.retrieval.vector``). When the row in the
index leaves it (edited, deleted, its context changed), a trigger puts a copy in its place.
"""

import pgvector.django.indexes
from django.db import migrations, models

DIGEST_FUNCTION = """
CREATE OR REPLACE FUNCTION memory_vector_digest(v vector) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || encode(substr(sha256(halfvec_send(v::halfvec)), 1, 8), 'hex'))::bit(64)::bigint
$$
"""

MARK_COPIES = """
WITH digested AS (
    SELECT id, user_id, memory_vector_digest(context_embedding) AS digest FROM memory_message
    WHERE ann_bucket IS NOT NULL AND context_embedding IS NOT NULL
)
UPDATE memory_message m SET context_digest = d.digest, ann_duplicate = d.duplicate
FROM (SELECT id, digest, row_number() OVER (PARTITION BY user_id, digest ORDER BY id) > 1 AS duplicate FROM digested) d
WHERE m.id = d.id
"""

PROMOTE_TRIGGERS = """
CREATE FUNCTION memory_message_ann_copy_promote() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- OLD was its context embedding's row in the HNSW index: when copies are left and none of
    -- them is in the index, the first (by id) takes its place.
    UPDATE memory_message SET ann_duplicate = false
    WHERE id = (
        SELECT id FROM memory_message
        WHERE user_id = OLD.user_id AND context_digest = OLD.context_digest AND ann_bucket IS NOT NULL AND ann_duplicate
        ORDER BY id LIMIT 1
    ) AND NOT EXISTS (
        SELECT FROM memory_message
        WHERE user_id = OLD.user_id AND context_digest = OLD.context_digest AND ann_bucket IS NOT NULL AND NOT ann_duplicate
    );
    RETURN NULL;
END
$$;
CREATE TRIGGER memory_message_ann_copy_update
AFTER UPDATE OF context_digest, ann_duplicate, ann_bucket ON memory_message
FOR EACH ROW WHEN (
    OLD.ann_bucket IS NOT NULL AND NOT OLD.ann_duplicate AND OLD.context_digest IS NOT NULL
    AND (NEW.ann_bucket IS NULL OR NEW.ann_duplicate OR NEW.context_digest IS DISTINCT FROM OLD.context_digest)
) EXECUTE FUNCTION memory_message_ann_copy_promote();
CREATE TRIGGER memory_message_ann_copy_delete
AFTER DELETE ON memory_message
FOR EACH ROW WHEN (OLD.ann_bucket IS NOT NULL AND NOT OLD.ann_duplicate AND OLD.context_digest IS NOT NULL)
EXECUTE FUNCTION memory_message_ann_copy_promote();
"""

DROP_PROMOTE_TRIGGERS = """
DROP TRIGGER memory_message_ann_copy_update ON memory_message;
DROP TRIGGER memory_message_ann_copy_delete ON memory_message;
DROP FUNCTION memory_message_ann_copy_promote();
"""


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0009_index_snapshot_parts'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='ann_duplicate',
            field=models.BooleanField(db_default=False, default=False),
        ),
        migrations.AddField(
            model_name='message',
            name='context_digest',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.RunSQL(DIGEST_FUNCTION, "DROP FUNCTION memory_vector_digest(vector)"),
        *(
            migrations.RemoveIndex(model_name='message', name=f'memory_message_context_hnsw_{bucket}')
            for bucket in range(32)
        ),
        # Before the indexes are built again: they leave the copies out.
        migrations.RunSQL(MARK_COPIES, migrations.RunSQL.noop),
        *(
            migrations.AddIndex(
                model_name='message',
                index=pgvector.django.indexes.HnswIndex(condition=models.Q(('ann_bucket', bucket), ('ann_duplicate', False)), ef_construction=64, fields=['context_embedding'], m=16, name=f'memory_message_context_hnsw_{bucket}', opclasses=['vector_ip_ops']),
            )
            for bucket in range(32)
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(condition=models.Q(('ann_bucket__isnull', False), ('ann_duplicate', True)), fields=['user', 'context_digest'], include=('id',), name='memory_message_context_copies'),
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(condition=models.Q(('ann_bucket__isnull', False), ('ann_duplicate', False)), fields=['user', 'context_digest'], name='memory_message_context_indexed'),
        ),
        migrations.RunSQL(PROMOTE_TRIGGERS, DROP_PROMOTE_TRIGGERS),
    ]
