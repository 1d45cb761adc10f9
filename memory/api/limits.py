"""Limits on what a client may send: body and frame size, JSON nesting, non-finite numbers.

Every limit is a setting (``MEMFUSE``; docs/configuration.md, "Limits"):

- ``MAX_REQUEST_BYTES``: an HTTP body over it is a 413 before it is read (``BodySizeLimit``,
  under ASGI) or parsed (``BoundedJSONParser``, under WSGI and the test client too);
- ``MAX_IMPORT_BYTES``: instead, the body of ``POST users/{id}/import`` sent with a key that may
  import into that user (``may_import``);
- ``WS_MAX_FRAME_BYTES``: a WebSocket text frame over it gets a 413 error frame, unparsed;
- ``MAX_JSON_DEPTH``: JSON nested deeper (objects and arrays, the document itself being
  level 1) is a 400 naming the limit: Python's decoder recurses per level (5,000 levels were
  a ``RecursionError``, a 500), and so do our validators and PostgreSQL's ``jsonb`` input
  (``memory.validation.check_depth``, which the import's records use too).

Numbers: ``NaN`` and ``Infinity`` are refused (DRF's strict JSON), and so are numbers too
large for a float (``1e400``, which Python reads as infinity and ``jsonb`` cannot store).
"""

from __future__ import annotations

import json
import math
import re
import uuid

from django.conf import settings
from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant

from memory.api.errors import error_body, send_json
from memory.tenancy import PRINCIPAL_SCOPE_KEY, Principal
from memory.validation import JSONTooDeep, check_depth

IMPORT_PATH = re.compile(r"^/api/v1/users/(?P<user_id>[^/]+)/import/?$")


class RequestTooLarge(exceptions.APIException):
    """A request body over ``MAX_REQUEST_BYTES``: HTTP 413."""

    status_code = 413
    default_code = "request_too_large"


def too_large_message(limit: int, what: str = "request body", setting: str = "MAX_REQUEST_BYTES") -> str:
    return f"The {what} is larger than {limit} bytes ({setting})"


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"Number out of range: {text[:40]}")
    return value


def loads(text: str | bytes):
    """``text`` decoded as JSON within the limits (non-finite numbers, ``MAX_JSON_DEPTH``).

    Raises ``ValueError`` for invalid JSON (``json.JSONDecodeError``, an out-of-range number)
    and ``JSONTooDeep`` (a ``ValueError`` too) past ``MAX_JSON_DEPTH``.
    """
    try:
        value = json.loads(text, parse_constant=strict_constant, parse_float=_finite_float)
    except RecursionError:  # deeper than the interpreter's stack: far past any sane limit
        raise JSONTooDeep() from None
    check_depth(value)
    return value


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser within the limits: a body over ``MAX_REQUEST_BYTES`` is a 413 before it is
    parsed (by its ``Content-Length``, else by reading one byte past the limit); JSON nested past
    ``MAX_JSON_DEPTH`` a 400 naming the limit (and the field, when the body could be decoded)."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        limit = settings.MEMFUSE["MAX_REQUEST_BYTES"]
        request = parser_context.get("request")
        meta = request.META if request is not None else {}
        try:
            length = int(meta.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            raise RequestTooLarge(too_large_message(limit))
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise RequestTooLarge(too_large_message(limit))
        try:
            text = raw.decode(parser_context.get("encoding", settings.DEFAULT_CHARSET))
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - the body is not valid UTF-8: {exc}") from None
        try:
            return loads(text)
        except JSONTooDeep as exc:
            raise exceptions.ValidationError({exc.path or "non_field_errors": [str(exc)]}) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


# --- ASGI: refuse an oversized body before reading it ----------------------------------------------


class BodySizeLimit:
    """ASGI middleware: an HTTP request whose body is over its limit gets a 413 (the error
    envelope) without the body being read into a temporary file.

    The limit is ``MAX_REQUEST_BYTES``, or ``MAX_IMPORT_BYTES`` for ``POST users/{id}/import``
    with a key that may import into that user (``may_import``: the key's principal is on the
    scope, put there by ``memory.api.auth.HTTPAuthMiddleware``, which runs first). By
    ``Content-Length`` at once; a body without one (chunked) is counted as it arrives, and
    past the limit the application is told the client left (Django then sends nothing) and the
    413 is sent here.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        setting = "MAX_IMPORT_BYTES" if may_import(scope) else "MAX_REQUEST_BYTES"
        limit = settings.MEMFUSE[setting]
        length = content_length(scope)
        if length is not None and length > limit:
            return await _send_413(send, limit, setting)
        if length is not None:
            return await self.app(scope, receive, send)
        received = 0
        over = False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counting_receive, send)
        if over:
            await _send_413(send, limit, setting)


def may_import(scope) -> bool:
    """Whether the request of ``scope`` is an import its key may make, so may send a body up to
    ``MAX_IMPORT_BYTES``: a tenant key into any user id of its path (an unknown one creates
    the user; another tenant's is refused by the view), a user key into its own user only.
    Any other request, or key, has ``MAX_REQUEST_BYTES``."""
    match = IMPORT_PATH.match(scope["path"])
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    if match is None or scope["method"] != "POST" or not isinstance(principal, Principal) or principal.tenant_id is None:
        return False
    if not principal.is_user_key:
        return True
    try:
        return uuid.UUID(match["user_id"]) == principal.user_id
    except ValueError:
        return False


def content_length(scope) -> int | None:
    """The ``Content-Length`` the HTTP request of ``scope`` announces; ``None`` without one (or a malformed one)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send, limit: int, setting: str) -> None:
    await send_json(send, 413, error_body(413, too_large_message(limit, setting=setting)), close=True)
