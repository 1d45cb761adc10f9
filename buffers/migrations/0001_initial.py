import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('memory', '0003_write_behind'),
    ]

    operations = [
        migrations.CreateModel(
            name='FlushJob',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('priority', models.PositiveSmallIntegerField(choices=[(0, 'Critical'), (1, 'High'), (2, 'Normal'), (3, 'Low')], default=2)),
                ('reason', models.CharField(choices=[('manual', 'Manual'), ('size', 'Size'), ('time', 'Time'), ('shutdown', 'Shutdown'), ('recovery', 'Recovery')], max_length=16)),
                ('state', models.CharField(choices=[('queued', 'Queued'), ('running', 'Running'), ('retrying', 'Retrying'), ('done', 'Done'), ('failed', 'Failed')], default='queued', max_length=16)),
                ('attempts', models.PositiveSmallIntegerField(default=0)),
                ('max_attempts', models.PositiveSmallIntegerField(default=4)),
                ('last_error', models.TextField(blank=True, default='')),
                ('messages_flushed', models.PositiveIntegerField(default=0)),
                ('worker', models.CharField(blank=True, default='', max_length=64)),
                ('lease_until', models.DateTimeField(blank=True, null=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('next_attempt_at', models.DateTimeField(auto_now_add=True)),
                ('started_at', models.DateTimeField(blank=True, null=True)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('session', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='memory.session')),
                ('user', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='flush_jobs', to='memory.user')),
            ],
            options={
                'ordering': ['priority', 'created_at', 'id'],
                'indexes': [models.Index(condition=models.Q(('state__in', ['queued', 'retrying'])), fields=['priority', 'created_at', 'id'], name='buffers_job_runnable'), models.Index(fields=['state', 'finished_at'], name='buffers_job_state')],
                'constraints': [models.UniqueConstraint(condition=models.Q(('session__isnull', True), ('state__in', ['queued', 'retrying'])), fields=('user',), name='buffers_one_waiting_job_per_user')],
            },
        ),
    ]
