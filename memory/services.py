"""Writes: users, agents, sessions, messages, knowledge.

Every function takes keyword-only arguments that have already been validated for shape (the
API's serializers, or trusted callers such as ``locomo_eval``) and raises ``memory.errors``
exceptions for what only the database can tell (unknown ids, duplicate names). Embedding runs
before the transaction that writes the rows, never inside it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from buffers import backlog, events
from buffers import jobs as buffers_jobs
from buffers.models import Priority
from memory import embedding_model, tenancy
from memory.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated, Unavailable
from memory.inference import registry
from memory.models import Agent, ApiKey, KeyScope, Knowledge, Message, Session, Tenant, User
from memory.operator import metrics
from memory.selectors import knowledge_by_ids, messages_by_ids


@dataclass(frozen=True)
class MessageIn:
    """One message to store. ``metadata`` may carry ``speaker`` and ``image_caption``."""

    role: str
    content: str
    metadata: dict = field(default_factory=dict)
    created_at: datetime | None = None


def message_index_text(*, content: str, metadata: dict) -> str:
    """The text that is embedded and full-text indexed for a message.

    What was said: ``"speaker: content"`` (the speaker's display name from
    ``metadata["speaker"]``, when given) plus ``metadata["image_caption"]``, the caption of an
    image shared with the message, which is part of what was said.
    """
    speaker = metadata.get("speaker")
    text = f"{speaker}: {content}" if isinstance(speaker, str) and speaker else content
    caption = metadata.get("image_caption")
    if isinstance(caption, str) and caption:
        text = f"{text} [image: {caption}]"
    return text


def _bump_memory_version(user_id: uuid.UUID) -> int | None:
    """Mark the user's memory as changed: caches keyed by ``memory_version`` go stale.

    Called FIRST in every transaction that changes or deletes a user's existing messages or
    knowledge. It takes the user row's ``FOR UPDATE`` lock, which orders those writers and a
    flush's write (which takes ``FOR KEY SHARE`` on the same row) one behind the other, so a
    cascade delete or an edit and a flush never deadlock on message rows locked in different
    orders. An add (``_ADD_SQL``) takes only the weaker lock of a plain ``UPDATE``, which a
    flush's ``FOR KEY SHARE`` does not block: adds never wait for a flush's write.

    Holding that lock is also what makes the user's change numbers (``memory_change_seq``,
    taken after it) follow the order of commits (``memory.retrieval.store``). Returns the
    user's ``ann_bucket`` (``None`` also for a user that no longer exists).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE memory_user SET memory_version = memory_version + 1 "
            "WHERE id = (SELECT id FROM memory_user WHERE id = %s FOR UPDATE) RETURNING ann_bucket",
            [user_id],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def _delete_messages(where: str, params: list) -> list[tuple]:
    """Delete the messages ``where`` selects, leaving a tombstone for each (cached indexes
    drop them); returns the ``(session_id, position)`` they held. The caller holds the lock
    of every user concerned (``_bump_memory_version``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH gone AS (DELETE FROM memory_message WHERE {where} RETURNING user_id, id, session_id, position),
            tombstones AS (INSERT INTO memory_tombstone (user_id, kind, doc_id) SELECT user_id, 'message', id FROM gone)
            SELECT session_id, position FROM gone
            """,
            params,
        )
        return cursor.fetchall()


def _create_unique(model, *, field_name: str = "name", **values):
    """Create a row; a unique-constraint violation becomes ``Conflict`` naming ``field_name``."""
    try:
        with transaction.atomic():
            return model.objects.create(**values)
    except IntegrityError:
        raise Conflict(
            f"{model._meta.verbose_name.capitalize()} with {field_name} '{values.get(field_name)}' already exists",
            field=field_name,
        ) from None


