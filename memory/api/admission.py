"""Admission of HTTP requests that carry a usable key: what one tenant may hold of a process.

Every request of a tenant's key (tenant or user scope) to ``/api/`` or ``/mcp`` takes one of
its tenant's ``API_TENANT_CONCURRENCY`` places in this process until its answer is sent. Past
that, it is answered 429 with ``Retry-After`` by ``TenantAdmission``, an ASGI
middleware, before Django runs and before its body is read: one tenant's requests can hold
no more than that many of the process's request threads and pooled connections
(``ASGI_THREADS``, ``DB_POOL_MAX_SIZE``), so another tenant's request finds both free. A
request that sleeps (a waiting flush, bounded apart by ``FLUSH_WAIT_MAX_PER_TENANT``) gives
its place back first (``release``).

The same middleware answers a key that a rate limit has refused, until that limit's window
ends (``memory.api.auth.known_refusal``): in a fixed window, a key past its budget stays past
it until the window resets, so the answer is known without running the view; the view's
throttle only counts. An add (``POST sessions/{id}/messages``) of a tenant at its flush
backlog limit, by the figures the process holds (``buffers.backlog.known_refusal``), is the
503 the add would get, before its body (up to ``MAX_BATCH_MESSAGES`` messages) is read and
validated; so is an import (``POST users/{id}/import``) of that tenant whose header, its
first line, announces no embeddings of this service's model (its messages would all be
pending), its body read no further. And a flush with ``{"wait": true}`` of a tenant whose
``FLUSH_WAIT_MAX_PER_TENANT`` waits are all in progress is the view's 429, from a body of at
most ``PEEK_MAX_BYTES`` read here: a client that asked to wait sends it again as soon as it
is answered, and through Django each refusal costs about as much as a health check.

Operator keys, WebSocket connections (bounded per frame by the rate limits) and requests
without a key (``memory.api.auth.HTTPAuthMiddleware`` answers them) are not counted.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter

from asgiref.sync import sync_to_async
from django.conf import settings

from buffers import backlog
from buffers import services as buffer_services
from memory.api.auth import known_refusal, may_have_body
from memory.api.errors import answer_body, send_json
from memory.api.limits import IMPORT_PATH, content_length
from memory.errors import RateLimited, Unavailable, error_for, pool_exhausted_message
from memory.inference import registry
from memory.tenancy import PRINCIPAL_SCOPE_KEY, Principal
from runtime import pool

PLACE_SCOPE_KEY = "memfuse.admission"
ADD_PATH = re.compile(r"^/api/v1/sessions/[^/]+/messages/?$")
FLUSH_PATH = re.compile(r"^/api/v1/(?:users|sessions)/[^/]+/flush/?$")
RETRY_AFTER_SECONDS = 1  # a place frees when one of the tenant's requests ends: soon
# A wait lasts about a flush: a place among the tenant's waits frees within seconds.
WAIT_RETRY_AFTER_SECONDS = 1
PEEK_MAX_BYTES = 1024  # the largest flush body read here: {"wait": true} is 14 bytes
HEADER_PEEK_BYTES = 64 * 1024  # an import's body read here in search of its header line

_lock = threading.Lock()
_in_flight: Counter[uuid.UUID] = Counter()


class Place:
    """One of a tenant's places in this process, held while its request is served."""

    __slots__ = ("tenant_id", "_held")

    def __init__(self, tenant_id: uuid.UUID) -> None:
        self.tenant_id = tenant_id
        self._held = True

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        with _lock:
            if not self._held:
                return
            self._held = False
            _in_flight[self.tenant_id] -= 1
            if _in_flight[self.tenant_id] <= 0:
                del _in_flight[self.tenant_id]


def take_place(tenant_id: uuid.UUID) -> Place | None:
    """A place of ``tenant_id``, or ``None`` when ``API_TENANT_CONCURRENCY`` of its requests are
    served already in this process (0: no bound)."""
    bound = settings.MEMFUSE["API_TENANT_CONCURRENCY"]
    with _lock:
        if 0 < bound <= _in_flight[tenant_id]:
            return None
        _in_flight[tenant_id] += 1
    return Place(tenant_id)


def in_flight(tenant_id: uuid.UUID) -> int:
    """Requests of ``tenant_id`` holding a place in this process now."""
    with _lock:
        return _in_flight.get(tenant_id, 0)


def release(request) -> None:
    """Give back the place of ``request`` (a Django or DRF request) before it sleeps; a request
    served without the middleware (WSGI, the test client) has none."""
    scope = getattr(getattr(request, "_request", request), "scope", None) or {}
    place = scope.get(PLACE_SCOPE_KEY)
    if isinstance(place, Place):
        place.release()


def wait_refused(full: buffer_services.WaitsFull) -> RateLimited:
    """The 429 of a flush wait its tenant has no place for (``buffers.services.WaitsFull``)."""
    return RateLimited(f"{full}: retry in {WAIT_RETRY_AFTER_SECONDS} s", retry_after=WAIT_RETRY_AFTER_SECONDS)


