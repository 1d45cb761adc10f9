"""Authentication hook shared by the REST API and WebSocket connections.

Today the service is open: every request is served. Tenants and API keys (``Authorization:
Bearer <key>``) plug in here: ``authenticate_bearer`` resolves a key to a principal, and both
the DRF authentication class and the WebSocket middleware call it.
"""

from __future__ import annotations

from channels.middleware import BaseMiddleware


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


def authenticate_bearer(token: str | None) -> dict:
    """The principal a request acts as. Open service: everyone is the anonymous principal."""
    return {"kind": "anonymous", "token_present": token is not None}


class WebSocketAuthMiddleware(BaseMiddleware):
    """Puts ``scope["principal"]`` on WebSocket connections, from the same hook as REST."""

    async def __call__(self, scope, receive, send):
        scope = dict(scope, principal=authenticate_bearer(bearer_token(scope.get("headers", []))))
        return await super().__call__(scope, receive, send)


def is_operator(request) -> bool:
    """Whether ``request`` (a Django ``HttpRequest`` or a DRF ``Request``) may see operator figures.

    Today: an authenticated, active staff user of a Django session (the admin login).
    Operator-scope API keys plug in here when tenants and keys arrive.
    """
    django_request = getattr(request, "_request", request)  # DRF wraps Django's request
    user = getattr(django_request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


def is_authenticated(request) -> bool:
    """Whether ``request`` carries any credentials: a session user or a bearer token."""
    django_request = getattr(request, "_request", request)
    user = getattr(django_request, "user", None)
    return bool(user is not None and user.is_authenticated) or bearer_token(dict(django_request.headers)) is not None
