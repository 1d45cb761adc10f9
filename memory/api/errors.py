"""One JSON shape for every response: MemFuse's envelope ``{status, code, data, message, errors}``.

What an error answers is ``memory.errors.error_for``'s (shared with the WebSocket and MCP);
this module only puts it in the envelope.
"""

from __future__ import annotations

import json
import logging
import sys

from django.http import JsonResponse
from rest_framework.response import Response

from memory.errors import ErrorAnswer, error_for

logger = logging.getLogger(__name__)


def envelope(data=None, *, code: int = 200, message: str = "Success") -> Response:
    """A success response: ``{"status": "success", "code", "data", "message", "errors": null}``."""
    return Response({"status": "success", "code": code, "data": data, "message": message, "errors": None}, status=code)


def error_body(code: int, message: str, errors: list[dict] | None = None) -> dict:
    """An error body; ``errors`` is ``[{"field": name|None, "message": text}]``."""
    return {
        "status": "error",
        "code": code,
        "data": None,
        "message": message,
        "errors": errors if errors is not None else [{"field": None, "message": message}],
    }


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None, *, close: bool = False) -> None:
    """Answer an ASGI HTTP request with ``body`` as JSON, from an ASGI middleware that refuses it
    before the application runs (``memory.api.auth``, ``memory.api.limits``). ``close`` adds
    ``Connection: close``: the request's body is left unread, and a server keeping the
    connection alive would read (and drop) all of it first."""
    raw = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    raw_headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": raw})


def answer_body(answer: ErrorAnswer) -> dict:
    """The envelope of an ``ErrorAnswer``."""
    return error_body(answer.status, answer.message, answer.errors)


def exception_handler(exc, context) -> Response | None:
    """DRF ``EXCEPTION_HANDLER``: every error ``error_for`` maps, in the envelope, with
    ``Retry-After`` when a retry may succeed; ``None`` for an unexpected error (Django's
    ``handler500`` answers it, in the same shape)."""
    answer = error_for(exc)
    if answer is None:
        return None
    response = Response(answer_body(answer), status=answer.status, headers=answer.headers)
    if answer.status >= 500:
        request = context.get("request")
        # One line, no traceback: a database restart makes many of these at once.
        logger.warning("%d: %s (%s)", answer.status, answer.message, request.path if request is not None else "?")
        _logged(response)
    return response


def _logged(response: Response) -> Response:
    """A 5xx we answer by design (retry later): Django's request logger would also log it as an
    ERROR line; the attribute is what Django itself sets on a response it has logged."""
    response._has_been_logged = True
    return response


def json_404(request, exception=None) -> JsonResponse:
    """``handler404``: unknown URLs answer in the envelope too."""
    return JsonResponse(error_body(404, f"No endpoint at {request.path}"), status=404)


def json_500(request) -> JsonResponse:
    """``handler500``: an unexpected error, in the envelope (details are in the server log).

    Django calls it while handling the exception, so ``sys.exc_info()`` is that exception: a
    refusal by design outside DRF (the admin, the dashboard: an exhausted pool, an unreachable
    database) is answered as ``error_for`` says, a 503 with ``Retry-After``.
    """
    answer = error_for(sys.exc_info()[1])
    if answer is not None and answer.status >= 500:
        return JsonResponse(answer_body(answer), status=answer.status, headers=answer.headers)
    return JsonResponse(error_body(500, "Internal server error"), status=500)
