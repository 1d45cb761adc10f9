"""Input validation and output shapes of the REST API.

Inputs are strict about types: a number where text is expected is a 400 naming the field,
not text silently made of it.
"""

from __future__ import annotations

import threading
import uuid

from django.conf import settings
from django.http import QueryDict
from django.utils.dateparse import parse_datetime
from rest_framework import serializers

from memory.inference import llm
from memory.models import Agent, ApiKey, Knowledge, Message, Role, Session, User
from memory.retrieval import MemoryQuery, RetrievalConfig
from memory.services.messages import MessageIn
from memory.validation import UNSTORABLE, jsonb_storable, storable

# One instance of each ``reusable`` serializer class, its fields built and bound once.
_reusable: dict[type[serializers.Serializer], serializers.Serializer] = {}
_reusable_lock = threading.Lock()


def _reusable_instance(serializer_class: type[serializers.Serializer]) -> serializers.Serializer:
    serializer = _reusable.get(serializer_class)
    if serializer is None:
        with _reusable_lock:
            serializer = _reusable.get(serializer_class)
            if serializer is None:
                serializer = serializer_class()
                _ = serializer.fields  # built here, under the lock: a cached_property
                _reusable[serializer_class] = serializer
    return serializer


def validated(serializer_class: type[serializers.Serializer], data) -> dict:
    """``data`` validated by ``serializer_class``: REST views and WebSocket consumers.

    Raises DRF's ``ValidationError`` (a 400 naming the fields) when ``data`` is not a JSON
    object or does not validate.

    A class with ``reusable = True`` (validation that reads only the data given, never
    ``initial_data`` nor ``context``) validates with one shared instance: DRF deep-copies every
    declared field into each new instance, most of the cost of validating a small body, and
    its fields keep no state of a validation. Data it refuses goes through a new instance, so
    the errors are DRF's ``is_valid`` ones exactly.
    """
    if data is None or not hasattr(data, "get"):
        raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
    if isinstance(data, QueryDict):
        # A query string as plain values: DRF's form handling takes an empty value (`?name=`)
        # for an absent one, so that `?name=` listed everything instead of refusing a blank name.
        data = data.dict()
    if getattr(serializer_class, "reusable", False):
        try:
            return _reusable_instance(serializer_class).run_validation(data)
        except serializers.ValidationError:
            pass  # answered below, as is_valid words it
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class StrictCharField(serializers.CharField):
    """A ``CharField`` that accepts only JSON strings that PostgreSQL can store."""

    default_error_messages = {"invalid": "Must be a string.", "unstorable": UNSTORABLE}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        if not storable(data):
            self.fail("unstorable")
        return super().to_internal_value(data)


class JSONObjectField(serializers.DictField):
    """A JSON object (metadata) whose keys and strings, at any depth, PostgreSQL can store in jsonb."""

    default_error_messages = {"unstorable": UNSTORABLE}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not jsonb_storable(value):
            self.fail("unstorable")
        return value


class StrictIntegerField(serializers.IntegerField):
    """An ``IntegerField`` that accepts only JSON integers (not strings, floats or booleans)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A ``BooleanField`` that accepts only JSON ``true``/``false`` (not ``0``, ``"yes"``, ...)."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictUUIDField(serializers.UUIDField):
    """A ``UUIDField`` that accepts only strings: DRF's reads an integer (and ``false``) as ``UUID(int=...)``."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


MAX_CHARS = settings.MEMFUSE["MAX_MESSAGE_CHARS"]
MAX_BATCH = settings.MEMFUSE["MAX_BATCH_MESSAGES"]


def _id_list() -> serializers.ListField:
    return serializers.ListField(child=StrictUUIDField(), allow_empty=False, min_length=1, max_length=MAX_BATCH)


class NamedIn(serializers.Serializer):
    name = StrictCharField(max_length=255)
    description = StrictCharField(required=False, allow_blank=True, allow_null=True, max_length=10_000)
    metadata = JSONObjectField(required=False)


