"""Reads: lookups by id or name, message lists, and the memory query.

Lookups by id and lists take the caller's ``Principal``: they only ever see its tenant's rows
(and, for a user key, its user's). Reads given a ``User`` or ``Session`` trust that the caller
got it through one of those lookups.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

from django.db import connection
from django.db.models import QuerySet

from memory.errors import InvalidInput, NotFound
from memory.facts import selectors as facts_selectors
from memory.inference import llm
from memory.models import Agent, ApiKey, Knowledge, Message, Session, User
from memory.retrieval import MemoryQuery, hybrid_search, hybrid_search_stages
from memory.tenancy import Principal


def _not_found(model, pk, field: str) -> NotFound:
    return NotFound(f"{model._meta.verbose_name.capitalize()} '{pk}' not found", field=field)


def users_visible(*, principal: Principal) -> QuerySet[User]:
    """The users ``principal`` may see: its tenant's, or only its own user for a user key."""
    queryset = User.objects.filter(tenant_id=principal.tenant_id)
    return queryset.filter(pk=principal.user_id) if principal.user_id is not None else queryset


def agents_visible(*, principal: Principal) -> QuerySet[Agent]:
    """The agents of ``principal``'s tenant (user keys see them too: a session needs one)."""
    return Agent.objects.filter(tenant_id=principal.tenant_id)


def sessions_visible(*, principal: Principal) -> QuerySet[Session]:
    """The sessions of the users ``principal`` may see (user and agent joined)."""
    queryset = Session.objects.select_related("user", "agent").filter(user__tenant_id=principal.tenant_id)
    return queryset.filter(user_id=principal.user_id) if principal.user_id is not None else queryset


def user_get(*, principal: Principal, user_id: uuid.UUID, field: str = "user_id") -> User:
    """The user with ``user_id`` if ``principal`` may see it. Raises ``NotFound`` (naming ``field``).

    Another tenant's user is not found, exactly like an unknown id, so ids do not leak.
    """
    try:
        return users_visible(principal=principal).get(pk=user_id)
    except (User.DoesNotExist, ValueError):
        raise _not_found(User, user_id, field) from None


def agent_get(*, principal: Principal, agent_id: uuid.UUID, field: str = "agent_id") -> Agent:
    """The agent with ``agent_id`` in ``principal``'s tenant. Raises ``NotFound`` (naming ``field``)."""
    try:
        return agents_visible(principal=principal).get(pk=agent_id)
    except (Agent.DoesNotExist, ValueError):
        raise _not_found(Agent, agent_id, field) from None


def session_get(*, principal: Principal, session_id: uuid.UUID, field: str = "session_id") -> Session:
    """The session with ``session_id`` (its user and agent joined) if ``principal`` may see it.

    One query (the tenant check rides on the join with the user). Raises ``NotFound``.
    """
    try:
        return sessions_visible(principal=principal).get(pk=session_id)
    except Session.DoesNotExist:
        raise NotFound(f"Session '{session_id}' not found", field=field) from None


def _visible_row(model, select: str, *, object_id: uuid.UUID, principal: Principal, user_column: str, field: str):
    """The row of ``select`` (``... WHERE <id> = %s AND <tenant> = %s``) for ``object_id`` in
    ``principal``'s tenant (and its user, for a user key), as a ``model`` instance holding
    only the selected columns (``Model.from_db``: the others load on access); a selected
    column that is not one of the model's (a joined table's) is set as a plain attribute.
    Raises ``NotFound`` naming ``field`` when there is none, as the ORM lookups do.

    One SQL statement, no ORM query building: for the lookups that run before every add and
    every query (the ORM's were a fifth of the web process's time on the add path).
    """
    params = [object_id, principal.tenant_id]
    if principal.user_id is not None:
        select += f" AND {user_column} = %s"
        params.append(principal.user_id)
    with connection.cursor() as cursor:
        cursor.execute(select, params)
        row = cursor.fetchone()
        selected = dict(zip((column.name for column in cursor.description), row or ()))
    if row is None:
        raise _not_found(model, object_id, field)
    names = [f.attname for f in model._meta.concrete_fields if f.attname in selected]  # from_db's order
    instance = model.from_db(connection.alias, names, [selected[name] for name in names])
    for name in selected.keys() - set(names):
        setattr(instance, name, selected[name])
    return instance


