"""Every row of a user in an HNSW index is in the user's own (``User.ann_bucket``).

Two flushes of one user that ended together could each move the user to the HNSW index
(``memory.retrieval.vector.ann_enable``), each into a bucket of its own choice: the user then
searched one bucket while their rows were spread over several, and the approximate search
missed most of them. A flush's write that waited for the move could also write rows, and
rewrite their neighbours, without the bucket the move had just set. Both are fixed in the
code (each decision is taken holding the user's context-write lock); this puts the rows of
the users they touched where the code would have: each row with a context embedding of a
moved user in the user's bucket, the copies of each context digest marked again (the row
already in the user's index, else the first by id, stays in it), and the rows a user not
moved yet has in more than one bucket out of every index, for the next move to place.
"""

from django.db import migrations

REPAIR_MOVED_USERS = """
WITH broken AS (
    SELECT DISTINCT m.user_id FROM memory_message m JOIN memory_user u ON u.id = m.user_id
    WHERE u.ann_bucket IS NOT NULL AND m.context_embedding IS NOT NULL AND m.ann_bucket IS DISTINCT FROM u.ann_bucket
), digested AS (
    SELECT m.id, m.user_id, u.ann_bucket AS bucket, memory_vector_digest(m.context_embedding) AS digest,
           m.ann_bucket = u.ann_bucket AND NOT m.ann_duplicate AS in_index
    FROM memory_message m JOIN memory_user u ON u.id = m.user_id
    WHERE m.user_id IN (SELECT user_id FROM broken) AND m.context_embedding IS NOT NULL
), placed AS (
    SELECT id, bucket, digest,
           row_number() OVER (PARTITION BY user_id, digest ORDER BY in_index IS TRUE DESC, id) > 1 AS duplicate
    FROM digested
)
UPDATE memory_message m SET ann_bucket = p.bucket, context_digest = p.digest, ann_duplicate = p.duplicate
FROM placed p
WHERE m.id = p.id
  AND (m.ann_bucket IS DISTINCT FROM p.bucket OR m.context_digest IS DISTINCT FROM p.digest
       OR m.ann_duplicate IS DISTINCT FROM p.duplicate)
"""

RESET_SPLIT_MOVES = """
UPDATE memory_message SET ann_bucket = NULL, context_digest = NULL, ann_duplicate = false
WHERE ann_bucket IS NOT NULL AND user_id IN (
    SELECT m.user_id FROM memory_message m JOIN memory_user u ON u.id = m.user_id
    WHERE u.ann_bucket IS NULL AND m.ann_bucket IS NOT NULL
    GROUP BY m.user_id HAVING count(DISTINCT m.ann_bucket) > 1
)
"""


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0011_api_key_parent'),
    ]

    operations = [
        migrations.RunSQL(REPAIR_MOVED_USERS, migrations.RunSQL.noop),
        migrations.RunSQL(RESET_SPLIT_MOVES, migrations.RunSQL.noop),
    ]
