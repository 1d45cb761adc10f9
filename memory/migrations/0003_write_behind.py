from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0002_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='claimed_until',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='message',
            name='flush_claim',
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='message',
            name='flush_count',
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name='message',
            name='flushed_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(condition=models.Q(('flushed_at__isnull', True)), fields=['user', 'updated_at'], name='memory_message_pending'),
        ),
        # Messages embedded before write-behind existed are flushed already.
        migrations.RunSQL(
            "UPDATE memory_message SET flushed_at = updated_at, flush_count = 1 WHERE embedding IS NOT NULL",
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