def user_ref(*, principal: Principal, user_id: uuid.UUID, field: str = "user_id") -> User:
    """The user with ``user_id`` if ``principal`` may see it, with ``id``, ``tenant_id``,
    ``memory_version`` and ``ann_bucket`` loaded (what a query needs). Raises ``NotFound``
    like ``user_get``."""
    return _visible_row(
        User,
        "SELECT id, tenant_id, memory_version, ann_bucket FROM memory_user WHERE id = %s AND tenant_id = %s",
        object_id=user_id,
        principal=principal,
        user_column="id",
        field=field,
    )


def session_ref(*, principal: Principal, session_id: uuid.UUID, field: str = "session_id") -> Session:
    """The session with ``session_id`` if ``principal`` may see it, with ``id`` and
    ``user_id`` loaded, and its ``user`` holding ``id`` and ``tenant_id`` (what a message write
    needs: the read-ahead is bounded per tenant). Raises ``NotFound`` like ``session_get``."""
    session = _visible_row(
        Session,
        "SELECT s.id, s.user_id FROM memory_session s JOIN memory_user u ON u.id = s.user_id "
        "WHERE s.id = %s AND u.tenant_id = %s",
        object_id=session_id,
        principal=principal,
        user_column="s.user_id",
        field=field,
    )
    # The statement checked the user's tenant: it is the principal's.
    session.user = User.from_db(connection.alias, ["id", "tenant_id"], [session.user_id, principal.tenant_id])
    return session


def users_list(*, principal: Principal, name: str | None = None) -> QuerySet[User]:
    """Users ``principal`` may see, oldest first; only the one called ``name`` when given."""
    queryset = users_visible(principal=principal)
    return queryset.filter(name=name) if name is not None else queryset


def user_find(*, principal: Principal, user: uuid.UUID | str | None, field: str = "user") -> User:
    """The user ``principal`` names by ``user``: an id, a name, or ``None`` for a user key's own user.

    Raises ``InvalidInput`` (naming ``field``) for ``None`` with a tenant key, and ``NotFound``
    (naming ``field``) for a user the key may not see, exactly as for an unknown one.
    """
    if user is None:
        if principal.is_user_key:
            return user_get(principal=principal, user_id=principal.user_id, field=field)
        raise InvalidInput(f"{field} is required with a tenant key: a user's name or id", field=field)
    visible = users_visible(principal=principal)
    found = visible.filter(pk=user).first() if isinstance(user, uuid.UUID) else visible.filter(name=user).first()
    if found is None:
        raise NotFound(f"User '{user}' not found", field=field)
    return found


def agents_list(*, principal: Principal, name: str | None = None) -> QuerySet[Agent]:
    """Agents of ``principal``'s tenant, oldest first; only the one called ``name`` when given."""
    queryset = agents_visible(principal=principal)
    return queryset.filter(name=name) if name is not None else queryset


def sessions_list(
    *,
    principal: Principal,
    user_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    name: str | None = None,
) -> QuerySet[Session]:
    """Sessions ``principal`` may see, oldest first, filtered by whichever of user, agent and name are given."""
    queryset = sessions_visible(principal=principal)
    if user_id is not None:
        queryset = queryset.filter(user_id=user_id)
    if agent_id is not None:
        queryset = queryset.filter(agent_id=agent_id)
    if name is not None:
        queryset = queryset.filter(name=name)
    return queryset


def api_keys_list(*, user: User) -> QuerySet[ApiKey]:
    """The user keys of ``user`` (revoked and expired ones too), newest first."""
    return ApiKey.objects.filter(user=user)


def api_key_get(*, user: User, api_key_id: str, field: str = "api_key_id") -> ApiKey:
    """The key of ``user`` whose id (its prefix) is ``api_key_id``. Raises ``NotFound`` (naming ``field``)."""
    try:
        return ApiKey.objects.get(user=user, prefix=api_key_id)
    except ApiKey.DoesNotExist:
        raise NotFound(f"API key '{api_key_id}' not found", field=field) from None


