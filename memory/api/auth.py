"""API-key authentication shared by the REST API and WebSocket connections, and rate limits.

Every REST request but ``GET /api/v1/health`` carries ``Authorization: Bearer <key>`` (the
header the ``memfuse`` client sends). ``memory.tenancy.resolve_key`` turns a key into a
``Principal``; ``ApiKeyAuthentication`` (DRF) and ``WebSocketAuthMiddleware`` (Channels) both
call it. A missing, unknown, revoked or expired key is a 401.

Under ASGI, ``HTTPAuthMiddleware`` resolves the key of every HTTP request to ``/api/`` (but the
health check and the schema pages) and ``/mcp`` before the application reads any of its body:
without a usable key the request costs one header parse (and at most one indexed query), never
its body. The principal rides on the ASGI scope to ``ApiKeyAuthentication``.

Rate limits: every request of a key counts against its ``API_RATE_LIMIT`` and against its
tenant's ``API_TENANT_RATE_LIMIT`` (``rate_usage``), REST, WebSocket and MCP alike.

Browsers cannot set headers on a WebSocket, so a socket may also offer the key as a
subprotocol: ``new WebSocket(url, ["memfuse", "bearer.<key>"])``; the server then accepts
with the ``memfuse`` subprotocol (never echoing the key). A subprotocol rather than
``?api_key=``: query strings are written to access logs and proxies' logs, headers are not.
"""

from __future__ import annotations

import math
import re
import threading
import time

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.conf import settings
from django_ratelimit.core import get_usage
from rest_framework import authentication, exceptions, permissions, throttling

from memory.api.errors import answer_body, error_body, send_json
from memory.errors import RateLimited, Unauthenticated, error_for
from memory.tenancy import PRINCIPAL_SCOPE_KEY, Principal, resolve_cached, resolve_key
from runtime.pool import is_database_unavailable, is_pool_exhausted

WS_SUBPROTOCOL = "memfuse"
WS_KEY_SUBPROTOCOL_PREFIX = "bearer."
NO_KEY_MESSAGE = "An API key is required: Authorization: Bearer <key>"


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
        # Resolved by HTTPAuthMiddleware from this request's own header (ASGI requests only).
        principal = getattr(request._request, "scope", {}).get(PRINCIPAL_SCOPE_KEY)
        if isinstance(principal, Principal):
            return None, principal
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

    message = NO_KEY_MESSAGE

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


def _count(group: str, value: str, rate: str) -> dict | None:
    return get_usage(None, group=group, key=lambda group, request: value, rate=rate, increment=True)


def rate_usage(principal: Principal) -> dict | None:
    """Count one request of ``principal`` against its key's ``API_RATE_LIMIT`` and, for a
    tenant's key (tenant or user scope), against its tenant's ``API_TENANT_RATE_LIMIT``.

    Returns django-ratelimit's usage (``should_limit``, ``time_left``, ...) with ``setting``,
    the name of the budget it is: the tenant's when that one refuses the request, else the
    key's; ``None`` when rate limits are off. A request its key's budget refuses is not
    counted against the tenant's, so a key that keeps knocking after its 429s does not use up
    its tenant's other keys' budget.

    REST requests (``ApiKeyRateThrottle``), WebSocket connects and frames and MCP requests
    (``check_rate``) share the counters: a key has one budget however it is used, and all the
    keys of a tenant one more, so that creating keys does not multiply a budget.
    """
    # Rates read per request, so tests can change them.
    usage = _count("api_key", principal.key_id, settings.MEMFUSE["API_RATE_LIMIT"])
    if usage is None:
        return None
    usage = {**usage, "setting": "API_RATE_LIMIT"}
    if usage["should_limit"] or principal.tenant_id is None:
        return usage
    tenant_usage = _count("api_tenant", str(principal.tenant_id), settings.MEMFUSE["API_TENANT_RATE_LIMIT"])
    if tenant_usage is not None and tenant_usage["should_limit"]:
        return {**tenant_usage, "setting": "API_TENANT_RATE_LIMIT"}
    return usage


def check_rate(principal: Principal) -> None:
    """Count one request, WebSocket connect or frame of ``principal``; ``RateLimited`` (429, with
    the seconds left in the window as ``retry_after``) past its key's ``API_RATE_LIMIT`` or its
    tenant's ``API_TENANT_RATE_LIMIT``. May block on the cache (Redis): call it from a worker
    thread. A refusal is remembered until its window ends (``known_refusal``)."""
    usage = rate_usage(principal)
    if usage is not None and usage["should_limit"]:
        _remember_refusal(principal, usage["setting"], usage["time_left"])
        raise _rate_limited(usage["setting"], usage["time_left"])


def _rate_limited(setting: str, seconds_left: float) -> RateLimited:
    wait = max(math.ceil(seconds_left), 1)
    whose = "the API key" if setting == "API_RATE_LIMIT" else "the tenant (all its keys)"
    return RateLimited(f"Rate limit of {whose} reached ({setting}): retry in {wait} s", retry_after=wait)


# Budgets a rate limit has refused, until their window ends: {("key"|"tenant", id): (monotonic
# end, setting)}. In a fixed window a count only grows, so a budget once past its limit
# stays past it until the window resets: requests of it meanwhile need not run a view to learn
# it. Pruned of ended windows as it grows; at most one entry per key and tenant seen refused.
_refusals: dict[tuple[str, str], tuple[float, str]] = {}
_refusals_lock = threading.Lock()
_REFUSALS_PRUNE_AT = 1024


