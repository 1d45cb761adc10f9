"""Reads: lookups by id or name, message lists, and the memory query."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from django.db.models import QuerySet

from memory.errors import NotFound
from memory.models import Agent, Knowledge, Message, Session, User
from memory.retrieval import RetrievalConfig, hybrid_search, hybrid_search_stages


def _get(model, pk, *, field: str):
    """The ``model`` row with primary key ``pk``; ``NotFound`` naming ``field`` otherwise."""
    try:
        return model.objects.get(pk=pk)
    except (model.DoesNotExist, ValueError):
        raise NotFound(f"{model._meta.verbose_name.capitalize()} '{pk}' not found", field=field) from None


def user_get(*, user_id: uuid.UUID, field: str = "user_id") -> User:
    """The user with ``user_id``. Raises ``NotFound`` (naming ``field``)."""
    return _get(User, user_id, field=field)


def agent_get(*, agent_id: uuid.UUID, field: str = "agent_id") -> Agent:
    """The agent with ``agent_id``. Raises ``NotFound`` (naming ``field``)."""
    return _get(Agent, agent_id, field=field)


def session_get(*, session_id: uuid.UUID, field: str = "session_id") -> Session:
    """The session with ``session_id`` (its user and agent joined). Raises ``NotFound``."""
    try:
        return Session.objects.select_related("user", "agent").get(pk=session_id)
    except Session.DoesNotExist:
        raise NotFound(f"Session '{session_id}' not found", field=field) from None


def users_list(*, name: str | None = None) -> QuerySet[User]:
    """Users, oldest first; only the one called ``name`` when given."""
    queryset = User.objects.all()
    return queryset.filter(name=name) if name is not None else queryset


def agents_list(*, name: str | None = None) -> QuerySet[Agent]:
    """Agents, oldest first; only the one called ``name`` when given."""
    queryset = Agent.objects.all()
    return queryset.filter(name=name) if name is not None else queryset


def sessions_list(
    *, user_id: uuid.UUID | None = None, agent_id: uuid.UUID | None = None, name: str | None = None
) -> QuerySet[Session]:
    """Sessions, oldest first, filtered by whichever of user, agent and name are given."""
    queryset = Session.objects.select_related("user", "agent")
    if user_id is not None:
        queryset = queryset.filter(user_id=user_id)
    if agent_id is not None:
        queryset = queryset.filter(agent_id=agent_id)
    if name is not None:
        queryset = queryset.filter(name=name)
    return queryset


def messages_list(
    *, session: Session, limit: int, order: str = "desc", sort_by: str = "timestamp", buffered: bool | None = None
) -> list[Message]:
    """Up to ``limit`` messages of ``session``, newest first (``order="desc"``) or oldest first.

    ``sort_by`` is ``"timestamp"`` (created_at, then position) or ``"position"``.
    ``buffered``: ``True`` only messages waiting for a flush, ``False`` only flushed ones.
    """
    keys = ["created_at", "position"] if sort_by == "timestamp" else ["position"]
    if order == "desc":
        keys = [f"-{key}" for key in keys]
    queryset = Message.objects.filter(session=session).defer("embedding")
    if buffered is not None:
        queryset = queryset.filter(flushed_at__isnull=buffered)
    return list(queryset.order_by(*keys)[:limit])


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


def memory_query_stages(
    *,
    user: User,
    query: str,
    top_k: int = 5,
    session_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    config: RetrievalConfig | None = None,
) -> Iterator[tuple[str, list[dict]]]:
    """``memory_query`` in stages: ``("partial", results)`` (BM25), then ``("final", results)``."""
    for stage, hits in hybrid_search_stages(
        user_id=user.pk,
        memory_version=user.memory_version,
        query=query,
        top_k=top_k,
        agent_id=agent_id,
        config=config,
    ):
        yield stage, _results(user, hits, session_id=session_id)


def memory_query(
    *,
    user: User,
    query: str,
    top_k: int = 5,
    session_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    config: RetrievalConfig | None = None,
) -> list[dict]:
    """The ``top_k`` messages and knowledge items of ``user`` most relevant to ``query``.

    Each result is ``{"id", "type": "message"|"knowledge", "content", "role", "score",
    "created_at", "metadata": {"session_id", "session_name", "scope", "retrievers", ...}}``,
    best first; ``score`` is the fused score (RRF, or convex with ``config.fusion``). When
    the cross-encoder reranks (``config.rerank``), the order follows its scores, reported in
    ``metadata.retrievers.reranker``, and ``score`` stays the fused one. ``scope`` is ``"in_session"`` or
    ``"cross_session"`` relative to ``session_id`` (``None`` when no session is given, and
    for knowledge). ``agent_id`` restricts messages to that agent's sessions. Only ``user``'s
    own rows are ever read. Messages not flushed yet are found too (read your writes).
    """
    hits = hybrid_search(
        user_id=user.pk,
        memory_version=user.memory_version,
        query=query,
        top_k=top_k,
        agent_id=agent_id,
        config=config,
    )
    return _results(user, hits, session_id=session_id)


def _results(user: User, hits: list, *, session_id: uuid.UUID | None) -> list[dict]:
    """Result dicts of ``(key, score, retrievers)`` hits, in hit order (one query per kind)."""
    message_ids = [key.id for key, _, _ in hits if key.kind == "message"]
    knowledge_ids = [key.id for key, _, _ in hits if key.kind == "knowledge"]
    messages = {
        m.pk: m
        for m in Message.objects.filter(user=user, pk__in=message_ids).select_related("session").defer("embedding")
    }
    knowledge = {k.pk: k for k in Knowledge.objects.filter(user=user, pk__in=knowledge_ids).defer("embedding")}
    results = []
    for key, score, retrievers in hits:
        if key.kind == "message" and key.id in messages:
            m = messages[key.id]
            scope = None if session_id is None else ("in_session" if m.session_id == session_id else "cross_session")
            results.append(
                {
                    "id": str(m.pk),
                    "type": "message",
                    "content": m.content,
                    "role": m.role,
                    "score": round(score, 6),
                    "created_at": m.created_at.isoformat(),
                    "metadata": {
                        **m.metadata,
                        "session_id": str(m.session_id),
                        "session_name": m.session.name,
                        "position": m.position,
                        "scope": scope,
                        "flushed": m.flushed_at is not None,
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
