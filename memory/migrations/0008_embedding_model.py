from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0007_incremental_retrieval'),
    ]

    operations = [
        migrations.CreateModel(
            name='EmbeddingModel',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=255)),
                ('path', models.TextField()),
                ('dimension', models.PositiveIntegerField()),
                ('state', models.CharField(choices=[('building', 'Building'), ('active', 'Active'), ('retired', 'Retired')], default='building', max_length=16)),
                ('phase', models.CharField(blank=True, default='', max_length=32)),
                ('done', models.BigIntegerField(default=0)),
                ('total', models.BigIntegerField(default=0)),
                ('texts_per_second', models.FloatField(blank=True, null=True)),
                ('raw_texts_per_second', models.FloatField(blank=True, null=True)),
                ('start_seq', models.BigIntegerField(default=0)),
                ('started_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('activated_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'ordering': ['-started_at'],
                'constraints': [models.UniqueConstraint(condition=models.Q(('state', 'active')), fields=('state',), name='memory_embeddingmodel_one_active'), models.UniqueConstraint(condition=models.Q(('state', 'building')), fields=('state',), name='memory_embeddingmodel_one_building')],
            },
        ),
    ]
