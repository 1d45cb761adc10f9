"""API keys: create (with the per-user limit and parent keys) and revoke (with descendants)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memory import tenancy
from memory.errors import Conflict, Forbidden, InvalidInput, Unauthenticated
from memory.models import ApiKey, KeyScope, Tenant, User


def api_key_create(
    *,
    scope: str,
    name: str,
    tenant: Tenant | None = None,
    user: User | None = None,
    expires_at: datetime | None = None,
    created_by: tenancy.Principal | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key; returns ``(row, key)``. The key (``<prefix>.<secret>``) is never stored.

    ``scope`` ``"tenant"`` needs ``tenant``; ``"user"`` needs ``user`` (its tenant is the
    user's); ``"operator"`` takes neither. Raises ``InvalidInput`` naming the wrong field.

    A user has at most ``MAX_API_KEYS_PER_USER`` live (unrevoked, unexpired) user keys: past
    it, ``Conflict`` naming the limit. ``created_by``, the principal of the request that asks
    for the key: when it is a user key, the new key is its child (``ApiKey.parent``), for the
    same user only (``Forbidden`` otherwise), and expires no later than it: no ``expires_at``
    takes the parent's, a later one is refused (``InvalidInput`` naming ``expires_at``). A
    parent revoked meanwhile is ``Unauthenticated``. Counting, the parent's check and the
    insert are serialised per user with ``api_key_revoke``, so concurrent requests can neither
    pass the limit nor make a child that outlives a revocation.
    """
    if scope not in KeyScope.values:
        raise InvalidInput(f"scope must be one of {', '.join(KeyScope.values)}", field="scope")
    if scope == KeyScope.USER:
        if user is None:
            raise InvalidInput("A user key needs a user", field="user")
        tenant = user.tenant
    elif user is not None:
        raise InvalidInput(f"A {scope} key is not bound to a user", field="user")
    if scope == KeyScope.TENANT and tenant is None:
        raise InvalidInput("A tenant key needs a tenant", field="tenant")
    if scope == KeyScope.OPERATOR and tenant is not None:
        raise InvalidInput("An operator key belongs to no tenant", field="tenant")
    if not name or len(name) > 50:
        raise InvalidInput("A key name must have 1 to 50 characters", field="name")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future", field="expires_at")
    child = created_by is not None and created_by.is_user_key
    if child and (scope != KeyScope.USER or created_by.user_id != user.pk):
        raise Forbidden("A user key creates keys for its own user only")
    if scope != KeyScope.USER:
        return ApiKey.objects.create_key(scope=scope, name=name, tenant=tenant, user=user, expiry_date=expires_at)
    with transaction.atomic():
        _lock_user_keys(user.pk)
        parent = None
        if child:
            parent = ApiKey.objects.filter(prefix=created_by.key_id).first()
            if parent is None or parent.revoked or parent.has_expired:
                raise Unauthenticated()
            if parent.expiry_date is not None:
                if expires_at is None:
                    expires_at = parent.expiry_date
                elif expires_at > parent.expiry_date:
                    raise InvalidInput(
                        f"expires_at must not be later than the expiry of the key that creates it ({parent.expiry_date.isoformat()})",
                        field="expires_at",
                    )
        limit = settings.MEMFUSE["MAX_API_KEYS_PER_USER"]
        live = ApiKey.objects.filter(user=user, revoked=False).exclude(expiry_date__lte=timezone.now()).count()
        if live >= limit:
            raise Conflict(
                f"User '{user.name}' has {live} live API keys, the most allowed (MAX_API_KEYS_PER_USER={limit}): revoke one first"
            )
        return ApiKey.objects.create_key(scope=scope, name=name, tenant=tenant, user=user, expiry_date=expires_at, parent=parent)


def _lock_user_keys(user_id: uuid.UUID) -> None:
    """Take the transaction-level advisory lock on ``user_id``'s keys (creations and revocations
    take turns). Not the user row: an add holds that, and keys have nothing to do with adds."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"memory_apikey:{user_id}"])


# A key and its descendants (the keys it created, the keys they created, ...), revoked at once.
_REVOKE_TREE_SQL = """
WITH RECURSIVE tree AS (
    SELECT id FROM memory_apikey WHERE id = %s
    UNION
    SELECT child.id FROM memory_apikey child JOIN tree ON child.parent_id = tree.id
)
UPDATE memory_apikey SET revoked = true WHERE id IN (SELECT id FROM tree) RETURNING prefix
"""


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke ``api_key`` and its descendants for good, in one statement; this process forgets
    them at once, others within ``API_KEY_CACHE_SECONDS``.

    Under the user's key lock (``_lock_user_keys``), and in a statement after it: a child that a
    concurrent ``api_key_create`` committed while this waited is in the statement's snapshot.
    """
    with transaction.atomic():
        if api_key.user_id is not None:
            _lock_user_keys(api_key.user_id)
        with connection.cursor() as cursor:
            cursor.execute(_REVOKE_TREE_SQL, [api_key.pk])
            prefixes = [prefix for (prefix,) in cursor.fetchall()]
    api_key.revoked = True
    # Now, and again after the commit: a request between the two could re-cache a key from
    # the row as it was before this transaction.
    tenancy.forget_keys(prefixes)
    transaction.on_commit(lambda: tenancy.forget_keys(prefixes))
    return api_key
