"""The operator's HTTP views: the admin dashboard page and ``GET /api/v1/admin/stats`` (both
``memory.operator.stats.operator_stats``), and ``GET /metrics`` (the Prometheus text format,
``memory.operator.exposition.scrape``). ``memory.operator`` computes the figures; the views
that answer for them live with the API, whose authentication and error envelope they use.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema, extend_schema_view
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from buffers import services as buffers
from memory.api.auth import bearer_token, is_authenticated, is_operator
from memory.api.errors import envelope, error_body
from memory.api.schema import api_doc
from memory.errors import NotFound, Unauthenticated
from memory.operator import history
from memory.operator.exposition import scrape
from memory.operator.stats import operator_stats
from memory.tenancy import resolve_key

REFRESH_SECONDS = 5


def dashboard(request: HttpRequest) -> HttpResponse:
    """``/admin/dashboard/`` (staff only, through ``admin.site.admin_view``): live figures.

    A POST with ``retry_failed`` queues every failed flush again (the FlushJob admin's action
    does the same for selected jobs); it needs the permission to change flush jobs.
    """
    if request.method == "POST" and "retry_failed" in request.POST:
        if not request.user.has_perm("buffers.change_flushjob"):
            messages.error(request, "You may not retry flushes.")
        else:
            retried = buffers.failed_jobs_retry()
            messages.success(request, f"{retried} failed flush(es) queued again.")
        return redirect("memfuse-dashboard")
    context = {
        **admin.site.each_context(request),
        "title": "MemFuse dashboard",
        "is_nav_sidebar_enabled": False,  # the figures need the width
        "stats": operator_stats(),
        "charts": history.charts(),
        "chart_minutes": round(history.span_seconds() / 60),
        "chart_width": history.CHART_WIDTH,
        "chart_height": history.CHART_HEIGHT,
        "refresh_seconds": REFRESH_SECONDS,
        "failed_jobs_url": reverse("admin:buffers_flushjob_changelist") + "?state__exact=failed",
        "dead_facts_url": reverse("admin:memory_factjob_changelist") + "?state__exact=dead",
        "stats_url": reverse("memfuse-dashboard-stats"),
    }
    return TemplateResponse(request, "admin/memfuse_dashboard.html", context)


class AdminStatsView(APIView):
    """``GET /api/v1/admin/stats``: ``operator_stats()`` in the envelope, for monitoring.

    Operators only (``memory.api.auth.is_operator``): 401 without credentials, 404 for
    credentials that are not an operator's (the endpoint does not exist for them).
    """

    # The admin's session too: DRF replaces Django's request.user with what its own
    # authentication classes find, and the API's defaults know no sessions.
    authentication_classes = [SessionAuthentication, *api_settings.DEFAULT_AUTHENTICATION_CLASSES]
    permission_classes = []  # get() checks is_operator: 401 without credentials, else 404

    @api_doc(
        "AdminStats",
        {
            "generated_at": serializers.DateTimeField(),
            "process": serializers.DictField(),
            "pool": serializers.DictField(),
            "models": serializers.DictField(),
            "user_cache": serializers.DictField(),
            "buffers": serializers.DictField(),
            "facts": serializers.ListField(child=serializers.DictField(), allow_null=True),
        },
        errors=(401, 404, 429, 500, 503),
        summary="Operator figures (pool, models, user cache, buffers, facts) for monitoring",
    )
    def get(self, request):
        if not is_operator(request):
            if not is_authenticated(request):
                raise Unauthenticated("Authentication required: operators only")
            raise NotFound(f"No endpoint at {request.path}")
        return envelope(operator_stats())


@extend_schema_view(get=extend_schema(exclude=True))
class DashboardStatsView(AdminStatsView):
    """``AdminStatsView`` for the admin's staff session at ``/admin/dashboard/stats`` (not in the API schema)."""


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
