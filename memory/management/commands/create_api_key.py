"""``manage.py create_api_key``: another API key for a tenant, one of its users, or operators."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from memory.errors import ServiceError
from memory.models import KeyScope, Tenant, User
from memory.services.api_keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key and print it (shown once). Scopes: tenant (default), user, operator."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", help="the tenant's name (tenant and user keys)")
        parser.add_argument("--user", help="the user's name in --tenant (user keys)")
        parser.add_argument("--scope", choices=KeyScope.values, help="default: user with --user, else tenant")
        parser.add_argument("--name", default="", help="a label for the key (at most 50 characters)")
        parser.add_argument("--expires-in", type=float, metavar="DAYS", help="expire after this many days")
        parser.add_argument("--quiet", action="store_true", help="print only the key")

    def handle(self, *args, **options):
        scope = options["scope"] or (KeyScope.USER if options["user"] else KeyScope.TENANT)
        tenant = user = None
        if scope in (KeyScope.TENANT, KeyScope.USER):
            if not options["tenant"]:
                raise CommandError(f"--tenant is required for a {scope} key")
            tenant = Tenant.objects.filter(name=options["tenant"]).first()
            if tenant is None:
                raise CommandError(f"--tenant: no tenant named '{options['tenant']}'")
        elif options["tenant"] or options["user"]:
            raise CommandError("--tenant/--user: an operator key belongs to no tenant")
        if scope == KeyScope.USER:
            if not options["user"]:
                raise CommandError("--user is required for a user key")
            user = User.objects.filter(tenant=tenant, name=options["user"]).first()
            if user is None:
                raise CommandError(f"--user: tenant '{tenant.name}' has no user named '{options['user']}'")
        elif options["user"]:
            raise CommandError(f"--user: a {scope} key is not bound to a user (use --scope user)")
        expires_at = None
        if options["expires_in"] is not None:
            if options["expires_in"] <= 0:
                raise CommandError("--expires-in: must be a positive number of days")
            expires_at = timezone.now() + timedelta(days=options["expires_in"])
        try:
            api_key, key = api_key_create(
                scope=scope,
                name=options["name"] or f"{scope} key",
                tenant=None if user is not None else tenant,
                user=user,
                expires_at=expires_at,
            )
        except ServiceError as exc:
            raise CommandError(f"--{exc.errors[0]['field'] or 'scope'}: {exc.message}") from None
        if options["quiet"]:
            self.stdout.write(key)
            return
        expiry = f", expires {expires_at.isoformat()}" if expires_at else ""
        self.stdout.write(f"API key ({scope} scope, id {api_key.prefix}{expiry}); store it now, it is not shown again:")
        self.stdout.write(key)
