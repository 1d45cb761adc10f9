"""``manage.py create_tenant <name>``: a new tenant and its first (tenant-scope) API key."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from memory.errors import ServiceError
from memory.models import KeyScope
from memory.services.api_keys import api_key_create
from memory.services.tenants import tenant_create


class Command(BaseCommand):
    help = "Create a tenant (a client application) and print its first API key (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the tenant's name (unique)")
        parser.add_argument("--quiet", action="store_true", help="print only the key")

    def handle(self, *args, name: str, quiet: bool, **options):
        try:
            with transaction.atomic():
                tenant = tenant_create(name=name)
                api_key, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="first key")
        except ServiceError as exc:
            raise CommandError(f"{exc.errors[0]['field'] or 'name'}: {exc.message}") from None
        if quiet:
            self.stdout.write(key)
            return
        self.stdout.write(f"Tenant '{tenant.name}' created ({tenant.pk}).")
        self.stdout.write(f"API key (tenant scope, id {api_key.prefix}); store it now, it is not shown again:")
        self.stdout.write(key)
