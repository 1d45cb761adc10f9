"""``GET /metrics``: the Prometheus text format (``memory.operator.exposition.scrape``), for operators and scrapers."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from memory.api.auth import bearer_token
from memory.api.errors import error_body
from memory.operator.exposition import scrape
from memory.tenancy import resolve_key


def _scrape_token_matches(token: str | None) -> bool:
    configured = settings.MEMFUSE["METRICS_TOKEN"]
    # compare_digest: the time taken does not tell how much of the token was right.
    return bool(configured and token and hmac.compare_digest(token.encode(), configured.encode()))


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics of ``memory.operator.exposition`` for ``Authorization: Bearer <token>`` with the scrape
    token (``METRICS_TOKEN``) or an operator key, or for a staff user's admin session.

    401 (the API's envelope) without credentials or with a token that is neither; 404 for
    credentials that are not an operator's (a tenant or user key, a non-staff session): the
    endpoint does not exist for them, as ``/api/v1/admin/stats``.
    """
    token = bearer_token(dict(request.headers))
    if token is not None:
        if _scrape_token_matches(token):
            return _metrics()
        principal = resolve_key(token)
        if principal is None:
            return JsonResponse(error_body(401, "Invalid scrape token or API key"), status=401)
        if principal.is_operator:
            return _metrics()
        return JsonResponse(error_body(404, f"No endpoint at {request.path}"), status=404)
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return JsonResponse(error_body(401, "Authentication required: operators only"), status=401)
    if user.is_active and user.is_staff:
        return _metrics()
    return JsonResponse(error_body(404, f"No endpoint at {request.path}"), status=404)


def _metrics() -> HttpResponse:
    return HttpResponse(scrape(), content_type=CONTENT_TYPE_LATEST)
