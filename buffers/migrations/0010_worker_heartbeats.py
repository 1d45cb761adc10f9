from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('buffers', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='WorkerProcess',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=64, unique=True)),
                ('hostname', models.CharField(max_length=255)),
                ('pid', models.PositiveIntegerField()),
                ('started_at', models.DateTimeField(auto_now_add=True)),
                ('heartbeat_at', models.DateTimeField()),
            ],
        ),
        migrations.AddField(
            model_name='flushjob',
            name='claim_token',
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='flushjob',
            name='process',
            field=models.CharField(blank=True, db_default='', default='', max_length=64),
        ),
    ]
