"""Fair flushing: each job carries its user's tenant and claims take turns over tenants
(``FlushTurn``); one waiting job per session; a job folded into another names it.

Existing jobs get their tenant from their user. Of the waiting jobs of one session, the oldest
stays and the others are done, folded into it, before the unique index is made.
"""

import django.db.models.deletion
from django.db import migrations, models

FILL_TENANTS = """
UPDATE buffers_flushjob j SET tenant_id = u.tenant_id FROM memory_user u WHERE u.id = j.user_id
"""

MERGE_WAITING_SESSION_JOBS = """
WITH ranked AS (
    SELECT id, first_value(id) OVER (PARTITION BY session_id ORDER BY created_at, id) AS kept
    FROM buffers_flushjob
    WHERE session_id IS NOT NULL AND state IN ('queued', 'retrying')
)
UPDATE buffers_flushjob j
SET state = 'done', superseded_by = ranked.kept, finished_at = now(),
    last_error = 'superseded by a waiting flush of the same session'
FROM ranked WHERE j.id = ranked.id AND ranked.id <> ranked.kept
"""


class Migration(migrations.Migration):

    dependencies = [
        ('buffers', '0010_worker_heartbeats'),
        ('memory', '0010_ann_copies'),
    ]

    operations = [
        migrations.CreateModel(
            name='FlushTurn',
            fields=[
                ('tenant', models.OneToOneField(db_constraint=False, on_delete=django.db.models.deletion.DO_NOTHING, primary_key=True, related_name='+', serialize=False, to='memory.tenant')),
                ('claimed_at', models.DateTimeField()),
            ],
        ),
        migrations.AddField(
            model_name='flushjob',
            name='superseded_by',
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='flushjob',
            name='tenant',
            field=models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='memory.tenant'),
        ),
        migrations.RunSQL(FILL_TENANTS, migrations.RunSQL.noop),
        migrations.RunSQL(MERGE_WAITING_SESSION_JOBS, migrations.RunSQL.noop),
        # The updates queued the checks of the table's deferred foreign keys: run them now,
        # since an index cannot be built on a table with pending trigger events.
        migrations.RunSQL("SET CONSTRAINTS ALL IMMEDIATE", migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name='flushjob',
            constraint=models.UniqueConstraint(condition=models.Q(('session__isnull', False), ('state__in', ('queued', 'retrying'))), fields=('session',), name='buffers_one_waiting_job_per_session'),
        ),
    ]