async def _flush_wait_refused(scope, receive, tenant_id: uuid.UUID):
    """``(the 429 of a flush wait of ``tenant_id`` with no place, or None; the receive to pass
    on)``. The body is read only when it announces at most ``PEEK_MAX_BYTES``; what was read is
    handed to the application again. Anything but a JSON object with ``"wait": true`` goes on
    to the view, which answers it (a malformed body's 400 too)."""
    length = content_length(scope)
    if length is None or length > PEEK_MAX_BYTES:
        return None, receive
    messages, body = await _read_some(receive, PEEK_MAX_BYTES)
    try:
        wait = json.loads(body).get("wait") is True
    except (ValueError, AttributeError):
        wait = False
    full = buffer_services.waits_full(tenant_id=tenant_id) if wait else None
    if full is not None:
        return wait_refused(full), receive
    return None, _replaying(messages, receive)


async def _read_some(receive, limit: int, enough=lambda body: False) -> tuple[list[dict], bytes]:
    """``(the ASGI messages received, their body bytes)``: until the body ends, a message that
    is not body, more than ``limit`` bytes are in, or ``enough(body)``."""
    messages, body = [], b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False) or len(body) > limit or enough(body):
            break
    return messages, body


def _has_a_line(body: bytes) -> bool:
    """Whether ``body`` holds a complete line that is not blank."""
    return any(line.strip() for line in body.split(b"\n")[:-1])


def _replaying(messages: list[dict], receive):
    """A receive that hands out ``messages`` (already received) first, then ``receive``'s."""

    async def replaying():
        return messages.pop(0) if messages else await receive()

    return replaying


async def _import_refused(receive, full: backlog.BacklogFull):
    """``(the add's 503 for an import whose header leaves its messages pending, or None; the
    receive to pass on)``, from the body's first line, read if it comes within
    ``HEADER_PEEK_BYTES``; anything else goes on to the view (which answers a malformed file)."""
    messages, body = await _read_some(receive, HEADER_PEEK_BYTES, _has_a_line)
    header = None
    for line in body.split(b"\n")[:-1]:  # complete lines only
        if line.strip():
            try:
                header = json.loads(line)
            except ValueError:
                pass
            break
    if (
        isinstance(header, dict)
        and header.get("type") == "header"
        and header.get("embedding") != registry.document_model()
    ):
        return Unavailable(full.message, retry_after=full.retry_after), receive
    return None, _replaying(messages, receive)


async def _no_place_refusal() -> Unavailable | RateLimited:
    """The answer to a request whose tenant has no place left in this process: the pool's 503
    when the process itself lacks connections (``runtime.pool.is_short``, checked off the event
    loop: a database restarting, a pool every tenant exhausts; the tenant is then not over its
    share, and its requests in progress get that 503 if they time out), else the tenant's 429."""
    if await sync_to_async(pool.is_short, thread_sensitive=False)():
        return Unavailable(pool_exhausted_message(RETRY_AFTER_SECONDS), retry_after=RETRY_AFTER_SECONDS)
    bound = settings.MEMFUSE["API_TENANT_CONCURRENCY"]
    message = (
        f"{bound} requests of this tenant are in progress in this process (API_TENANT_CONCURRENCY): "
        f"retry in {RETRY_AFTER_SECONDS} s"
    )
    return RateLimited(message, retry_after=RETRY_AFTER_SECONDS)


class TenantAdmission:
    """ASGI middleware, after ``HTTPAuthMiddleware`` (which puts the principal on the scope):
    a request of a tenant's key that a rate limit has refused for the rest of its window, or
    that finds its tenant's ``API_TENANT_CONCURRENCY`` places taken, is answered 429 with
    ``Retry-After`` in the error envelope, and an add of a tenant at its backlog limit 503
    with ``Retry-After``, without the body being read (the connection is then closed); so
    are an import of that tenant, from its first line, and a flush wait its tenant has no
    place for, from its small body. Any
    other request holds a place until its answer's last byte is sent (or the application
    returns without one)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        principal = scope.get(PRINCIPAL_SCOPE_KEY)
        if scope["type"] != "http" or not isinstance(principal, Principal) or principal.tenant_id is None:
            return await self.app(scope, receive, send)
        refused = known_refusal(principal)
        if refused is None and scope["method"] == "POST" and ADD_PATH.match(scope["path"]):
            full = backlog.known_refusal(tenant_id=principal.tenant_id)
            refused = Unavailable(full.message, retry_after=full.retry_after) if full is not None else None
        if refused is None and scope["method"] == "POST" and IMPORT_PATH.match(scope["path"]):
            full = backlog.known_refusal(tenant_id=principal.tenant_id)
            if full is not None:
                refused, receive = await _import_refused(receive, full)
        if (
            refused is None
            and scope["method"] == "POST"
            and FLUSH_PATH.match(scope["path"])
            and buffer_services.waits_full(tenant_id=principal.tenant_id) is not None
        ):
            refused, receive = await _flush_wait_refused(scope, receive, principal.tenant_id)
        place = take_place(principal.tenant_id) if refused is None else None
        if refused is None and place is None:
            refused = await _no_place_refusal()
        if refused is not None:
            answer = error_for(refused)
            return await send_json(send, answer.status, answer_body(answer), answer.headers, close=may_have_body(scope))

        async def send_releasing(message):
            await send(message)
            # Given back with the answer's last byte, not when the application returns: its
            # clean-up after that (Django's request_finished) may lag behind, and the
            # client's next request would find its own last one still counted.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                place.release()

        try:
            return await self.app({**scope, PLACE_SCOPE_KEY: place}, receive, send_releasing)
        finally:
            place.release()