def _update_fields(obj, *, field_name: str = "name", **changes):
    """Apply the non-None ``changes`` to ``obj`` and save; duplicate name becomes ``Conflict``."""
    changes = {key: value for key, value in changes.items() if value is not None}
    for key, value in changes.items():
        setattr(obj, key, value)
    if changes:
        try:
            with transaction.atomic():
                obj.save(update_fields=[*changes, "updated_at"])
        except IntegrityError:
            raise Conflict(
                f"{obj._meta.verbose_name.capitalize()} with {field_name} '{changes.get(field_name)}' already exists",
                field=field_name,
            ) from None
    return obj


# --- tenants and API keys ----------------------------------------------------------------------


def tenant_create(*, name: str) -> Tenant:
    """Create a tenant. Raises ``InvalidInput`` for a blank name, ``Conflict`` (field ``name``) when taken."""
    name = name.strip()
    if not name or len(name) > 255:
        raise InvalidInput("A tenant name must have 1 to 255 characters", field="name")
    return _create_unique(Tenant, name=name)


def tenant_delete(*, tenant: Tenant) -> None:
    """Delete a tenant with its users, agents and API keys and, through them, every session,
    message, knowledge item and flush job, in one transaction.

    Lock order (docs/architecture.md): every user of the tenant ``FOR UPDATE``, in ascending id
    order (``_bump_memory_version``), before any of their rows. A flush writing one of them
    holds its user row ``FOR KEY SHARE``: the delete waits for that write to commit instead of
    locking message rows the flush is about to write (a deadlock). No tombstones: they belong
    to their user and go with it, and every read finds the user first. The users' cached
    memory and the tenant's keys are forgotten by this process on commit (other processes
    within ``API_KEY_CACHE_SECONDS``).
    """
    from memory.retrieval import cache

    with transaction.atomic():
        user_ids = sorted(tenant.users.values_list("pk", flat=True))
        for user_id in user_ids:
            _bump_memory_version(user_id)
        prefixes = list(ApiKey.objects.filter(tenant=tenant).values_list("prefix", flat=True))
        tenant.delete()

    def forget() -> None:
        for user_id in user_ids:
            cache.forget(user_id)
        for prefix in prefixes:
            tenancy.forget_key(prefix)

    transaction.on_commit(forget)


