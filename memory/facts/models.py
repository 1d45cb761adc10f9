"""Facts (M1): what an LLM distils from a user's messages, with the messages it came from.

A ``Fact`` is scoped to one user; its ``FactSource`` rows name the messages (and the version
of each, its ``seq``) it was extracted from. A fact is *live* while at least one source
message still exists with the ``seq`` it had: a deleted or edited message takes its facts
with it (``memory.facts.provenance.facts_sweep``; reads check the sources themselves). A fact
replaced by consolidation's UPDATE keeps its row and points at its successor
(``superseded_by``), so a fact's history is the chain of versions.

A ``FactJob`` asks for one window of a session to be extracted; ``LlmCall`` rows are the
calls made, what the per-tenant budget and the operator figures count.
"""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from pgvector.django import VectorField

from memory.models import EMBEDDING_DIM, Session, Tenant, User


class FactKind(models.TextChoices):
    PREFERENCE = "preference"
    PLAN = "plan"
    RELATION = "relation"
    EVENT = "event"
    ATTRIBUTE = "attribute"
    OTHER = "other"


class Fact(models.Model):
    """One fact about a user, in one sentence (``text``), as of ``valid_from`` when it has a time.

    ``embedding``: the active embedding model's vector of ``text`` (``vector(384)`` with the
    default model), written with the fact and by ``reembed``; ``search_vector``: its
    ``tsvector``, as messages have. ``confidence`` in [0, 1], as the LLM gave it. ``model``:
    the LLM that wrote it. ``version`` counts the versions of the fact (1 for a new one).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="facts", db_index=False)
    text = models.TextField()
    kind = models.CharField(max_length=16, choices=FactKind.choices, default=FactKind.OTHER)
    entities = ArrayField(models.CharField(max_length=255), default=list, blank=True)
    valid_from = models.DateField(null=True, blank=True)
    # The words the time was given in ("last Saturday"), resolved into valid_from against the
    # session's date (memory.facts.times).
    time_expression = models.CharField(max_length=255, blank=True, default="")
    confidence = models.FloatField(default=1.0)
    model = models.CharField(max_length=255)
    embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    # The EmbeddingModel row active when ``embedding`` was written (NULL: the configured model,
    # no reembed yet). A fact of another model is re-embedded (memory.facts.reembed.facts_reembed)
    # and meanwhile found by its words only.
    embedding_generation = models.BigIntegerField(null=True, blank=True)
    search_vector = models.GeneratedField(
        expression=SearchVector("text", config="english"), output_field=SearchVectorField(), db_persist=True
    )
    version = models.PositiveIntegerField(default=1)
    superseded_by = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # Set by consolidation's DELETE: the fact no longer holds (kept for its history).
    deleted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            # The user's current facts: what retrieval and consolidation read.
            models.Index(
                fields=["user", "created_at"],
                name="memory_fact_current",
                condition=models.Q(superseded_by__isnull=True, deleted_at__isnull=True),
            ),
            GinIndex(fields=["search_vector"], name="memory_fact_search_gin"),
        ]

    def __str__(self) -> str:
        return self.text[:80]


class FactSource(models.Model):
    """A message a fact was extracted from, at the version (``seq``) it was read in.

    ``message_id`` is not a foreign key: messages are deleted by plain SQL
    (``memory.services.common._delete_messages``); a source whose message is gone, or whose ``seq``
    changed (an edit), no longer supports its fact.
    """

    fact = models.ForeignKey(Fact, on_delete=models.CASCADE, related_name="sources")
    message_id = models.UUIDField()
    message_seq = models.BigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["fact", "message_id"], name="memory_factsource_unique")]
        indexes = [models.Index(fields=["message_id"], name="memory_factsource_message")]

    def __str__(self) -> str:
        return f"message {self.message_id} (change {self.message_seq})"


class FactJob(models.Model):
    """A request to extract the facts of a window of one session: the flushed messages
    ``message_ids`` (the context turns before them are read when it runs).

    States: ``queued`` (runnable from ``next_attempt_at``), ``running`` (claimed until
    ``claimed_until``), ``done``, ``dead`` (``MAX_ATTEMPTS`` failed; ``last_error`` says why;
    the admin's re-run queues it again). At most one queued job per session: a later flush
    appends its messages to it.
    """

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        DEAD = "dead"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+")
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="+")
    message_ids = ArrayField(models.UUIDField(), default=list)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_default=models.functions.Now())
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    facts_written = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["session"], condition=models.Q(state="queued"), name="memory_factjob_one_queued_per_session"
            )
        ]
        indexes = [
            models.Index(
                fields=["tenant", "next_attempt_at"],
                name="memory_factjob_runnable",
                condition=models.Q(state__in=["queued", "running"]),
            )
        ]

    def __str__(self) -> str:
        return f"facts of {len(self.message_ids)} messages of session {self.session_id} ({self.state})"


class LlmCall(models.Model):
    """One call to the LLM: what a tenant's budget (calls and tokens per minute) and the
    operator's figures count. Rows older than an hour are purged by the extraction worker."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_index=False)
    at = models.DateTimeField(db_default=models.functions.Now())
    purpose = models.CharField(max_length=16)  # "extract" or "consolidate"
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(default=0.0)
    ok = models.BooleanField(default=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "at"], name="memory_llmcall_tenant_at")]

    def __str__(self) -> str:
        return f"{self.purpose} call at {self.at} ({'ok' if self.ok else 'failed'})"
