"""Users, agents, sessions, messages and knowledge items.

Ids are UUIDs, as in MemFuse. A message stores its embedding (``vector(384)``), its context
embedding (the mean of its own and its neighbouring turns' embeddings, what the vector
retriever searches: see ``memory.retrieval.vector``) and a generated ``tsvector`` over its
indexed text (GIN index). The indexed text is what was said: ``"speaker: content"`` plus an
image caption when the metadata has one.

Every change of a user's documents takes a number from one sequence (``memory_change_seq``):
a new or edited message or knowledge item carries it in ``seq``, a deleted one leaves a
``Tombstone`` with it. A process's cached index of a user (``memory.retrieval``) catches up by
reading what is numbered after what it has seen.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from pgvector.django import HnswIndex, VectorField
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
    or knowledge, so a process's cached index of the user (``memory.retrieval``) knows it must catch up.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="users")
    memory_version = models.BigIntegerField(default=0)
    # The HNSW index (of ANN_BUCKETS) that holds every context embedding of the user's
    # flushed messages, or NULL: set by a flush once the user holds ``ANN_MIN_MESSAGES``
    # messages, after it has put the older ones there (``memory.indexing.ann.ann_enable``).
    ann_bucket = models.SmallIntegerField(null=True, blank=True)

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
    # counter in the statement that inserts the messages (``memory.services.messages.messages_add``).
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


CHANGE_SEQUENCE = "memory_change_seq"

# Partial HNSW indexes of context embeddings, each holding the users of its bucket. More
# buckets, fewer users per index (a search walks other users' rows of its bucket too); a new
# count is a migration (the indexes are schema).
ANN_BUCKETS = 32


def next_change_number() -> models.Func:
    """``nextval('memory_change_seq')``: the database default of every ``seq`` column."""
    return models.Func(models.Value(CHANGE_SEQUENCE), function="nextval", output_field=models.BigIntegerField())


class Message(models.Model):
    """One message of a session.

    ``position`` is the message's place in its session (0, 1, ...). ``index_text`` is what is
    embedded and full-text indexed (see ``memory.services.messages.message_index_text``).

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
    # The mean of the embeddings of this turn (counted VECTOR_OWN_WEIGHT times) and of the
    # VECTOR_CONTEXT_TURNS turns either side in its session that are embedded: what the vector
    # retriever searches. Written by the flush (memory.indexing.context.context_refresh);
    # NULL while the message is pending. Stored inline (STORAGE PLAIN, migration 0007): a
    # search reads it for every candidate row, and a TOAST fetch per row would double that.
    context_embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    # The partial HNSW index the row is in (memory_message_context_hnsw_<bucket>): the
    # user's ann_bucket, on rows that have a context embedding.
    ann_bucket = models.SmallIntegerField(null=True, blank=True)
    # On rows with an ann_bucket: which of the user's rows share a context embedding (the
    # digest of its half-precision rounding, memory_vector_digest), and whether this row is
    # a copy left out of the HNSW index because another row with that digest is in it. An
    # HNSW graph loses its links among many exact copies of a vector (pgvector keeps ten
    # rows in one node, and its neighbour selection prunes every other neighbour in favour
    # of a copy at distance zero), so a search through it misses even distinct vectors; the
    # search finds copies through the one row in the index (memory.retrieval.vector).
    context_digest = models.BigIntegerField(null=True, blank=True)
    ann_duplicate = models.BooleanField(default=False, db_default=False)
    # The change number of the row's last insert or edit (memory_change_seq).
    seq = models.BigIntegerField(editable=False, db_default=next_change_number())
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
            models.Index(fields=["user", "seq"], name="memory_message_user_seq"),
            # The pending messages of a user, oldest change first: what a flush claims.
            models.Index(
                fields=["user", "updated_at"],
                name="memory_message_pending",
                condition=models.Q(flushed_at__isnull=True),
            ),
            GinIndex(fields=["search_vector"], name="memory_message_search_gin"),
            # Approximate search of the users with many messages (memory.retrieval.vector),
            # one index per bucket: only their rows, so small users' flushes never pay for
            # HNSW inserts, and a large user shares an index with the few others of its
            # bucket, so its rows are most of what the search walks.
            *(
                HnswIndex(
                    name=f"memory_message_context_hnsw_{bucket}",
                    fields=["context_embedding"],
                    m=16,
                    ef_construction=64,
                    opclasses=["vector_ip_ops"],
                    condition=models.Q(ann_bucket=bucket, ann_duplicate=False),
                )
                for bucket in range(ANN_BUCKETS)
            ),
            # A user's rows of one context digest: the copies of a row the search found (their
            # ids from the index alone), and the row in the HNSW index, if any.
            models.Index(
                fields=["user", "context_digest"],
                include=["id"],
                name="memory_message_context_copies",
                condition=models.Q(ann_bucket__isnull=False, ann_duplicate=True),
            ),
            models.Index(
                fields=["user", "context_digest"],
                name="memory_message_context_indexed",
                condition=models.Q(ann_bucket__isnull=False, ann_duplicate=False),
            ),
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
    seq = models.BigIntegerField(editable=False, db_default=next_change_number())  # as Message.seq
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
            models.Index(fields=["user", "seq"], name="memory_knowledge_user_seq"),
            GinIndex(fields=["search_vector"], name="memory_knowledge_search_gin"),
        ]

    def __str__(self) -> str:
        return self.content[:60]


