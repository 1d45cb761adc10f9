"""API keys record the user key that created them (``ApiKey.parent``).

A key made by a user key over REST is revoked with it and expires no later than it
(``memory.services.api_key_create``, ``api_key_revoke``). Existing keys have no parent.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('memory', '0010_ann_copies'),
    ]

    operations = [
        migrations.AddField(
            model_name='apikey',
            name='parent',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='children', to='memory.apikey'),
        ),
    ]