def api_key_create(
    *,
    scope: str,
    name: str,
    tenant: Tenant | None = None,
    user: User | None = None,
    expires_at: datetime | None = None,
    created_by: tenancy.Principal | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key; returns ``(row, key)``. The key (``<prefix>.<secret>``) is never stored.

    ``scope`` ``"tenant"`` needs ``tenant``; ``"user"`` needs ``user`` (its tenant is the
    user's); ``"operator"`` takes neither. Raises ``InvalidInput`` naming the wrong field.

    A user has at most ``MAX_API_KEYS_PER_USER`` live (unrevoked, unexpired) user keys: past
    it, ``Conflict`` naming the limit. ``created_by``, the principal of the request that asks
    for the key: when it is a user key, the new key is its child (``ApiKey.parent``), for the
    same user only (``Forbidden`` otherwise), and expires no later than it: no ``expires_at``
    takes the parent's, a later one is refused (``InvalidInput`` naming ``expires_at``). A
    parent revoked meanwhile is ``Unauthenticated``. Counting, the parent's check and the
    insert are serialised per user with ``api_key_revoke``, so concurrent requests can neither
    pass the limit nor make a child that outlives a revocation.
    """
    if scope not in KeyScope.values:
        raise InvalidInput(f"scope must be one of {', '.join(KeyScope.values)}", field="scope")
    if scope == KeyScope.USER:
        if user is None:
            raise InvalidInput("A user key needs a user", field="user")
        tenant = user.tenant
    elif user is not None:
        raise InvalidInput(f"A {scope} key is not bound to a user", field="user")
    if scope == KeyScope.TENANT and tenant is None:
        raise InvalidInput("A tenant key needs a tenant", field="tenant")
    if scope == KeyScope.OPERATOR and tenant is not None:
        raise InvalidInput("An operator key belongs to no tenant", field="tenant")
    if not name or len(name) > 50:
        raise InvalidInput("A key name must have 1 to 50 characters", field="name")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future", field="expires_at")
    child = created_by is not None and created_by.is_user_key
    if child and (scope != KeyScope.USER or created_by.user_id != user.pk):
        raise Forbidden("A user key creates keys for its own user only")
    if scope != KeyScope.USER:
        return ApiKey.objects.create_key(scope=scope, name=name, tenant=tenant, user=user, expiry_date=expires_at)
    with transaction.atomic():
        _lock_user_keys(user.pk)
        parent = None
        if child:
            parent = ApiKey.objects.filter(prefix=created_by.key_id).first()
            if parent is None or parent.revoked or parent.has_expired:
                raise Unauthenticated()
            if parent.expiry_date is not None:
                if expires_at is None:
                    expires_at = parent.expiry_date
                elif expires_at > parent.expiry_date:
                    raise InvalidInput(
                        f"expires_at must not be later than the expiry of the key that creates it ({parent.expiry_date.isoformat()})",
                        field="expires_at",
                    )
        limit = settings.MEMFUSE["MAX_API_KEYS_PER_USER"]
        live = ApiKey.objects.filter(user=user, revoked=False).exclude(expiry_date__lte=timezone.now()).count()
        if live >= limit:
            raise Conflict(
                f"User '{user.name}' has {live} live API keys, the most allowed (MAX_API_KEYS_PER_USER={limit}): revoke one first"
            )
        return ApiKey.objects.create_key(scope=scope, name=name, tenant=tenant, user=user, expiry_date=expires_at, parent=parent)


def _lock_user_keys(user_id: uuid.UUID) -> None:
    """Take the transaction-level advisory lock on ``user_id``'s keys (creations and revocations
    take turns). Not the user row: an add holds that, and keys have nothing to do with adds."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"memory_apikey:{user_id}"])


# A key and its descendants (the keys it created, the keys they created, ...), revoked at once.
_REVOKE_TREE_SQL = """
WITH RECURSIVE tree AS (
    SELECT id FROM memory_apikey WHERE id = %s
    UNION
    SELECT child.id FROM memory_apikey child JOIN tree ON child.parent_id = tree.id
)
UPDATE memory_apikey SET revoked = true WHERE id IN (SELECT id FROM tree) RETURNING prefix
"""


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke ``api_key`` and its descendants for good, in one statement; this process forgets
    them at once, others within ``API_KEY_CACHE_SECONDS``.

    Under the user's key lock (``_lock_user_keys``), and in a statement after it: a child that a
    concurrent ``api_key_create`` committed while this waited is in the statement's snapshot.
    """
    with transaction.atomic():
        if api_key.user_id is not None:
            _lock_user_keys(api_key.user_id)
        with connection.cursor() as cursor:
            cursor.execute(_REVOKE_TREE_SQL, [api_key.pk])
            prefixes = [prefix for (prefix,) in cursor.fetchall()]
    api_key.revoked = True
    # Now, and again after the commit: a request between the two could re-cache a key from
    # the row as it was before this transaction.
    tenancy.forget_keys(prefixes)
    transaction.on_commit(lambda: tenancy.forget_keys(prefixes))
    return api_key


# --- users and agents -------------------------------------------------------------------------


def user_create(*, tenant_id: uuid.UUID, name: str, description: str = "", metadata: dict | None = None) -> User:
    """Create a user of tenant ``tenant_id``. Raises ``Conflict`` (field ``name``) when the tenant has that name."""
    return _create_unique(User, tenant_id=tenant_id, name=name, description=description or "", metadata=metadata or {})


def user_update(*, user: User, name: str | None = None, description: str | None = None, metadata: dict | None = None) -> User:
    """Change the given fields of ``user``. Raises ``Conflict`` when the new name is taken."""
    return _update_fields(user, name=name, description=description, metadata=metadata)


def user_delete(*, user: User) -> None:
    """Delete a user with its sessions, messages and knowledge, in one transaction."""
    from memory.retrieval import cache

    with transaction.atomic():
        _bump_memory_version(user.pk)
        user.delete()
    cache.forget(user.pk)


def agent_create(*, tenant_id: uuid.UUID, name: str, description: str = "", metadata: dict | None = None) -> Agent:
    """Create an agent of tenant ``tenant_id``. Raises ``Conflict`` (field ``name``) when the tenant has that name."""
    return _create_unique(Agent, tenant_id=tenant_id, name=name, description=description or "", metadata=metadata or {})


def agent_update(*, agent: Agent, name: str | None = None, description: str | None = None, metadata: dict | None = None) -> Agent:
    """Change the given fields of ``agent``. Raises ``Conflict`` when the new name is taken."""
    return _update_fields(agent, name=name, description=description, metadata=metadata)


def agent_delete(*, agent: Agent) -> None:
    """Delete an agent with its sessions and their messages, in one transaction."""
    with transaction.atomic():
        for user_id in sorted(set(agent.sessions.values_list("user_id", flat=True))):  # one lock order
            _bump_memory_version(user_id)
        _delete_messages("session_id IN (SELECT id FROM memory_session WHERE agent_id = %s)", [agent.pk])
        agent.delete()


# --- sessions ----------------------------------------------------------------------------------


def session_create(*, user: User, agent: Agent, name: str | None = None, metadata: dict | None = None) -> Session:
    """Create a session of ``user`` with ``agent``; a missing name becomes ``session-<hex>``.

    Raises ``Conflict`` (field ``name``) when the user already has a session of that name, and
    ``NotFound`` (field ``agent_id``) when the agent belongs to another tenant than the user.
    """
    if agent.tenant_id != user.tenant_id:
        raise NotFound(f"Agent '{agent.pk}' not found", field="agent_id")
    return _create_unique(
        Session,
        user=user,
        agent=agent,
        name=name or f"session-{uuid.uuid4().hex[:12]}",
        metadata=metadata or {},
    )


def session_update(*, session: Session, name: str | None = None, metadata: dict | None = None) -> Session:
    """Rename a session or replace its metadata. Raises ``Conflict`` when the name is taken."""
    return _update_fields(session, name=name, metadata=metadata)


def session_delete(*, session: Session) -> None:
    """Delete a session with its messages, in one transaction."""
    with transaction.atomic():
        _bump_memory_version(session.user_id)
        _delete_messages("session_id = %s", [session.pk])
        session.delete()


# --- messages ----------------------------------------------------------------------------------


class AddedMessages(list):
    """The stored messages, in input order, with ``pending``: the user's messages awaiting a flush,
    and ``oldest_pending_age_s``: how long (s) the oldest of them has waited (0 when none did)."""

    def __init__(self, rows: list[Message], *, pending: int, oldest_pending_age_s: float = 0.0) -> None:
        super().__init__(rows)
        self.pending = pending
        self.oldest_pending_age_s = oldest_pending_age_s


_ADD_SQL = f"""
WITH bumped AS (
    -- First, as in every writer of a user's messages: the user row lock orders this add
    -- against edits and a cascade delete (see _bump_memory_version). It is the FOR NO KEY
    -- UPDATE lock of a plain UPDATE: a flush's write (FOR KEY SHARE) does not block it.
    UPDATE memory_user SET memory_version = memory_version + 1 WHERE id = %(user)s RETURNING id
), slot AS (
    -- The session row lock serialises adds to one session; the counter gives their positions.
    UPDATE memory_session SET next_position = next_position + %(count)s
    WHERE id = %(session)s AND EXISTS (SELECT FROM bumped)
    RETURNING next_position - %(count)s AS start
), added AS (
    INSERT INTO memory_message (id, session_id, user_id, position, role, content, metadata, index_text,
                                flush_count, created_at, updated_at)
    SELECT m.id, %(session)s, %(user)s, slot.start + m.ord - 1, m.role, m.content, m.metadata,
           m.index_text, 0, m.created_at, %(now)s
    FROM slot, unnest(%(ids)s::uuid[], %(roles)s::text[], %(contents)s::text[], %(metadata)s::jsonb[],
                      %(index_texts)s::text[], %(created)s::timestamptz[]) WITH ORDINALITY
               AS m(id, role, content, metadata, index_text, created_at, ord)
    RETURNING position, length(index_text) AS chars
), pending AS (
    -- The user's pending messages as before this add (one snapshot) plus the added ones;
    -- oldest_age is the backpressure figure for the client.
    {buffers_jobs.pending_sql(plus="added")}
), job AS (
    -- The size trigger, in the same statement so the add commits once. An existing job of
    -- the same or a higher priority is left alone (nothing written).
    {buffers_jobs.size_trigger_sql(condition="EXISTS (SELECT FROM added)")}
)
SELECT (SELECT min(position) FROM added), messages, EXISTS (SELECT FROM job), oldest_age FROM pending
"""


def messages_add(*, session: Session, messages: list[MessageIn]) -> AddedMessages:
    """Store ``messages`` at the end of ``session``; returns them in input order (``AddedMessages``).

    Write-behind: the rows are written (and full-text indexed) by ONE statement, which takes
    the user row's lock, then the session row's (its ``next_position`` counter gives the
    positions), inserts the rows, reads the user's pending summary and, past the size
    trigger, queues a flush job (``buffers.jobs``' fragments); they are durable when this
    returns. Embedding is left to that flush (``memory.flush``, run by ``buffers``' workers).
    One statement is all or nothing, one exchange with the database and one commit (one WAL
    flush): the add is the hottest write of the service. Raises ``NotFound`` (field
    ``session_id``) when the session was deleted meanwhile, ``Unavailable`` (503) when the
    flush backlog of the session's tenant would pass ``MAX_BACKLOG_MESSAGES`` (or the
    tenant holds its share of a backlog past ``MAX_BACKLOG_MESSAGES_TOTAL``: ``buffers.backlog``);
    then nothing is stored.
    """
    if not messages:
        return AddedMessages([], pending=0)
    try:
        backlog.check_accepting(tenant_id=_tenant_of(session), adding=len(messages))
    except backlog.BacklogFull as exc:
        raise Unavailable(exc.message, retry_after=exc.retry_after) from None
    now = timezone.now()
    rows = [
        Message(
            id=uuid.uuid4(),
            session=session,
            user_id=session.user_id,
            role=m.role,
            content=m.content,
            metadata=m.metadata,
            index_text=message_index_text(content=m.content, metadata=m.metadata),
            created_at=m.created_at or now,
            updated_at=now,
        )
        for m in messages
    ]
    _start_embeddings(rows)
    with connection.cursor() as cursor:
        cursor.execute(
            _ADD_SQL,
            {
                "user": session.user_id,
                "session": session.pk,
                "count": len(rows),
                "now": now,
                "ids": [row.id for row in rows],
                "roles": [row.role for row in rows],
                "contents": [row.content for row in rows],
                "metadata": [json.dumps(row.metadata) for row in rows],
                "index_texts": [row.index_text for row in rows],
                "created": [row.created_at for row in rows],
                **buffers_jobs.size_trigger_params(),
            },
        )
        start, count, job_queued, oldest_age = cursor.fetchone()
    if start is None:
        raise NotFound(f"Session '{session.pk}' not found", field="session_id")
    for offset, row in enumerate(rows):
        row.position = start + offset
        row._state.adding, row._state.db = False, connection.alias
    if job_queued:
        transaction.on_commit(lambda: events.notify_flush(user_id=session.user_id, priority=Priority.NORMAL))
    transaction.on_commit(lambda: metrics.MESSAGES_ADDED.inc(len(rows)))
    transaction.on_commit(lambda: _prefetch_embeddings(session.user_id, rows))
    return AddedMessages(rows, pending=count, oldest_pending_age_s=round(float(oldest_age), 3))


def _tenant_of(session: Session) -> uuid.UUID:
    """The tenant of ``session``'s user, from what its lookup loaded (``selectors.session_ref``
    and ``session_get`` load the user with it, ``session_create`` was given it); one query
    otherwise."""
    return session.user.tenant_id


def _newest_to_embed(rows: list[Message]) -> list[Message]:
    """The rows of an add that a query right after it embeds on demand (read your writes):
    the newest ``PENDING_EMBED_MAX``, when the vector retriever and the read-ahead
    (``READ_AHEAD_MAX``) are on."""
    bound = settings.MEMFUSE["PENDING_EMBED_MAX"]
    if bound <= 0 or settings.MEMFUSE["VECTOR_WEIGHT"] <= 0 or settings.MEMFUSE["READ_AHEAD_MAX"] <= 0:
        return []
    return rows[-bound:]


def _start_embeddings(rows: list[Message]) -> None:
    """Start the query model on the newest of ``rows`` while they are written: the query that
    follows an add finds them embedded, or nearly (the model's recent calls of the user are
    shared by text). Behind every query, bounded per user and tenant (``registry.read_ahead``:
    past the bound the oldest are cancelled); wasted only if the add fails."""
    newest = _newest_to_embed(rows)
    if newest:
        tenant_id = _tenant_of(newest[0].session)
        for row in newest:
            registry.read_ahead(row.index_text, user_id=row.user_id, tenant_id=tenant_id)


def _prefetch_embeddings(user_id: uuid.UUID, rows: list[Message]) -> None:
    """Keep the newest of ``rows`` (pending) embedding for the queries that will want them
    before their flush: the chat pattern is an add, then a query (``UserMemory.prefetch``).
    Their model calls started with the add (``_start_embeddings``)."""
    from memory.retrieval import cache

    newest = _newest_to_embed(rows)
    if newest:
        memory = cache.user_memory(user_id)
        memory.prefetch(
            [(row.id, row.updated_at, row.index_text) for row in newest], tenant_id=_tenant_of(newest[0].session)
        )
        cache.resized(memory)


def messages_update(*, session: Session, message_ids: list[uuid.UUID], new_messages: list[MessageIn]) -> list[Message]:
    """Replace role, content and metadata of the given messages; they are pending again.

    ``message_ids[i]`` gets ``new_messages[i]``. The old embedding is dropped with the old text
    and the claim of any flush under way is cleared, so that flush cannot write a stale
    embedding. Raises ``NotFound`` (field ``message_ids``) when any id is not a message of
    ``session``; then nothing is changed.
    """
    from memory.retrieval.vector import context_refresh

    with transaction.atomic():
        bucket = _bump_memory_version(session.user_id)
        rows = messages_by_ids(session=session, message_ids=message_ids, for_update=True)
        now = timezone.now()  # bulk_update does not apply auto_now
        for row, new in zip(rows, new_messages):
            row.role, row.content, row.metadata = new.role, new.content, new.metadata
            row.index_text = message_index_text(content=new.content, metadata=new.metadata)
            row.embedding = row.context_embedding = row.flushed_at = row.flush_claim = row.claimed_until = None
            row.ann_bucket = None
            row.updated_at = now
        Message.objects.bulk_update(
            rows,
            ["role", "content", "metadata", "index_text", "embedding", "context_embedding", "ann_bucket", "flushed_at",
             "flush_claim", "claimed_until", "updated_at"],
        )
        with connection.cursor() as cursor:
            # A new change number: cached indexes replace the old text (memory.retrieval.store).
            cursor.execute("UPDATE memory_message SET seq = nextval('memory_change_seq') WHERE id = ANY(%s)", [message_ids])
            # The neighbours' context embeddings lose the old text's embedding.
            context_refresh(cursor, seeds=[(row.session_id, row.position) for row in rows], bucket=bucket)
        buffers_jobs.note_pending(user_id=session.user_id)
    return rows


def messages_delete(*, session: Session, message_ids: list[uuid.UUID]) -> None:
    """Delete the given messages. Raises ``NotFound`` when any id is not in ``session``."""
    from memory.retrieval.vector import context_refresh

    with transaction.atomic():
        bucket = _bump_memory_version(session.user_id)
        messages_by_ids(session=session, message_ids=message_ids, for_update=True)
        seeds = _delete_messages("session_id = %s AND id = ANY(%s)", [session.pk, list(message_ids)])
        with connection.cursor() as cursor:
            context_refresh(cursor, seeds=seeds, bucket=bucket)  # the neighbours' windows move on


# --- knowledge ---------------------------------------------------------------------------------


def knowledge_add(*, user: User, contents: list[str]) -> list[Knowledge]:
    """Store user-level facts, embedded in one batch; returns them in input order."""
    while True:  # again when a reembed switched the model meanwhile (embedding_model.guard_write)
        generation = embedding_model.follow_active_model()
        embeddings = registry.embed_documents(contents)
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    embedding_model.guard_write(cursor, generation=generation)
                _bump_memory_version(user.pk)
                return Knowledge.objects.bulk_create(
                    [Knowledge(user=user, content=c, embedding=e) for c, e in zip(contents, embeddings)]
                )
        except embedding_model.ModelChanged:
            continue


def knowledge_update(*, user: User, knowledge_ids: list[uuid.UUID], new_contents: list[str]) -> list[Knowledge]:
    """Replace the content of the given items, re-embedding them. ``NotFound`` on unknown ids."""
    knowledge_by_ids(user=user, knowledge_ids=knowledge_ids)
    while True:  # again when a reembed switched the model meanwhile (embedding_model.guard_write)
        generation = embedding_model.follow_active_model()
        embeddings = registry.embed_documents(new_contents)
        try:
            return _knowledge_write(user=user, knowledge_ids=knowledge_ids, new_contents=new_contents, embeddings=embeddings, generation=generation)
        except embedding_model.ModelChanged:
            continue


def _knowledge_write(*, user: User, knowledge_ids, new_contents, embeddings, generation: int | None) -> list[Knowledge]:
    with transaction.atomic():
        with connection.cursor() as cursor:
            embedding_model.guard_write(cursor, generation=generation)
        _bump_memory_version(user.pk)
        rows = knowledge_by_ids(user=user, knowledge_ids=knowledge_ids, for_update=True)
        now = timezone.now()  # bulk_update does not apply auto_now
        for row, content, embedding in zip(rows, new_contents, embeddings):
            row.content, row.embedding, row.updated_at = content, embedding, now
        Knowledge.objects.bulk_update(rows, ["content", "embedding", "updated_at"])
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE memory_knowledge SET seq = nextval('memory_change_seq') WHERE id = ANY(%s)", [knowledge_ids]
            )
    return rows


def knowledge_delete(*, user: User, knowledge_ids: list[uuid.UUID]) -> None:
    """Delete the given items. Raises ``NotFound`` when any id is not the user's."""
    with transaction.atomic():
        _bump_memory_version(user.pk)
        knowledge_by_ids(user=user, knowledge_ids=knowledge_ids, for_update=True)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                WITH gone AS (DELETE FROM memory_knowledge WHERE user_id = %s AND id = ANY(%s) RETURNING user_id, id)
                INSERT INTO memory_tombstone (user_id, kind, doc_id) SELECT user_id, 'knowledge', id FROM gone
                """,
                [user.pk, list(knowledge_ids)],
            )