class Tombstone(models.Model):
    """A deleted message or knowledge item, numbered like a change (``memory_change_seq``).

    Cached indexes of the user drop the document when they catch up. Tombstones up to a
    user's ``IndexSnapshot.through_seq`` are pruned when the snapshot is written (the snapshot
    no longer holds the document); ``pruned_seq`` there tells a cache older than that to
    reload.
    """

    seq = models.BigIntegerField(primary_key=True, db_default=next_change_number())
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+", db_index=False)
    kind = models.CharField(max_length=16)  # "message" or "knowledge"
    doc_id = models.UUIDField()

    class Meta:
        indexes = [models.Index(fields=["user", "seq"], name="memory_tombstone_user_seq")]

    def __str__(self) -> str:
        return f"deleted {self.kind} {self.doc_id} (change {self.seq})"


class IndexSnapshot(models.Model):
    """A user's lexical index as written by ``memory.retrieval.bm25.BM25Index.to_bytes``:
    what a process that has not cached the user loads instead of rebuilding it from the rows.
    The bytes are in ``IndexSnapshotPart`` rows, in order.

    ``through_seq``: every change numbered up to it is in the parts. ``pruned_seq``: the
    highest tombstone deleted because this snapshot holds its deletion (a cache that has
    seen less reloads from here).
    """

    user = models.OneToOneField(User, on_delete=models.CASCADE, primary_key=True, related_name="+")
    through_seq = models.BigIntegerField()
    pruned_seq = models.BigIntegerField(default=0)
    documents = models.PositiveIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"index of user {self.user_id} through change {self.through_seq}"


class IndexSnapshotPart(models.Model):
    """Bytes ``[part × SNAPSHOT_PART_BYTES, …)`` of a user's snapshot.

    In parts because libpq never shrinks a connection's buffers: one row or statement of a
    whole snapshot would leave every pooled connection holding buffers as large as the
    largest user's index, for the connection's life.
    """

    snapshot = models.ForeignKey(IndexSnapshot, on_delete=models.CASCADE, related_name="parts", db_column="user_id", db_index=False)
    part = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["snapshot", "part"], name="memory_indexsnapshotpart_unique")]

    def __str__(self) -> str:
        return f"part {self.part} of the index of user {self.snapshot_id}"


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

    ``parent``: the user key that created this one over REST (``memory.services.api_keys.api_key_create``),
    else NULL. A child key is its parent's user's, expires no later than its parent, and is
    revoked with it (``api_key_revoke`` revokes a key's descendants in the same statement).
    """

    scope = models.CharField(max_length=16, choices=KeyScope.choices, default=KeyScope.TENANT)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys", null=True, blank=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys", null=True, blank=True)
    parent = models.ForeignKey("self", on_delete=models.CASCADE, related_name="children", null=True, blank=True)

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


class EmbeddingModel(models.Model):
    """An embedding model the stored vectors come from (``state="active"``, at most one row),
    or one a ``reembed`` run is filling shadow columns with (``"building"``), or one replaced
    by a later run (``"retired"``).

    No active row: the vectors are the configured model's (``EMBEDDING_MODEL_PATH`` or the
    bundled all-MiniLM-L6-v2). Serving processes compare the active row with what they loaded
    and reload (``memory.embedding_model.follow_active_model``). A building row is also the
    run's progress, which the operator dashboard shows. ``name`` is the model directory's name
    (``registry.model_name``), ``path`` the directory, ``dimension`` its output dimension.
    """

    class State(models.TextChoices):
        BUILDING = "building"
        ACTIVE = "active"
        RETIRED = "retired"

    name = models.CharField(max_length=255)
    path = models.TextField()
    dimension = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.BUILDING)
    # The run's phase (memory.indexing.reembed.PHASES) and counts of rows done out of total in it.
    phase = models.CharField(max_length=32, blank=True, default="")
    done = models.BigIntegerField(default=0)
    total = models.BigIntegerField(default=0)
    # Texts/s of the run's fill, and of the model's own encode on a sample of the same texts.
    texts_per_second = models.FloatField(null=True, blank=True)
    raw_texts_per_second = models.FloatField(null=True, blank=True)
    # memory_change_seq when the run started: tombstones after it mark users whose context
    # embeddings the switch recomputes.
    start_seq = models.BigIntegerField(default=0)
    started_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(fields=["state"], condition=models.Q(state="active"), name="memory_embeddingmodel_one_active"),
            models.UniqueConstraint(fields=["state"], condition=models.Q(state="building"), name="memory_embeddingmodel_one_building"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.dimension} dims, {self.state})"
