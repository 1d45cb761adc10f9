"""OpenAPI description of the REST API (drf-spectacular): envelopes, the error shape, the key scheme.

Views declare what they take and what ``data`` holds with ``api_doc``; this module wraps that
``data`` in MemFuse's envelope once (``<Name>Envelope`` components) and adds the one error
shape (``ErrorEnvelope``) for every 4xx/5xx the view can answer. The schema is served at
``/api/schema/``; ``python manage.py spectacular --validate --fail-on-warn`` checks it.
"""

from __future__ import annotations

import re

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers

# Every view with a key: bad input, no usable key, a key that may not, unknown id, rate limit,
# unexpected error. Documented everywhere: the fuzz test holds us to every code we answer.
ERRORS = (400, 401, 403, 404, 413, 429, 500, 503)
WITH_CONFLICT = (*ERRORS, 409)  # creating or renaming to a name the tenant (or user) already has
ERROR_DESCRIPTIONS = {
    400: "Invalid input; `errors` name the fields (`messages[1].role`).",
    401: "Missing, unknown, expired or revoked API key.",
    403: "The key may not do this (an operator key on tenant data, a user key changing agents).",
    404: "Unknown id, or an object of another tenant or user.",
    409: "The name is taken (names are unique per tenant; session names per user), or, for a new API key, "
    "the user holds `MAX_API_KEYS_PER_USER` live keys.",
    413: "The request body is larger than `MAX_REQUEST_BYTES` (an import's, than `MAX_IMPORT_BYTES`).",
    429: "Rate limit of the API key (`API_RATE_LIMIT`) or of its tenant (`API_TENANT_RATE_LIMIT`) reached; see `Retry-After`.",
    500: "Unexpected server error (details in the server log).",
    503: "The database cannot be reached or no connection came free within the pool timeout (or, for an add, "
    "the flush backlog of the key's tenant is full); retry after `Retry-After` seconds.",
}


class BearerKeyScheme(OpenApiAuthenticationExtension):
    """``Authorization: Bearer <key>`` for ``memory.api.auth.ApiKeyAuthentication``."""

    target_class = "memory.api.auth.ApiKeyAuthentication"
    name = "bearerKey"

    def get_security_definition(self, auto_schema):
        scheme = build_bearer_security_scheme_object(header_name="AUTHORIZATION", token_prefix="Bearer")
        scheme["description"] = "An API key, `<8-char prefix>.<32 chars>` (create_tenant, create_api_key)."
        return scheme


class MemFuseAutoSchema(AutoSchema):
    """Operation ids from the view (``user_detail_put``), tags from the resource (``users``)."""

    def get_operation_id(self) -> str:
        view = re.sub(r"View$", "", self.view.__class__.__name__)
        return f"{re.sub(r'(?<!^)(?=[A-Z])', '_', view).lower()}_{self.method.lower()}"

    def get_description(self) -> str:
        # The method's docstring, else the view's own: never the base view's (ConcurrentAPIView).
        method = getattr(self.view, self.method.lower(), None)
        return (method.__doc__ if method and method.__doc__ else self.view.__class__.__dict__.get("__doc__")) or ""

    def _get_request_body(self, direction="request"):
        # MemFuse's API deletes by ids sent in a JSON body (DELETE .../messages {"message_ids"});
        # drf-spectacular describes bodies for POST, PUT and PATCH only.
        if self.method != "DELETE" or self.get_request_serializer() is None:
            return super()._get_request_body(direction)
        self.method = "POST"
        try:
            return super()._get_request_body(direction)
        finally:
            self.method = "DELETE"

    def get_tags(self) -> list[str]:
        # /api/v1/<resource>/...
        return [self.path.strip("/").split("/")[2]]


class FieldError(serializers.Serializer):
    field = serializers.CharField(allow_null=True, help_text="The offending field (`messages[1].role`), null for the whole request.")
    message = serializers.CharField()