def messages_list(
    *,
    session: Session,
    limit: int,
    order: str = "desc",
    sort_by: str = "timestamp",
    buffered: bool | None = None,
    offset: int = 0,
) -> list[Message]:
    """Up to ``limit`` messages of ``session`` after the first ``offset``, newest first
    (``order="desc"``) or oldest first.

    ``sort_by`` is ``"timestamp"`` (created_at, then position) or ``"position"``.
    ``buffered``: ``True`` only messages waiting for a flush, ``False`` only flushed ones.
    """
    keys = ["created_at", "position"] if sort_by == "timestamp" else ["position"]
    if order == "desc":
        keys = [f"-{key}" for key in keys]
    queryset = Message.objects.filter(session=session).defer("embedding")
    if buffered is not None:
        queryset = queryset.filter(flushed_at__isnull=buffered)
    return list(queryset.order_by(*keys)[offset : offset + limit])


def _rows_by_ids(queryset: QuerySet, ids: list[uuid.UUID], *, for_update: bool, field: str, missing_message: str) -> list:
    """Rows of ``queryset`` with ``ids``, in that order; ``NotFound`` naming every missing id."""
    if for_update:
        queryset = queryset.select_for_update()
    found = {row.pk: row for row in queryset.filter(pk__in=ids)}
    missing = [str(i) for i in ids if i not in found]
    if missing:
        raise NotFound(missing_message.format(ids=", ".join(missing)), field=field)
    return [found[i] for i in ids]


def messages_by_ids(*, session: Session, message_ids: list[uuid.UUID], for_update: bool = False) -> list[Message]:
    """The session's messages with ``message_ids``, in that order (locked with ``for_update``).

    Raises ``NotFound`` (field ``message_ids``) naming every id that is not in ``session``.
    """
    return _rows_by_ids(
        Message.objects.filter(session=session),
        message_ids,
        for_update=for_update,
        field="message_ids",
        missing_message="No message with id {ids} in this session",
    )


def knowledge_by_ids(*, user: User, knowledge_ids: list[uuid.UUID], for_update: bool = False) -> list[Knowledge]:
    """The user's knowledge items with ``knowledge_ids``, in that order (locked with ``for_update``).

    Raises ``NotFound`` (field ``knowledge_ids``) naming every id that is not the user's.
    """
    return _rows_by_ids(
        Knowledge.objects.filter(user=user),
        knowledge_ids,
        for_update=for_update,
        field="knowledge_ids",
        missing_message="No knowledge item with id {ids} for this user",
    )


def knowledge_list(*, user: User) -> QuerySet[Knowledge]:
    """The user's knowledge items, oldest first."""
    return Knowledge.objects.filter(user=user).defer("embedding")


def memory_query_stages(q: MemoryQuery) -> Iterator[tuple[str, list[dict]]]:
    """``memory_query(q)`` in stages: ``("partial", results)`` (BM25), then ``("final", results)``.

    With the facts layer on, ``q.layers`` as in ``memory_query``: the partial stage is M0's
    (tagged ``"layer": "m0"``; none when only ``m1`` is asked for), the final one has the facts too."""
    layers = (q.layers or facts_selectors.default_layers()) if llm.enabled() else None
    if layers is not None and "m0" not in layers:
        yield "final", _with_facts(q, messages=[], layers=layers)
        return
    for stage, hits in hybrid_search_stages(q):
        results = _results(q.user, hits, session_id=q.session_id)
        if layers is not None:
            messages = results if stage == "final" else []
            results = _with_facts(q, messages=results, layers=layers if messages else ["m0"])
        yield stage, results


