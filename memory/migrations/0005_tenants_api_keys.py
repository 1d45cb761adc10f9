"""Tenants own users and agents; API keys. Existing users and agents move to a tenant "default".

Names become unique per tenant. The tenant column is added nullable, filled, then made NOT NULL,
so a database with rows migrates in place.
"""

import django.db.models.deletion
import uuid
from django.db import migrations, models


DEFAULT_TENANT = "default"


def adopt_existing_rows(apps, schema_editor):
    """Give the rows that predate tenants to a tenant created here (only when there are some)."""
    Tenant, User, Agent = (apps.get_model("memory", name) for name in ("Tenant", "User", "Agent"))
    if not (User.objects.filter(tenant__isnull=True).exists() or Agent.objects.filter(tenant__isnull=True).exists()):
        return
    tenant, _ = Tenant.objects.get_or_create(name=DEFAULT_TENANT)
    User.objects.filter(tenant__isnull=True).update(tenant=tenant)
    Agent.objects.filter(tenant__isnull=True).update(tenant=tenant)


class Migration(migrations.Migration):

    dependencies = [
        ("memory", "0004_session_next_position"),
    ]

    operations = [
        migrations.CreateModel(
            name='ApiKey',
            fields=[
                ('id', models.CharField(editable=False, max_length=150, primary_key=True, serialize=False, unique=True)),
                ('prefix', models.CharField(editable=False, max_length=8, unique=True)),
                ('hashed_key', models.CharField(editable=False, max_length=150)),
                ('created', models.DateTimeField(auto_now_add=True, db_index=True)),
                ('name', models.CharField(default=None, help_text='A free-form name for the API key. Need not be unique. 50 characters max.', max_length=50)),
                ('revoked', models.BooleanField(blank=True, default=False, help_text='If the API key is revoked, clients cannot use it anymore. (This cannot be undone.)')),
                ('expiry_date', models.DateTimeField(blank=True, help_text='Once API key expires, clients cannot use it anymore.', null=True, verbose_name='Expires')),
                ('scope', models.CharField(choices=[('tenant', 'Tenant'), ('user', 'User'), ('operator', 'Operator')], default='tenant', max_length=16)),
            ],
            options={
                'verbose_name': 'API key',
                'verbose_name_plural': 'API keys',
                'ordering': ('-created',),
                'abstract': False,
            },
        ),
        migrations.CreateModel(
            name='Tenant',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('name', models.CharField(max_length=255, unique=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'ordering': ['created_at'],
            },
        ),
        migrations.RemoveConstraint(
            model_name='agent',
            name='memory_agent_name_unique',
        ),
        migrations.RemoveConstraint(
            model_name='user',
            name='memory_user_name_unique',
        ),
        migrations.AddField(
            model_name='apikey',
            name='user',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='api_keys', to='memory.user'),
        ),
        migrations.AddField(
            model_name='apikey',
            name='tenant',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='api_keys', to='memory.tenant'),
        ),
        migrations.AddField(
            model_name='agent',
            name='tenant',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE, related_name='agents', to='memory.tenant'),
        ),
        migrations.AddField(
            model_name='user',
            name='tenant',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE, related_name='users', to='memory.tenant'),
        ),
        migrations.RunPython(adopt_existing_rows, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='agent',
            name='tenant',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='agents', to='memory.tenant'),
        ),
        migrations.AlterField(
            model_name='user',
            name='tenant',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='users', to='memory.tenant'),
        ),
        migrations.AddConstraint(
            model_name='agent',
            constraint=models.UniqueConstraint(fields=('tenant', 'name'), name='memory_agent_tenant_name_unique'),
        ),
        migrations.AddConstraint(
            model_name='user',
            constraint=models.UniqueConstraint(fields=('tenant', 'name'), name='memory_user_tenant_name_unique'),
        ),
        migrations.AddConstraint(
            model_name='apikey',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('scope', 'tenant'), ('tenant__isnull', False), ('user__isnull', True)), models.Q(('scope', 'user'), ('tenant__isnull', False), ('user__isnull', False)), models.Q(('scope', 'operator'), ('tenant__isnull', True), ('user__isnull', True)), _connector='OR'), name='memory_apikey_scope_owner'),
        ),
    ]
