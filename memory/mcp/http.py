"""MCP's Streamable HTTP transport at ``/mcp``, inside the project's ASGI application.

Every request carries ``Authorization: Bearer <key>``, the REST API's key, resolved by the
REST API's code (``memory.api.auth``): no key, or a key that does not resolve, is a 401 at
the transport, in the API's error envelope, before any MCP message is read; an operator key
is a 403; past the key's ``API_RATE_LIMIT`` (one budget with its REST requests and
WebSocket frames), a 429 with ``Retry-After``. The principal then rides on the ASGI scope
(``tools.PRINCIPAL_SCOPE_KEY``) to the tools.

Stateless (each POST is a whole exchange, answered with JSON rather than an SSE stream):
any process behind a load balancer can answer any request, as for REST, and no session
state outlives a request. The SDK's transport needs a task group for the life of the
process (it is started by the app's lifespan in a Starlette deployment); here one is
started per event loop on the first request, so it works whether or not the ASGI server
speaks lifespan (daphne and ``runserver`` do not). The SDK's DNS-rebinding check is off: it
guards servers that trust whoever can reach them, and every request here needs a key that
a browser never attaches by itself.

Transport: https://modelcontextprotocol.io/specification/2025-06-18/basic/transports#streamable-http
"""

from __future__ import annotations

import asyncio
import json
import weakref

from channels.db import database_sync_to_async
from mcp.server.transport_security import TransportSecuritySettings

from memory.api.auth import authenticate_bearer, bearer_token, check_rate
from memory.api.errors import answer_body, error_body
from memory.errors import Unauthenticated, error_for
from memory.mcp import tools
from memory.tenancy import Principal

PATH = "/mcp"


def _authorize(token: str | None) -> Principal | None:
    """The principal of ``token`` with one request counted against its rate limit (worker thread)."""
    principal = authenticate_bearer(token)
    if principal is not None and principal.tenant_id is not None:
        check_rate(principal)
    return principal


async def _answer(send, status: int, message: str, headers: dict[str, str] | None = None, body: dict | None = None) -> None:
    body = json.dumps(body or error_body(status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class MCPApplication:
    """ASGI application of ``/mcp`` (and ``/mcp/``): key check, then the SDK's transport."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != PATH:
            await _answer(send, 404, f"No endpoint at {scope.get('path')}")
            return
        try:
            principal = await database_sync_to_async(_authorize, thread_sensitive=False)(bearer_token(scope["headers"]))
        except Exception as exc:  # past the rate limit, or the database's refusal
            answer = error_for(exc)
            if answer is None:
                raise
            await _answer(send, answer.status, answer.message, answer.headers, answer_body(answer))
            return
        if principal is None:
            await _answer(send, 401, Unauthenticated.default_message, {"WWW-Authenticate": 'Bearer realm="mcp"'})
            return
        if principal.tenant_id is None:
            await _answer(send, 403, "Operator keys cannot access tenant data")
            return
        app = await self._transport()
        # The SDK's route is exactly PATH: a trailing slash would be a redirect.
        scope = {**scope, "path": PATH, "raw_path": PATH.encode(), tools.PRINCIPAL_SCOPE_KEY: principal}
        await app(scope, receive, send)

    async def _transport(self):
        """The SDK's Streamable HTTP app of this event loop, started on first use."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is None:
            app = tools.mcp_server().streamable_http_app(
                streamable_http_path=PATH,
                stateless_http=True,
                json_response=True,
                transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            )
            started = loop.create_future()
            task = loop.create_task(self._host(app, started), name="mcp-transport")
            entry = self._by_loop[loop] = (app, started, task)
        app, started, _ = entry
        await asyncio.shield(started)  # raises what the start raised
        return app

    @staticmethod
    async def _host(app, started: asyncio.Future) -> None:
        """Hold the transport's lifespan (its task group) open until the loop ends."""
        try:
            async with app.router.lifespan_context(app):
                started.set_result(None)
                await asyncio.Event().wait()
        except Exception as exc:
            if not started.done():
                started.set_exception(exc)
            raise


application = MCPApplication()
