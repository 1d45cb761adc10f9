"""One JSON shape for every response: MemFuse's envelope ``{status, code, data, message, errors}``."""

from __future__ import annotations

import logging
import sys

from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response

from memory.errors import ServiceError
from memory.inference import EmbeddingProcessError
from memory.pool import (
    RETRY_AFTER_SECONDS,
    is_database_unavailable,
    is_pool_exhausted,
    note_database_unavailable,
    note_pool_exhausted,
)

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


def flatten_errors(detail, prefix: str = "") -> list[dict]:
    """DRF's nested validation detail as ``[{"field": "messages[0].role", "message": ...}]``."""
    if isinstance(detail, dict):
        items = []
        for key, value in detail.items():
            if key == "non_field_errors":
                name = prefix
            elif isinstance(key, int):  # ListField reports its items' errors as {index: detail}
                name = f"{prefix}[{key}]"
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            items.extend(flatten_errors(value, name))
        return items
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return [{"field": prefix or None, "message": str(item)} for item in detail]
        items = []
        for index, item in enumerate(detail):
            if item:  # DRF puts {} for list items that passed
                items.extend(flatten_errors(item, f"{prefix}[{index}]"))
        return items
    return [{"field": prefix or None, "message": str(detail)}]


def validation_error(detail) -> tuple[str, list[dict]]:
    """A DRF validation detail as ``(message, errors)``: one summary line and the field errors."""
    errors = flatten_errors(detail)
    summary = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return f"Invalid input: {summary}", errors


EMBEDDING_UNAVAILABLE_MESSAGE = "The query embedding model is unavailable (restarting): retry later"
POOL_EXHAUSTED_MESSAGE = "The service is busy (no database connection free): retry later"
DATABASE_UNAVAILABLE_MESSAGE = "The database is unavailable (restarting or unreachable): retry later"


def pool_exhausted_body() -> tuple[dict, dict]:
    """The 503 answer to a request the database pool could not serve: ``(body, headers)``."""
    note_pool_exhausted()
    return error_body(503, POOL_EXHAUSTED_MESSAGE), {"Retry-After": str(RETRY_AFTER_SECONDS)}


def database_refusal(exc: BaseException | None) -> tuple[dict, dict] | None:
    """The 503 answer ``(body, headers)`` when ``exc`` is the database's (pool exhausted, or the
    database unreachable: ``memory.pool``), counted for the dashboard; ``None`` otherwise."""
    if is_pool_exhausted(exc):
        return pool_exhausted_body()
    if is_database_unavailable(exc):
        note_database_unavailable()
        return error_body(503, DATABASE_UNAVAILABLE_MESSAGE), {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return None


def exception_handler(exc, context) -> Response | None:
    """DRF ``EXCEPTION_HANDLER``: domain errors, validation errors and HTTP errors, one shape.

    An exhausted database pool or an unreachable database (``database_refusal``) is a 503 with
    ``Retry-After``; so is an inference process that died under a query
    (``EmbeddingProcessError``: the next query starts a new one), and a ``ServiceError`` with a
    ``retry_after`` (the flush backlog's limit).
    """
    refusal = database_refusal(exc)
    if refusal is not None:
        body, headers = refusal
        request = context.get("request")
        # One line, no traceback: a database restart makes many of these at once.
        logger.warning("503: %s (%s)", body["message"], request.path if request is not None else "?")
        return _logged(Response(body, status=503, headers=headers))
    if isinstance(exc, EmbeddingProcessError):
        logger.error("503: %s", exc)
        return Response(
            error_body(503, EMBEDDING_UNAVAILABLE_MESSAGE),
            status=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, ServiceError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        response = Response(error_body(exc.status, exc.message, exc.errors), status=exc.status, headers=headers)
        return _logged(response) if exc.status >= 500 else response
    if isinstance(exc, exceptions.ValidationError):
        message, errors = validation_error(exc.detail)
        return Response(error_body(400, message, errors), status=400)
    if isinstance(exc, Http404):
        return Response(error_body(404, "Not found"), status=404)
    if isinstance(exc, exceptions.APIException):
        headers = {}
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        return Response(error_body(exc.status_code, str(exc.detail)), status=exc.status_code, headers=headers)
    return None  # an unexpected error: Django's handler500 answers, in the same shape


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

    Django calls it while handling the exception, so ``sys.exc_info()`` is that exception: an
    exhausted pool or an unreachable database outside DRF (the admin, the dashboard) is a 503
    with ``Retry-After``.
    """
    refusal = database_refusal(sys.exc_info()[1])
    if refusal is not None:
        body, headers = refusal
        return JsonResponse(body, status=503, headers=headers)
    return JsonResponse(error_body(500, "Internal server error"), status=500)
