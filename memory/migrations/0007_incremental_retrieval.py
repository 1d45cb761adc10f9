"""What lets retrieval stay fast as histories grow (docs/retrieval.md, "Scale"):

- ``memory_change_seq`` numbers every change of a user's documents: ``seq`` on messages and
  knowledge (insert and edit), ``Tombstone`` rows for deletions. A cached index catches up by
  reading what is numbered after what it has seen, instead of being rebuilt.
- ``IndexSnapshot``: a user's serialised lexical index, which a process that has not cached
  the user loads instead of rebuilding it.
- ``Message.context_embedding``: the mean of a turn's embedding (counted VECTOR_OWN_WEIGHT
  times) and its VECTOR_CONTEXT_TURNS neighbours' on either side, written at flush, so the
  neighbour-smoothed vector score is one inner product per row that an index can serve.
  Stored inline (PLAIN): the search reads it for every candidate.
- ``ANN_BUCKETS`` partial HNSW indexes of context embeddings, each holding the rows of the
  large users assigned to its bucket (``User.ann_bucket``, ``Message.ann_bucket``).

Existing rows get their change numbers from the sequence, and flushed messages their
context embeddings, here.
"""

import django.db.models.deletion
import pgvector.django.indexes
import pgvector.django.vector
from django.conf import settings
from django.db import migrations, models

import memory.models


def context_embeddings(apps, schema_editor):
    # The statement of memory.retrieval.vector.context_refresh_all as it was with this
    # migration: later versions of it use columns and functions of later migrations.
    window, own = settings.MEMFUSE["VECTOR_CONTEXT_TURNS"], settings.MEMFUSE["VECTOR_OWN_WEIGHT"]
    lags = ", ".join(f"lag(embedding, {d}) OVER w AS p{d}, lead(embedding, {d}) OVER w AS n{d}" for d in range(1, window + 1))
    values = ", ".join(["(e)"] * own + [f"(p{d}), (n{d})" for d in range(1, window + 1)])
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH ordered AS (
                SELECT id, embedding AS e{", " + lags if lags else ""} FROM memory_message
                WINDOW w AS (PARTITION BY session_id ORDER BY position)
            ), context AS (
                SELECT id, CASE WHEN e IS NULL THEN NULL ELSE
                    (SELECT avg(x) FROM (VALUES {values}) v(x) WHERE x IS NOT NULL) END AS c
                FROM ordered
            )
            UPDATE memory_message m SET context_embedding = context.c,
                   ann_bucket = CASE WHEN context.c IS NOT NULL THEN u.ann_bucket END
            FROM context, memory_user u
            WHERE m.id = context.id AND u.id = m.user_id
            """
        )


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0006_exact_vector_search_indexes'),
    ]

    operations = [
        # pgvector 0.8 for the iterative index scans (an embedded database made with pgvector
        # 0.6 is brought up to the files its server now ships); a role that may not update
        # the extension gets a notice, and system check memory.E010 says what to run.
        migrations.RunSQL(
            """
            DO $$ BEGIN ALTER EXTENSION vector UPDATE;
            EXCEPTION WHEN insufficient_privilege THEN RAISE NOTICE 'pgvector not updated: %', SQLERRM;
            END $$
            """,
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.RunSQL(
            "CREATE SEQUENCE IF NOT EXISTS memory_change_seq",
            reverse_sql="DROP SEQUENCE IF EXISTS memory_change_seq",
        ),
        migrations.CreateModel(
            name='IndexSnapshot',
            fields=[
                ('user', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True, related_name='+', serialize=False, to='memory.user')),
                ('through_seq', models.BigIntegerField()),
                ('pruned_seq', models.BigIntegerField(default=0)),
                ('documents', models.PositiveIntegerField()),
                ('data', models.BinaryField()),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
        ),
        migrations.CreateModel(
            name='Tombstone',
            fields=[
                ('seq', models.BigIntegerField(db_default=memory.models.next_change_number(), primary_key=True, serialize=False)),
                ('kind', models.CharField(max_length=16)),
                ('doc_id', models.UUIDField()),
                ('user', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='memory.user')),
            ],
            options={
                'indexes': [models.Index(fields=['user', 'seq'], name='memory_tombstone_user_seq')],
            },
        ),
        migrations.AddField(
            model_name='knowledge',
            name='seq',
            field=models.BigIntegerField(db_default=memory.models.next_change_number(), editable=False),
        ),
        migrations.AddField(
            model_name='message',
            name='seq',
            field=models.BigIntegerField(db_default=memory.models.next_change_number(), editable=False),
        ),
        migrations.AddField(
            model_name='message',
            name='ann_bucket',
            field=models.SmallIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='message',
            name='context_embedding',
            field=pgvector.django.vector.VectorField(blank=True, dimensions=settings.MEMFUSE["EMBEDDING_DIM"], null=True),
        ),
        migrations.AddField(
            model_name='user',
            name='ann_bucket',
            field=models.SmallIntegerField(blank=True, null=True),
        ),
        migrations.RunSQL(
            [
                "ALTER TABLE memory_message ALTER COLUMN context_embedding SET STORAGE PLAIN",
                # Snapshots are arrays of numbers that pglz would try, and fail, to compress.
                "ALTER TABLE memory_indexsnapshot ALTER COLUMN data SET STORAGE EXTERNAL",
            ],
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AddIndex(
            model_name='knowledge',
            index=models.Index(fields=['user', 'seq'], name='memory_knowledge_user_seq'),
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(fields=['user', 'seq'], name='memory_message_user_seq'),
        ),
        *(
            migrations.AddIndex(
                model_name='message',
                index=pgvector.django.indexes.HnswIndex(condition=models.Q(('ann_bucket', bucket)), ef_construction=64, fields=['context_embedding'], m=16, name=f'memory_message_context_hnsw_{bucket}', opclasses=['vector_ip_ops']),
            )
            for bucket in range(32)
        ),
        migrations.RunPython(context_embeddings, migrations.RunPython.noop),
    ]