class NamedUpdate(serializers.Serializer):
    name = StrictCharField(required=False, allow_null=True, max_length=255)
    description = StrictCharField(required=False, allow_blank=True, allow_null=True, max_length=10_000)
    metadata = JSONObjectField(required=False, allow_null=True)


class NameFilter(serializers.Serializer):
    name = serializers.CharField(required=False, max_length=255)


class SessionIn(serializers.Serializer):
    user_id = StrictUUIDField()
    agent_id = StrictUUIDField()
    name = StrictCharField(required=False, allow_null=True, max_length=255)
    metadata = JSONObjectField(required=False)


class SessionUpdate(serializers.Serializer):
    name = StrictCharField(required=False, allow_null=True, max_length=255)
    metadata = JSONObjectField(required=False, allow_null=True)


class SessionFilter(serializers.Serializer):
    user_id = serializers.UUIDField(required=False)
    agent_id = serializers.UUIDField(required=False)
    name = serializers.CharField(required=False, max_length=255)


class MessageInSerializer(serializers.Serializer):
    """One message: ``role``, ``content``, optional ``metadata``, ``name`` and ``created_at``.

    ``name`` (the OpenAI chat field for the speaker's display name) is stored as
    ``metadata["speaker"]``; ``metadata["image_caption"]`` is indexed with the content.
    """

    role = serializers.ChoiceField(choices=Role.choices)
    content = StrictCharField(trim_whitespace=False, max_length=MAX_CHARS)
    # Blank (or whitespace only, trimmed) means no speaker, like an absent name.
    name = StrictCharField(required=False, allow_blank=True, max_length=255)
    metadata = JSONObjectField(required=False)
    created_at = serializers.DateTimeField(required=False)

    def validate(self, attrs):
        metadata = dict(attrs.get("metadata") or {})
        if attrs.get("name"):
            metadata.setdefault("speaker", attrs["name"])
        for key in ("speaker", "image_caption"):
            if key in metadata and not isinstance(metadata[key], str):
                raise serializers.ValidationError({"metadata": {key: "Must be a string."}})
        return MessageIn(
            role=attrs["role"], content=attrs["content"], metadata=metadata, created_at=attrs.get("created_at")
        )


class MessagesAdd(serializers.Serializer):
    reusable = True  # ``validated``: nothing but the data is read
    messages = serializers.ListField(child=MessageInSerializer(), allow_empty=False, min_length=1, max_length=MAX_BATCH)


class MessageIds(serializers.Serializer):
    message_ids = _id_list()


class MessagesUpdate(serializers.Serializer):
    message_ids = _id_list()
    new_messages = serializers.ListField(child=MessageInSerializer(), allow_empty=False, min_length=1, max_length=MAX_BATCH)

    def validate(self, attrs):
        if len(attrs["message_ids"]) != len(attrs["new_messages"]):
            raise serializers.ValidationError({"new_messages": "Must have one message per id in message_ids."})
        if len(set(attrs["message_ids"])) != len(attrs["message_ids"]):
            raise serializers.ValidationError({"message_ids": "Ids must be distinct."})
        return attrs


class MessagesListQuery(serializers.Serializer):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=20)
    sort_by = serializers.ChoiceField(choices=["timestamp", "position"], required=False, default="timestamp")
    order = serializers.ChoiceField(choices=["asc", "desc"], required=False, default="desc")
    buffer_only = serializers.BooleanField(required=False, default=None)  # absent: all messages


