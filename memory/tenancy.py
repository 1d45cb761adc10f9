"""Who a request acts for: the ``Principal`` an API key resolves to, with a short cache.

A key resolves with at most one indexed lookup (``ApiKey.prefix`` is unique), and resolved
keys are kept in a per-process TTL cache (``API_KEY_CACHE_SECONDS``, default 10 s) so the add
path usually pays no query at all. Revoking a key through ``memory.services.api_keys.api_key_revoke``
drops it (and the keys it created, revoked with it) from this process's cache at once; another process may still accept it for up to
``API_KEY_CACHE_SECONDS`` (the cross-process staleness bound). Expiry is checked on every
request, cached or not.

A WebSocket authenticates once, when it opens; ``still_usable`` re-checks its key on every
frame against a second TTL cache keyed by the key's prefix (the key itself is not kept on
the connection), so a revoked or expired key stops an open socket within the same bound.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime

from cachetools import TTLCache
from django.conf import settings
from django.utils import timezone

from memory.models import ApiKey, KeyScope


@dataclass(frozen=True)
class Principal:
    """The caller of a request: an API key's id, scope and owner.

    ``tenant_id`` is ``None`` only for operator keys; ``user_id`` is set only for user keys,
    which see that one user's data (and their tenant's agents, read-only).
    """

    key_id: str  # the key's prefix: its public id
    scope: str
    tenant_id: uuid.UUID | None
    user_id: uuid.UUID | None = None
    expires_at: datetime | None = None

    @property
    def is_operator(self) -> bool:
        return self.scope == KeyScope.OPERATOR

    @property
    def is_user_key(self) -> bool:
        return self.scope == KeyScope.USER

    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @classmethod
    def of(cls, api_key: ApiKey) -> Principal:
        return cls(
            key_id=api_key.prefix,
            scope=api_key.scope,
            tenant_id=api_key.tenant_id,
            user_id=api_key.user_id,
            expires_at=api_key.expiry_date,
        )


_cache: TTLCache = TTLCache(maxsize=settings.MEMFUSE["API_KEY_CACHE_SIZE"], ttl=settings.MEMFUSE["API_KEY_CACHE_SECONDS"])
_cache_lock = threading.Lock()  # cachetools caches are not thread-safe
# key_id -> whether the key's row still exists unrevoked (for already authenticated sockets).
_live: TTLCache = TTLCache(maxsize=settings.MEMFUSE["API_KEY_CACHE_SIZE"], ttl=settings.MEMFUSE["API_KEY_CACHE_SECONDS"])


def _cache_key(key: str) -> str:
    # Keyed by a digest, so the process never holds presented keys in clear.
    return hashlib.sha256(key.encode()).hexdigest()


# Where the ASGI application puts the principal it resolved for an HTTP request
# (``memory.api.auth.HTTPAuthMiddleware``), so that the view does not resolve the key again.
PRINCIPAL_SCOPE_KEY = "memfuse.principal"


def resolve_cached(key: str | None) -> Principal | None:
    """``resolve_key`` without a query: the principal of ``key`` when this process has it cached
    and unexpired, else ``None`` (then ``resolve_key`` decides). Safe on an event loop."""
    if not key:
        return None
    with _cache_lock:
        principal = _cache.get(_cache_key(key))
    return None if principal is None or principal.expired() else principal


def resolve_key(key: str | None) -> Principal | None:
    """The principal of the API key ``key``; ``None`` when it is missing, unknown, wrong, revoked or expired."""
    if not key:
        return None
    digest = _cache_key(key)
    with _cache_lock:
        principal = _cache.get(digest)
    if principal is None:
        try:
            # One query: the unique prefix index, then a constant-time SHA-512 comparison.
            api_key = ApiKey.objects.get_from_key(key)
        except ApiKey.DoesNotExist:
            return None  # not cached: a wrong key must never shadow a right one
        principal = Principal.of(api_key)
        with _cache_lock:
            _cache[digest] = principal
    return None if principal.expired() else principal


def still_usable(principal: Principal) -> bool:
    """Whether the key ``principal`` was resolved from is still unexpired and unrevoked.

    For a connection that authenticated earlier (a WebSocket): at most one indexed query per
    key per ``API_KEY_CACHE_SECONDS``, none while the answer is cached. May query: call it
    from a worker thread.
    """
    if principal.expired():
        return False
    with _cache_lock:
        live = _live.get(principal.key_id)
    if live is None:
        live = ApiKey.objects.filter(prefix=principal.key_id, revoked=False).exists()
        with _cache_lock:
            _live[principal.key_id] = live
    return live


def forget_key(key_id: str) -> None:
    """Drop the key whose prefix is ``key_id`` from this process's caches (after a revocation)."""
    forget_keys([key_id])


def forget_keys(key_ids) -> None:
    """Drop the keys whose prefixes are ``key_ids`` from this process's caches: one pass over
    the cache, however many keys (a key revoked with its descendants)."""
    key_ids = set(key_ids)
    if not key_ids:
        return
    with _cache_lock:
        for key_id in key_ids:
            _live.pop(key_id, None)
        for digest, principal in list(_cache.items()):
            if principal.key_id in key_ids:
                _cache.pop(digest, None)


def clear_cache() -> None:
    """Forget every resolved key of this process (tests)."""
    with _cache_lock:
        _cache.clear()
        _live.clear()
