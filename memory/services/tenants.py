"""Tenants: create, and delete with everything they own."""

from __future__ import annotations

from django.db import transaction

from memory import tenancy
from memory.errors import InvalidInput
from memory.models import ApiKey, Tenant
from memory.services.common import _bump_memory_version, _create_unique


def tenant_create(*, name: str) -> Tenant:
    """Create a tenant. Raises ``InvalidInput`` for a blank name, ``Conflict`` (field ``name``) when taken."""
    name = name.strip()
    if not name or len(name) > 255:
        raise InvalidInput("A tenant name must have 1 to 255 characters", field="name")
    return _create_unique(Tenant, name=name)


def tenant_delete(*, tenant: Tenant) -> None:
    """Delete a tenant with its users, agents and API keys and, through them, every session,
    message, knowledge item and flush job, in one transaction.

    Lock order (docs/architecture.md): every user of the tenant ``FOR UPDATE``, in ascending id
    order (``_bump_memory_version``), before any of their rows. A flush writing one of them
    holds its user row ``FOR KEY SHARE``: the delete waits for that write to commit instead of
    locking message rows the flush is about to write (a deadlock). No tombstones: they belong
    to their user and go with it, and every read finds the user first. The users' cached
    memory and the tenant's keys are forgotten by this process on commit (other processes
    within ``API_KEY_CACHE_SECONDS``).
    """
    from memory.retrieval import cache

    with transaction.atomic():
        user_ids = sorted(tenant.users.values_list("pk", flat=True))
        for user_id in user_ids:
            _bump_memory_version(user_id)
        prefixes = list(ApiKey.objects.filter(tenant=tenant).values_list("prefix", flat=True))
        tenant.delete()

    def forget() -> None:
        for user_id in user_ids:
            cache.forget(user_id)
        for prefix in prefixes:
            tenancy.forget_key(prefix)

    transaction.on_commit(forget)