def _budgets(principal: Principal) -> list[tuple[str, str]]:
    """The budgets ``principal`` counts against: its key's, and its tenant's (if any)."""
    budgets = [("key", principal.key_id)]
    if principal.tenant_id is not None:
        budgets.append(("tenant", str(principal.tenant_id)))
    return budgets


def _remember_refusal(principal: Principal, setting: str, time_left: float) -> None:
    budget = _budgets(principal)[0 if setting == "API_RATE_LIMIT" else 1]
    now = time.monotonic()
    with _refusals_lock:
        if len(_refusals) >= _REFUSALS_PRUNE_AT:
            for ended in [name for name, (until, _) in _refusals.items() if until <= now]:
                del _refusals[ended]
        _refusals[budget] = (now + time_left, setting)


def known_refusal(principal: Principal) -> RateLimited | None:
    """The ``RateLimited`` that ``check_rate`` would raise for ``principal`` without counting
    anything, when this process saw its key's (or its tenant's) budget refused in a window that
    has not ended; else ``None``. No I/O: the ASGI middleware asks it on the event loop."""
    now = time.monotonic()
    for budget in _budgets(principal):
        refusal = _refusals.get(budget)
        if refusal is not None and refusal[0] > now:
            return _rate_limited(refusal[1], refusal[0] - now)
    return None


def forget_refusals() -> None:
    """Forget every remembered refusal (a rate limit was changed; tests)."""
    with _refusals_lock:
        _refusals.clear()


class ApiKeyRateThrottle(throttling.BaseThrottle):
    """At most ``API_RATE_LIMIT`` requests per API key and ``API_TENANT_RATE_LIMIT`` per tenant
    (``"<n>/<second|minute|hour|day>"``, defaults ``6000/minute`` and five times that), in
    fixed windows of that period; past either, 429 with Retry-After (the seconds left in the
    window, at least 1) and a message naming the setting (``check_rate``'s ``RateLimited``).

    Counted by django-ratelimit (``get_usage``): one counter per key (and per tenant) and
    window in Django's default cache, ``cache.add`` then ``cache.incr``: an atomic ``INCR`` in
    Redis (when ``REDIS_URL`` is set, shared by every process), under the cache's lock in the
    per-process ``LocMemCache``. Each counter's windows start at their own offset (the
    library's jitter), so the keys' counters do not all reset at once. A fixed window lets a
    key send up to twice its limit across a window's edge.

    Not DRF's ``SimpleRateThrottle``: it keeps every request's timestamp of the last period
    in one cache value, read, unpickled, pickled and written back on every request (a list of
    up to 6,000 floats for one tenant key at the default limit, all of it on the web
    process's GIL), and two concurrent requests can both pass on the same history.
    """

    def allow_request(self, request, view) -> bool:
        if isinstance(request.auth, Principal):
            check_rate(request.auth)  # raises RateLimited: the one 429 of every interface
        return True  # no key, no limit here (the request is refused anyway)


# --- HTTP: no key, no body read --------------------------------------------------------------

# /api/ paths that answer without a key: the health check (GET), the OpenAPI schema, its docs pages.
_HEALTH_PATH = re.compile(r"^/api/v1/health/?$")
_OPEN_API_PATHS = ("/api/schema/", "/api/docs/", "/api/redoc/")
MCP_PATH = "/mcp"


def needs_key(scope) -> bool:
    """Whether the HTTP request of ``scope`` must carry a usable key: ``/api/`` but the health
    check and the schema pages, and ``/mcp``."""
    path = scope["path"]
    if path.startswith(MCP_PATH):
        return True
    if not path.startswith("/api/") or path.startswith(_OPEN_API_PATHS):
        return False
    return not (_HEALTH_PATH.match(path) and scope["method"] in ("GET", "HEAD"))


def may_have_body(scope) -> bool:
    """Whether the HTTP request of ``scope`` announces a body (a non-zero ``Content-Length``, or chunked)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class HTTPAuthMiddleware:
    """ASGI middleware: an HTTP request to ``/api/`` (but ``GET /api/v1/health`` and the schema
    pages) or ``/mcp`` without a usable key is answered 401, in the error envelope, before any
    of its body is read, whatever its ``Content-Length`` or chunked body; the connection is then
    closed, so that the server does not read the body to keep it alive either.

    A key this process has cached is checked on the event loop; any other is resolved in a
    worker thread (``resolve_key`` may query). When the database cannot answer (pool exhausted,
    unreachable), the request gets the 503 with ``Retry-After`` that ``error_for`` gives. A
    request with a usable key goes on with its ``Principal`` in ``scope[PRINCIPAL_SCOPE_KEY]``,
    where ``ApiKeyAuthentication`` and ``memory.api.limits.BodySizeLimit`` find it. Operator
    keys pass: the views refuse them where they see no tenant data.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not needs_key(scope):
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers", []))
        try:
            principal = resolve_cached(token)
            if principal is None and token:
                principal = await database_sync_to_async(authenticate_bearer, thread_sensitive=False)(token)
        except Exception as exc:
            if not (is_pool_exhausted(exc) or is_database_unavailable(exc)):
                raise
            answer = error_for(exc)
            return await send_json(send, answer.status, answer_body(answer), answer.headers, close=may_have_body(scope))
        if principal is None:
            realm = "mcp" if scope["path"].startswith(MCP_PATH) else "api"
            message = NO_KEY_MESSAGE if token is None and realm == "api" else Unauthenticated.default_message
            headers = {"WWW-Authenticate": f'Bearer realm="{realm}"'}
            return await send_json(send, 401, error_body(401, message), headers, close=may_have_body(scope))
        return await self.app({**scope, PRINCIPAL_SCOPE_KEY: principal}, receive, send)


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
