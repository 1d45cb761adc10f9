"""The one domain exception type, and ``error_for``: the one mapping of errors to answers.

Services raise ``ServiceError`` subclasses; every interface (the REST API's DRF
``EXCEPTION_HANDLER``, the session WebSocket's ``receive_json``, the MCP tools and the MCP
transport) turns whatever it caught into an answer with ``error_for`` and only renders that
answer in its own form (an envelope, an error frame, a tool error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.http import Http404
from rest_framework import exceptions as drf_exceptions

from memory.inference import EmbeddingProcessError
from runtime.pool import (
    RETRY_AFTER_SECONDS,
    is_database_unavailable,
    is_pool_exhausted,
    note_database_unavailable,
    note_pool_exhausted,
)

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service refuses: ``status`` is the HTTP status, ``errors`` name the fields.

    ``errors`` is a list of ``{"field": name, "message": text}``; ``field`` is ``None`` for an
    error about the request as a whole.
    """

    status = 400
    default_message = "Bad request"
    # Seconds after which a retry may succeed: sent as Retry-After (REST) when set.
    retry_after: int | None = None

    def __init__(self, message: str | None = None, *, field: str | None = None, errors: list[dict] | None = None):
        self.message = message or self.default_message
        self.errors = errors if errors is not None else [{"field": field, "message": self.message}]
        super().__init__(self.message)


class InvalidInput(ServiceError):
    status = 400
    default_message = "Invalid input"


class Unauthenticated(ServiceError):
    """No usable API key (or, for the operators' pages, no operator login)."""

    status = 401
    default_message = "Invalid, expired or revoked API key"


class NotFound(ServiceError):
    status = 404
    default_message = "Not found"


class Conflict(ServiceError):
    status = 409
    default_message = "Conflict"


class TooLarge(ServiceError):
    """Something sent is over a size limit other than the body's (a line of an import, its records)."""

    status = 413
    default_message = "Too large"


class Forbidden(ServiceError):
    """The caller's key may not do this at all (an operation, never an object: those are 404)."""

    status = 403
    default_message = "Forbidden"


class Unavailable(ServiceError):
    """The service cannot take this now: retry after ``retry_after`` s."""

    status = 503
    default_message = "Service unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(ServiceError):
    """A rate limit is reached (the key's ``API_RATE_LIMIT`` or its tenant's ``API_TENANT_RATE_LIMIT``): retry after ``retry_after`` s."""

    status = 429
    default_message = "Request was throttled"

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


# --- the mapping -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorAnswer:
    """What to answer for an error: ``status`` (HTTP status; also the code of a WebSocket error
    frame), ``message``, ``errors`` (``[{"field": name | None, "message": text}]``) and
    ``retry_after`` (s, sent as ``Retry-After`` over HTTP) when a retry may succeed."""

    status: int
    message: str
    errors: list[dict]
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The HTTP headers of the answer: ``Retry-After`` when set."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    @property
    def fields(self) -> list[str]:
        """The fields the errors name, in order."""
        return [error["field"] for error in self.errors if error.get("field")]


def _answer(status: int, message: str, retry_after: int | None = None) -> ErrorAnswer:
    return ErrorAnswer(status, message, [{"field": None, "message": message}], retry_after)


EMBEDDING_UNAVAILABLE_MESSAGE = "The query embedding model is unavailable (restarting): retry later"


def pool_exhausted_message(retry_after: int) -> str:
    """The message of the 503 answer when no database connection was free in time."""
    return f"The service is busy (no database connection free): retry in {retry_after} s"


def database_unavailable_message(retry_after: int) -> str:
    """The message of the 503 answer when the database cannot be reached."""
    return f"The database is unavailable (restarting or unreachable): retry in {retry_after} s"


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


def error_for(exc: BaseException | None) -> ErrorAnswer | None:
    """The answer to ``exc``, or ``None`` for an unexpected error (the caller answers 500 and logs it).

    - ``ServiceError``: its status, message, field errors and ``retry_after``;
    - a DRF ``ValidationError``: 400 naming each field (``flatten_errors``); another DRF
      ``APIException``: its status and detail (``Retry-After`` from a throttle's ``wait``);
      ``Http404``: 404;
    - the database's refusals (``runtime.pool``: no connection free in time, or the database
      unreachable): 503 with ``retry_after``, counted for the dashboard;
    - an inference process that died under a query (``EmbeddingProcessError``: the next query
      starts a new one): 503 with ``retry_after``, logged.
    """
    if isinstance(exc, ServiceError):
        return ErrorAnswer(exc.status, exc.message, exc.errors, exc.retry_after)
    if isinstance(exc, drf_exceptions.ValidationError):
        message, errors = validation_error(exc.detail)
        return ErrorAnswer(400, message, errors)
    if isinstance(exc, Http404):
        return _answer(404, "Not found")
    if isinstance(exc, drf_exceptions.APIException):
        wait = getattr(exc, "wait", None)
        return _answer(exc.status_code, str(exc.detail), int(wait) if wait else None)
    if is_pool_exhausted(exc):
        note_pool_exhausted()
        return _answer(503, pool_exhausted_message(RETRY_AFTER_SECONDS), RETRY_AFTER_SECONDS)
    if is_database_unavailable(exc):
        note_database_unavailable()
        return _answer(503, database_unavailable_message(RETRY_AFTER_SECONDS), RETRY_AFTER_SECONDS)
    if isinstance(exc, EmbeddingProcessError):
        logger.error("503: %s", exc)
        return _answer(503, EMBEDDING_UNAVAILABLE_MESSAGE, RETRY_AFTER_SECONDS)
    return None
