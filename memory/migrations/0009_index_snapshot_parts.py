"""Index snapshots in parts (``IndexSnapshotPart``) of at most 256 KiB each.

A whole snapshot in one row (and one statement when written) left every pooled connection
with libpq buffers as large as the largest snapshot it had moved, for its life. The
snapshots already written are split here, in order.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0008_embedding_model'),
    ]

    operations = [
        migrations.CreateModel(
            name='IndexSnapshotPart',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('part', models.PositiveIntegerField()),
                ('data', models.BinaryField()),
                ('snapshot', models.ForeignKey(db_column='user_id', db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='parts', to='memory.indexsnapshot')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('snapshot', 'part'), name='memory_indexsnapshotpart_unique')],
            },
        ),
        migrations.RunSQL(
            [
                # Like the whole snapshots before: their bytes do not compress.
                "ALTER TABLE memory_indexsnapshotpart ALTER COLUMN data SET STORAGE EXTERNAL",
                """
                INSERT INTO memory_indexsnapshotpart (user_id, part, data)
                SELECT s.user_id, p, substring(s.data FROM p * 262144 + 1 FOR 262144)
                FROM memory_indexsnapshot s, generate_series(0, greatest(octet_length(s.data) - 1, 0) / 262144) p
                """,
            ],
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.RemoveField(
            model_name='indexsnapshot',
            name='data',
        ),
    ]
