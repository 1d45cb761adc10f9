"""Drop the indexes no query uses; every add and flush paid for them.

The HNSW indexes: the served vector search is an exact scan of one user's rows
(``memory.retrieval.vector_candidates``), because an HNSW search filtered by user misses a
small user's rows (``memfuse_bench query``'s exactness check measured recall@10 0.10-0.55).
Inserting a flush's batch into the index was most of the flush's write: CPU, and WAL that
every add's commit then waited to fsync. The single-column foreign-key indexes on
``session_id`` and ``user_id``: the unique ``(session_id, position)`` and the
``(user_id, created_at)`` indexes lead with those columns.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0005_tenants_api_keys'),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name='knowledge',
            name='memory_knowledge_embedding_hnsw',
        ),
        migrations.RemoveIndex(
            model_name='message',
            name='memory_message_embedding_hnsw',
        ),
        migrations.AlterField(
            model_name='message',
            name='session',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='messages', to='memory.session'),
        ),
        migrations.AlterField(
            model_name='message',
            name='user',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='messages', to='memory.user'),
        ),
    ]
