"""API-key authentication shared by the REST API and WebSocket connections, and rate limits.

Every REST request but ``GET /api/v1/health`` carries ``Authorization: Bearer <key>`` (the
header the ``memfuse`` client sends). ``memory.tenancy.resolve_key`` turns a key into a
``Principal``; ``ApiKeyAuthentication`` (DRF) and ``WebSocketAuthMiddleware`` (Channels) both
call it. A missing, unknown, revoked or expired key is a 401.

Browsers cannot set headers on a WebSocket, so a socket may also offer the key as a
subprotocol: ``new WebSocket(url, ["memfuse", "bearer.<key>"])``; the server then accepts
with the ``memfuse`` subprotocol (never echoing the key). A subprotocol rather than
``?api_key=``: query strings are written to access logs and proxies' logs, headers are not.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.conf import settings
from django_ratelimit.core import get_usage
from rest_framework import authentication, exceptions, permissions, throttling

from memfuse_project.pool import is_database_unavailable, is_pool_exhausted
from memory.errors import RateLimited
from memory.tenancy import Principal, resolve_key

WS_SUBPROTOCOL = "memfuse"
WS_KEY_SUBPROTOCOL_PREFIX = "bearer."


def bearer_token(headers: list[tuple[bytes, bytes]] | dict) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        if name.lower() == "authorization":
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def subprotocol_token(subprotocols: list[str]) -> str | None:
    """The key offered as a ``bearer.<key>`` WebSocket subprotocol, or ``None``."""
    for protocol in subprotocols:
        if protocol.startswith(WS_KEY_SUBPROTOCOL_PREFIX):
            return protocol[len(WS_KEY_SUBPROTOCOL_PREFIX) :] or None
    return None


def authenticate_bearer(token: str | None) -> Principal | None:
    """The principal of ``token``; ``None`` when there is none or it is not a usable key."""
    return resolve_key(token)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """DRF authentication by ``Authorization: Bearer <key>``: ``request.auth`` is the ``Principal``.

    No header: not authenticated (the permission then answers 401). A header with a key
    that does not resolve: 401 at once.
    """

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        token = bearer_token({"authorization": header})
        principal = authenticate_bearer(token)
        if principal is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key")
        return None, principal  # no Django user: the key is the identity

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) to a request without a key.
        return 'Bearer realm="api"'


class HasTenantKey(permissions.BasePermission):
    """A tenant or user key. Operator keys are refused (403): they see no tenant's data."""

    message = "An API key is required: Authorization: Bearer <key>"

    def has_permission(self, request, view) -> bool:
        principal = request.auth
        if not isinstance(principal, Principal):
            return False
        if principal.tenant_id is None:
            raise exceptions.PermissionDenied("Operator keys cannot access tenant data")
        return True


def is_operator(request) -> bool:
    """Whether ``request`` comes from an operator: a staff user's admin session, or an operator key.

    ``request`` is a DRF ``Request`` (or a Django ``HttpRequest``); authentication must have run.
    """
    if isinstance(getattr(request, "auth", None), Principal) and request.auth.is_operator:
        return True
    django_request = getattr(request, "_request", request)
    user = getattr(django_request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


def rate_usage(principal: Principal) -> dict | None:
    """Count one request of ``principal``'s key against ``API_RATE_LIMIT``; django-ratelimit's usage
    (``should_limit``, ``time_left``...), ``None`` when rate limits are off.

    REST requests (``ApiKeyRateThrottle``) and WebSocket connects and frames
    (``check_rate``) share the key's counter: a key has one budget however it is used.
    """
    return get_usage(
        None,
        group="api_key",
        key=lambda group, request: principal.key_id,
        rate=settings.MEMFUSE["API_RATE_LIMIT"],  # read per request, so tests can change it
        increment=True,
    )


def check_rate(principal: Principal) -> None:
    """Count one WebSocket connect or frame; ``RateLimited`` (429) past ``API_RATE_LIMIT``. May
    block on the cache (Redis): call it from a worker thread."""
    usage = rate_usage(principal)
    if usage is not None and usage["should_limit"]:
        wait = max(int(usage["time_left"]), 1)
        raise RateLimited(f"Rate limit of the API key reached (API_RATE_LIMIT): retry in {wait} s", retry_after=wait)


class ApiKeyRateThrottle(throttling.BaseThrottle):
    """At most ``API_RATE_LIMIT`` requests per API key (``"<n>/<second|minute|hour|day>"``,
    default ``6000/minute``), in fixed windows of that period; past it, 429 with Retry-After
    (the seconds left in the window, at least 1).

    Counted by django-ratelimit (``get_usage``): one counter per key and window in Django's
    default cache, ``cache.add`` then ``cache.incr``: an atomic ``INCR`` in Redis (when
    ``REDIS_URL`` is set, shared by every process), under the cache's lock in the per-process
    ``LocMemCache``. Each key's windows start at their own offset (the library's jitter), so
    the keys' counters do not all reset at once. A fixed window lets a key send up to twice
    its limit across a window's edge.

    Not DRF's ``SimpleRateThrottle``: it keeps every request's timestamp of the last period
    in one cache value, read, unpickled, pickled and written back on every request (a list of
    up to 6,000 floats for one tenant key at the default limit, all of it on the web
    process's GIL), and two concurrent requests can both pass on the same history.
    """

    def allow_request(self, request, view) -> bool:
        if not isinstance(request.auth, Principal):
            return True  # no key, no limit here (the request is refused anyway)
        usage = rate_usage(request.auth)
        self.time_left = usage["time_left"] if usage else 0
        return usage is None or not usage["should_limit"]

    def wait(self) -> float:
        return max(self.time_left, 1)


class WebSocketAuthMiddleware(BaseMiddleware):
    """Puts ``scope["principal"]`` (a ``Principal`` or ``None``) on WebSocket connections.

    The key comes from the ``Authorization`` header, else from a ``bearer.<key>`` subprotocol.
    Resolving may query the database, so it runs in a worker thread. When the database cannot
    answer (pool exhausted, unreachable), ``scope["principal_error"]`` holds the exception: the
    consumer refuses the socket with a 503 frame rather than crashing the handshake.
    """

    async def __call__(self, scope, receive, send):
        token = bearer_token(scope.get("headers", [])) or subprotocol_token(scope.get("subprotocols", []))
        try:
            principal = await database_sync_to_async(authenticate_bearer, thread_sensitive=False)(token)
        except Exception as exc:
            if not (is_pool_exhausted(exc) or is_database_unavailable(exc)):
                raise
            scope = dict(scope, principal=None, principal_error=exc)
        else:
            scope = dict(scope, principal=principal)
        return await super().__call__(scope, receive, send)


def is_authenticated(request) -> bool:
    """Whether ``request`` carries any credentials: a session user or a bearer token."""
    django_request = getattr(request, "_request", request)
    user = getattr(django_request, "user", None)
    return bool(user is not None and user.is_authenticated) or bearer_token(dict(django_request.headers)) is not None