def memory_query(q: MemoryQuery) -> list[dict]:
    """The ``q.top_k`` messages and knowledge items of ``q.user`` most relevant to ``q.query``
    (``MemoryQuery`` gives the fields' shapes and defaults).

    Each result is ``{"id", "type": "message"|"knowledge", "content", "role", "score",
    "created_at", "metadata": {"session_id", "session_name", "scope", "retrievers", ...}}``,
    best first; ``score`` is the fused score (RRF, or convex with ``config.fusion``). When
    the cross-encoder reranks (``config.rerank``), the order follows its scores, reported in
    ``metadata.retrievers.reranker``, and ``score`` stays the fused one. ``scope`` is ``"in_session"`` or
    ``"cross_session"`` relative to ``q.session_id`` (``None`` when no session is given, and
    for knowledge). ``q.agent_id`` restricts messages to that agent's sessions. Only ``q.user``'s
    own rows are ever read. Messages not flushed yet are found too (read your writes).
    ``q.since`` / ``q.until`` (aware datetimes, both inclusive) keep only what was created in that
    window (a message's ``created_at`` may be set by its add), inside each retriever.

    ``q.layers``: ``("m0",)`` (messages and knowledge), ``("m1",)`` (facts), or both; default
    ``memory.facts.selectors.default_layers()``. While the facts layer is on, every result
    carries ``"layer": "m0"|"m1"`` and facts are merged in (``memory.facts.selectors.with_facts``);
    while it is off, results are exactly M0's (``q.layers`` is not read).
    """
    if not llm.enabled():
        return _m0_query(q)
    layers = q.layers or facts_selectors.default_layers()
    messages = _m0_query(q) if "m0" in layers else []
    return _with_facts(q, messages=messages, layers=layers)


def _with_facts(q: MemoryQuery, *, messages: list[dict], layers) -> list[dict]:
    """``memory.facts.selectors.with_facts`` for ``q``: its facts bounded as its messages are."""
    return facts_selectors.with_facts(
        user_id=q.user.pk, query=q.query, top_k=q.top_k, messages=messages, layers=layers,
        agent_id=q.agent_id, since=q.since, until=q.until,
    )  # fmt: skip


def _m0_query(q: MemoryQuery) -> list[dict]:
    return _results(q.user, hybrid_search(q), session_id=q.session_id)


def _results(user: User, hits: list, *, session_id: uuid.UUID | None) -> list[dict]:
    """Result dicts of ``(key, score, retrievers)`` hits, in hit order (one query per kind)."""
    message_ids = [key.id for key, _, _ in hits if key.kind == "message"]
    knowledge_ids = [key.id for key, _, _ in hits if key.kind == "knowledge"]
    messages = {}
    if message_ids:
        # One plain SQL statement, no ORM: this runs on every query, and the ORM's query
        # building and row conversion are a visible part of a query's time in the web process.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT m.id, m.session_id, s.name, m.position, m.role, m.content, m.metadata::text, m.created_at, "
                "m.flushed_at FROM memory_message m JOIN memory_session s ON s.id = m.session_id "
                "WHERE m.user_id = %s AND m.id = ANY(%s)",
                [user.pk, message_ids],
            )
            messages = {row[0]: (*row[:6], json.loads(row[6]), *row[7:]) for row in cursor.fetchall()}
    knowledge = {
        k.pk: k for k in Knowledge.objects.filter(user=user, pk__in=knowledge_ids).defer("embedding")
    } if knowledge_ids else {}
    results = []
    for key, score, retrievers in hits:
        if key.kind == "message" and key.id in messages:
            pk, m_session, session_name, position, role, content, metadata, created_at, flushed_at = messages[key.id]
            scope = None if session_id is None else ("in_session" if m_session == session_id else "cross_session")
            results.append(
                {
                    "id": str(pk),
                    "type": "message",
                    "content": content,
                    "role": role,
                    "score": round(score, 6),
                    "created_at": created_at.isoformat(),
                    "metadata": {
                        **metadata,
                        "session_id": str(m_session),
                        "session_name": session_name,
                        "position": position,
                        "scope": scope,
                        "flushed": flushed_at is not None,
                        "retrievers": retrievers,
                    },
                }
            )
        elif key.kind == "knowledge" and key.id in knowledge:
            k = knowledge[key.id]
            results.append(
                {
                    "id": str(k.pk),
                    "type": "knowledge",
                    "content": k.content,
                    "role": None,
                    "score": round(score, 6),
                    "created_at": k.created_at.isoformat(),
                    "metadata": {**k.metadata, "scope": None, "retrievers": retrievers},
                }
            )
    return results
