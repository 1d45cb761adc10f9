"""The one domain exception type: services raise it, the API turns it into MemFuse's envelope."""

from __future__ import annotations


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


class NotFound(ServiceError):
    status = 404
    default_message = "Not found"


class Conflict(ServiceError):
    status = 409
    default_message = "Conflict"


class Forbidden(ServiceError):
    """The caller's key may not do this at all (an operation, never an object: those are 404)."""

    status = 403
    default_message = "Forbidden"


class Unavailable(ServiceError):
    """The service cannot take this now (the flush backlog is full): retry after ``retry_after`` s."""

    status = 503
    default_message = "Service unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(ServiceError):
    """The API key's rate limit is reached (``API_RATE_LIMIT``): retry after ``retry_after`` s."""

    status = 429
    default_message = "Request was throttled"

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
