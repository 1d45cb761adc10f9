"""Users, agents, sessions, messages and knowledge items.

Ids are UUIDs, as in MemFuse. A message stores its embedding (``vector(384)``, HNSW index
with cosine ops) and a generated ``tsvector`` over its indexed text (GIN index). The indexed
text is what was said: ``"speaker: content"`` plus an image caption when the metadata has one.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from pgvector.django import VectorField
from rest_framework_api_key.models import AbstractAPIKey

EMBEDDING_DIM = settings.MEMFUSE["EMBEDDING_DIM"]


class Named(models.Model):
    """Common fields of the top-level objects a client names."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True
        ordering = ["created_at"]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    """A client application: owns its users and agents (and through them everything else).

    Names of users and agents are unique per tenant, so two tenants can both have ``alice``.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return self.name


class User(Named):
    """An end user of a chat application: the owner of memories.

    ``memory_version`` is bumped in the same transaction as every write to the user's messages
    or knowledge, so per-user caches (BM25 index, query results) know when they are stale.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="users")
    memory_version = models.BigIntegerField(default=0)

    class Meta(Named.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="memory_user_tenant_name_unique")]


class Agent(Named):
    """The assistant (or application persona) a user talks to."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="agents")

    class Meta(Named.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="memory_agent_tenant_name_unique")]


class Session(Named):
    """One conversation of a user with an agent."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="sessions")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="sessions")
    # Position of the session's next message: an add takes its positions by incrementing this
    # counter in the statement that inserts the messages (``memory.services.messages_add``).
    next_position = models.PositiveIntegerField(default=0, editable=False)

    class Meta(Named.Meta):
        # Names are unique per user: the memfuse client finds a session by (name, user_id).
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="memory_session_user_name_unique")]
        indexes = [models.Index(fields=["user", "agent"])]


class Role(models.TextChoices):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


def search_vector_expression() -> SearchVector:
    return SearchVector("index_text", config="english")


class Message(models.Model):
    """One message of a session.

    ``position`` is the message's place in its session (0, 1, ...). ``index_text`` is what is
    embedded and full-text indexed (see ``memory.services.message_index_text``).

    Write-behind: a message is stored (and full-text indexed) at once, and embedded later by a
    flush (``buffers``). Until then ``flushed_at`` is NULL: the message is *pending*. A flush
    claims pending rows by writing its ``flush_claim`` token and a lease (``claimed_until``);
    it writes the embedding only where its token still stands, so a message is embedded by
    one flush however many run. ``flush_count`` counts those writes (1 per version of the
    text), which lets operators and tests see that nothing was embedded twice.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of their own: (session, position) and (user, created_at) lead with them.
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="messages", db_index=False)
    # Denormalised from the session: every query is per user, and a user's query must be
    # able to filter its own rows without a join.
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="messages", db_index=False)
    position = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField()
    metadata = models.JSONField(default=dict, blank=True)
    index_text = models.TextField()
    embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    flushed_at = models.DateTimeField(null=True, blank=True)
    flush_claim = models.UUIDField(null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    flush_count = models.PositiveIntegerField(default=0)
    search_vector = models.GeneratedField(
        expression=search_vector_expression(),
        output_field=SearchVectorField(),
        db_persist=True,
    )
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["session", "position"]
        constraints = [
            models.UniqueConstraint(fields=["session", "position"], name="memory_message_position_unique")
        ]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            # The pending messages of a user, oldest change first: what a flush claims.
            models.Index(
                fields=["user", "updated_at"],
                name="memory_message_pending",
                condition=models.Q(flushed_at__isnull=True),
            ),
            GinIndex(fields=["search_vector"], name="memory_message_search_gin"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class Knowledge(models.Model):
    """A user-level fact given by the client (not part of any conversation)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="knowledge")
    content = models.TextField()
    metadata = models.JSONField(default=dict, blank=True)
    embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    search_vector = models.GeneratedField(
        expression=SearchVector("content", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        verbose_name_plural = "knowledge"
        indexes = [
            models.Index(fields=["user", "created_at"]),
            GinIndex(fields=["search_vector"], name="memory_knowledge_search_gin"),
        ]

    def __str__(self) -> str:
        return self.content[:60]


class KeyScope(models.TextChoices):
    TENANT = "tenant"  # everything of its tenant
    USER = "user"  # one user of its tenant (and the tenant's agents, read-only)
    OPERATOR = "operator"  # operator endpoints only; no tenant data


class ApiKey(AbstractAPIKey):
    """An API key (``djangorestframework-api-key``): ``<prefix>.<secret>``, stored hashed.

    Only the 8-character ``prefix`` is kept in clear (it finds the row); the whole key is
    hashed with SHA-512 (fine for a random 32-character secret; no password hashing needed)
    and compared in constant time. The library's ``get_from_key`` finds a key with one
    unique-index lookup on ``prefix``. ``expiry_date`` (optional) and ``revoked`` (one-way) end a
    key. ``scope``: a tenant key acts for its tenant, a user key for one user of it, an
    operator key only on operator endpoints (no tenant).
    """

    scope = models.CharField(max_length=16, choices=KeyScope.choices, default=KeyScope.TENANT)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys", null=True, blank=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys", null=True, blank=True)

    class Meta(AbstractAPIKey.Meta):
        verbose_name = "API key"
        verbose_name_plural = "API keys"
        constraints = [
            models.CheckConstraint(
                name="memory_apikey_scope_owner",
                condition=(
                    models.Q(scope=KeyScope.TENANT, tenant__isnull=False, user__isnull=True)
                    | models.Q(scope=KeyScope.USER, tenant__isnull=False, user__isnull=False)
                    | models.Q(scope=KeyScope.OPERATOR, tenant__isnull=True, user__isnull=True)
                ),
            )
        ]