class ErrorEnvelope(serializers.Serializer):
    """The one JSON error shape (``memory.api.errors.error_body``)."""

    status = serializers.ChoiceField(choices=["error"])
    code = serializers.IntegerField(help_text="The HTTP status.")
    data = serializers.JSONField(allow_null=True, help_text="Always null.")
    message = serializers.CharField()
    errors = FieldError(many=True)


_envelopes: dict[str, serializers.Serializer] = {}


def envelope_of(name: str, data) -> serializers.Serializer:
    """The success envelope component ``<name>Envelope`` whose ``data`` is ``data``.

    ``data``: a serializer (instance or class) or a dict of fields (becomes ``<name>Data``).
    Built once per name: views that answer the same shape share one component.
    """
    if name in _envelopes:
        return _envelopes[name]
    if isinstance(data, dict):
        data = inline_serializer(name=f"{name}Data", fields=data)
    _envelopes[name] = inline_serializer(
        name=f"{name}Envelope",
        fields={
            "status": serializers.ChoiceField(choices=["success"]),
            "code": serializers.IntegerField(),
            "data": data,
            "message": serializers.CharField(),
            "errors": serializers.JSONField(allow_null=True, help_text="Always null."),
        },
    )
    return _envelopes[name]


def api_doc(name: str, data, *, code: int = 200, request=None, query=None, errors=ERRORS, summary: str | None = None, **extra):
    """``extend_schema`` for a view method answering ``code`` with ``data`` in the envelope.

    ``request``: the input serializer of the JSON body; ``query``: the serializer of the query
    string; ``errors``: the error statuses the method answers, each with ``ErrorEnvelope``.
    ``extra`` goes to ``extend_schema`` (e.g. more ``responses``).
    """
    responses = {code: envelope_of(name, data)}
    responses.update(extra.pop("responses", {}))
    for status in errors:
        responses[status] = OpenApiResponse(ErrorEnvelope, description=ERROR_DESCRIPTIONS[status])
    return extend_schema(
        request=request, responses=responses, parameters=[query] if query else None, summary=summary, **extra
    )


def uuid_path_parameters(result, generator, request, public):
    """Postprocessing hook: path ids (``user_id``, ``agent_id``, ``session_id``) are UUIDs.

    The routes match any segment (``[^/]+``) so that a malformed id is a 404 naming the field
    rather than "no endpoint"; the schema still says what a valid id is. ``api_key_id`` is a
    key's 8-character prefix, not a UUID.
    """
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in {"user_id", "agent_id", "session_id"}:
                    parameter["schema"] = {"type": "string", "format": "uuid"}
    return result


# --- data shapes the views build as dicts --------------------------------------------------------


class QueryResult(serializers.Serializer):
    id = serializers.UUIDField()
    type = serializers.ChoiceField(choices=["message", "knowledge"])
    content = serializers.CharField()
    role = serializers.CharField(allow_null=True, help_text="null for knowledge")
    score = serializers.FloatField(help_text="Fused RRF score, higher is better.")
    created_at = serializers.DateTimeField()
    metadata = serializers.DictField(
        help_text="The item's metadata plus session_id, session_name, position, scope "
        "(in_session|cross_session|null), flushed, retrievers ({bm25|vector|speaker|reranker: "
        "{rank, score}} for each list that ranked the item)."
    )


class FlushJob(serializers.Serializer):
    id = serializers.IntegerField()
    user_id = serializers.UUIDField()
    session_id = serializers.UUIDField(allow_null=True)
    priority = serializers.ChoiceField(choices=["critical", "high", "normal", "low"])
    reason = serializers.CharField()
    state = serializers.CharField()
    attempts = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    messages_flushed = serializers.IntegerField()
    last_error = serializers.CharField(allow_blank=True, allow_null=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class Buffer(serializers.Serializer):
    pending_messages = serializers.IntegerField()
    pending_tokens = serializers.IntegerField()
    oldest_pending_age_s = serializers.FloatField(help_text="seconds")
    jobs = FlushJob(many=True)


def ids(name: str) -> dict:
    """``{name: [uuid, ...]}``."""
    return {name: serializers.ListField(child=serializers.UUIDField())}