class StrictFloatField(serializers.FloatField):
    """A ``FloatField`` that accepts only JSON numbers (not strings or booleans)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class RetrievalOverrides(serializers.Serializer):
    """Per-query overrides of the retrieval settings that are safe to change per query.

    Safe = bounded cost: weights, RRF's ``k``, the fusion function and the PRF weight only
    change arithmetic; candidates per retriever, PRF documents (one indexed read) and
    ``rerank_top_n`` are capped (``rerank_top_n`` is cross-encoder pairs, the dominant cost). What changes the index (BM25 context window, own-word weight) or the
    models is not overridable: it would rebuild or bypass per-user caches on every query.
    Unknown fields are rejected, not ignored. Returns the overrides given (a dict).
    """

    bm25_weight = StrictFloatField(required=False, min_value=0.0, max_value=100.0)
    vector_weight = StrictFloatField(required=False, min_value=0.0, max_value=100.0)
    rrf_k = StrictIntegerField(required=False, min_value=1, max_value=1000)
    bm25_candidates = StrictIntegerField(required=False, min_value=1, max_value=500)
    vector_candidates = StrictIntegerField(required=False, min_value=1, max_value=500)
    rerank = StrictBooleanField(required=False)
    rerank_top_n = StrictIntegerField(required=False, min_value=1, max_value=50)
    prf_docs = StrictIntegerField(required=False, min_value=0, max_value=10)
    prf_weight = StrictFloatField(required=False, min_value=0.0, max_value=10.0)
    fusion = serializers.ChoiceField(required=False, choices=["rrf", "convex"])
    speaker_weight = StrictFloatField(required=False, min_value=0.0, max_value=100.0)

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            allowed = ", ".join(self.fields)
            raise serializers.ValidationError({key: [f"Unknown field; expected one of {allowed}."] for key in unknown})
        return super().to_internal_value(data)

    def validate(self, attrs):
        weights = {
            name: attrs.get(name, settings.MEMFUSE[name.upper()]) for name in ("bm25_weight", "vector_weight")
        }
        if not any(weights.values()):
            raise serializers.ValidationError({"vector_weight": ["bm25_weight and vector_weight cannot both be 0."]})
        if attrs.get("rerank") and not settings.MEMFUSE["RERANKER_MODEL_PATH"]:
            raise serializers.ValidationError({"rerank": ["No reranker is configured (RERANKER_MODEL_PATH)."]})
        return attrs


class AwareDateTimeField(serializers.DateTimeField):
    """An ISO 8601 date-time with a UTC offset (``2026-03-01T09:00:00+01:00``, or ``Z``).

    A naive one is refused rather than read in the server's time zone: the same text would
    name another instant on a server configured otherwise. Returned as an aware ``datetime``
    in the offset given (comparisons are by instant).
    """

    default_error_messages = {"naive": "Must include a UTC offset (+01:00 or Z): a naive date-time is ambiguous."}

    def to_internal_value(self, value):
        if not isinstance(value, str):
            self.fail("invalid", format="ISO 8601 with a UTC offset")
        parsed = parse_datetime(value.strip())
        if parsed is None:
            self.fail("invalid", format="ISO 8601 with a UTC offset")
        if parsed.utcoffset() is None:
            self.fail("naive")
        return parsed


class QueryIn(serializers.Serializer):
    reusable = True  # ``validated``: nothing but the data is read
    query = StrictCharField(max_length=MAX_CHARS)
    top_k = StrictIntegerField(required=False, default=5, min_value=1, max_value=100)
    session_id = StrictUUIDField(required=False, allow_null=True)
    agent_id = StrictUUIDField(required=False, allow_null=True)
    metadata = JSONObjectField(required=False, allow_null=True)
    retrieval = RetrievalOverrides(required=False, allow_null=True)
    since = AwareDateTimeField(
        required=False, allow_null=True, help_text="Only what was created at or after this instant (inclusive)."
    )
    until = AwareDateTimeField(
        required=False, allow_null=True, help_text="Only what was created at or before this instant (inclusive)."
    )

    # Which layers to search: "m0" (messages, knowledge), "m1" (facts); default both while
    # the facts layer is on (memory.facts.selectors.default_layers).
    layers = serializers.ListField(
        child=serializers.ChoiceField(choices=["m0", "m1"]), required=False, allow_empty=False, max_length=2
    )

    def validate(self, attrs):
        if "m1" in attrs.get("layers", ()) and not llm.enabled():
            raise serializers.ValidationError({"layers": ["The m1 layer (facts) is off: LLM_BASE_URL is not set."]})
        if "layers" in attrs:
            attrs["layers"] = list(dict.fromkeys(attrs["layers"]))
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since > until:
            raise serializers.ValidationError({"until": ["Must not be before since."]})
        return attrs


def memory_query_of(data: dict, *, user: User, session_id: uuid.UUID | None = None) -> MemoryQuery:
    """The query ``QueryIn``'s validated ``data`` asks of ``user``'s memory, its ``retrieval``
    overrides applied to the settings' defaults; ``session_id`` (the WebSocket's own session)
    when ``data`` names none."""
    layers = data.get("layers")
    return MemoryQuery(
        user=user,
        query=data["query"],
        top_k=data["top_k"],
        session_id=data.get("session_id") or session_id,
        agent_id=data.get("agent_id"),
        config=RetrievalConfig.from_settings(**(data.get("retrieval") or {})),
        since=data.get("since"),
        until=data.get("until"),
        layers=tuple(layers) if layers is not None else None,
    )


def _knowledge_list() -> serializers.ListField:
    return serializers.ListField(
        child=StrictCharField(trim_whitespace=False, max_length=MAX_CHARS), allow_empty=False, min_length=1, max_length=MAX_BATCH
    )


class KnowledgeAdd(serializers.Serializer):
    knowledge = _knowledge_list()


class KnowledgeIds(serializers.Serializer):
    knowledge_ids = _id_list()


class KnowledgeUpdate(serializers.Serializer):
    knowledge_ids = _id_list()
    new_knowledge = _knowledge_list()

    def validate(self, attrs):
        if len(attrs["knowledge_ids"]) != len(attrs["new_knowledge"]):
            raise serializers.ValidationError({"new_knowledge": "Must have one item per id in knowledge_ids."})
        if len(set(attrs["knowledge_ids"])) != len(attrs["knowledge_ids"]):
            raise serializers.ValidationError({"knowledge_ids": "Ids must be distinct."})
        return attrs


# --- outputs ---------------------------------------------------------------------------------


class UserOut(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "name", "description", "metadata", "created_at", "updated_at"]


class AgentOut(serializers.ModelSerializer):
    class Meta:
        model = Agent
        fields = ["id", "name", "description", "metadata", "created_at", "updated_at"]


class SessionOut(serializers.ModelSerializer):
    class Meta:
        model = Session
        fields = ["id", "name", "user_id", "agent_id", "metadata", "created_at", "updated_at"]


class MessageOut(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "session_id", "role", "content", "metadata", "position", "flushed", "created_at", "updated_at"]

    flushed = serializers.SerializerMethodField()

    def get_flushed(self, message: Message) -> bool:
        return message.flushed_at is not None


class KnowledgeOut(serializers.ModelSerializer):
    class Meta:
        model = Knowledge
        fields = ["id", "user_id", "content", "metadata", "created_at", "updated_at"]


class FlushIn(serializers.Serializer):
    wait = StrictBooleanField(required=False, default=False)


class ApiKeyIn(serializers.Serializer):
    """MemFuse's create-key body. ``key`` (a key chosen by the client) is refused: keys are
    generated here, 32 random characters, so that a fast hash is enough to store them."""

    name = StrictCharField(required=False, max_length=50, allow_null=True)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    permissions = JSONObjectField(required=False, allow_null=True)  # accepted, not used

    def validate(self, attrs):
        # Not a field, so that the schema does not offer it: any ``key`` is refused.
        if "key" in self.initial_data:
            raise serializers.ValidationError({"key": "Keys are generated by the server; do not send one."})
        return attrs


class ApiKeyOut(serializers.ModelSerializer):
    """A key without its secret: only its 8-character prefix is shown, which is also its id.

    (The library's primary key embeds the key's hash, which has no business in a response.)
    """

    id = serializers.CharField(source="prefix")
    expires_at = serializers.DateTimeField(source="expiry_date", allow_null=True)
    created_at = serializers.DateTimeField(source="created")

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "scope", "user_id", "created_at", "expires_at", "revoked"]


class ApiKeyCreatedOut(ApiKeyOut):
    """A new key with its secret: shown once, in the answer to its creation."""

    key = serializers.CharField(help_text="`<prefix>.<32 chars>`: store it now, it cannot be shown again")

    class Meta(ApiKeyOut.Meta):
        fields = [*ApiKeyOut.Meta.fields, "key"]
