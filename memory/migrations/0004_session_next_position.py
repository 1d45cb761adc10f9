from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("memory", "0003_write_behind"),
    ]

    operations = [
        migrations.AddField(
            model_name="session",
            name="next_position",
            field=models.PositiveIntegerField(default=0, editable=False),
        ),
        # Sessions with messages continue after their last position.
        migrations.RunSQL(
            "UPDATE memory_session AS s SET next_position = m.last + 1 "
            "FROM (SELECT session_id, max(position) AS last FROM memory_message GROUP BY session_id) AS m "
            "WHERE m.session_id = s.id",
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
