"""The MCP tools: ``memory_add``, ``memory_query``, ``memory_list``, ``memory_delete``, ``knowledge_add``.

Each tool checks its arguments with the REST API's serializers (``memory.api.serializers``)
and calls the selectors and services the REST views call, through the caller's
``Principal``: the same rules, the same scoping (another tenant's objects do not exist; a
user key reaches its own user only) and the same result shapes as REST. Results are
structured content (``structuredContent``) with a short text rendering beside it. A refused
call is an MCP tool error (``isError``) whose text names the argument, and writes nothing.

The principal of an HTTP call is put on the request by ``memory.mcp.http`` (the Bearer key,
resolved as REST resolves it); over stdio it is the key ``manage.py mcp_stdio`` was started
with (``use_stdio_key``), re-checked on every call. Database work and model inference run in
a worker thread, never on the event loop.

Protocol: https://modelcontextprotocol.io/specification/2025-06-18/server/tools
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Annotated, Any, Literal, NotRequired

from channels.db import database_sync_to_async
from django.db import close_old_connections, connections, transaction
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field
from rest_framework.exceptions import ValidationError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from memory import selectors, services, tenancy
from memory.api import serializers as s
from memory.api.serializers import validated
from memory.errors import Conflict, ErrorAnswer, Forbidden, InvalidInput, NotFound, Unauthenticated, error_for
from memory.models import Agent, Session, User
from memory.retrieval import RetrievalConfig
from memory.tenancy import Principal

PRINCIPAL_SCOPE_KEY = "memfuse.principal"  # set on the ASGI scope by memory.mcp.http
DEFAULT_AGENT = "mcp"  # the agent and session names memory_add uses when none is given
DEFAULT_SESSION = "mcp"
TEXT_PREVIEW_CHARS = 160

_stdio_principal: Principal | None = None


def use_stdio_key(principal: Principal) -> None:
    """Serve stdio calls (no HTTP request) as ``principal`` (``manage.py mcp_stdio``)."""
    global _stdio_principal
    _stdio_principal = principal


@contextmanager
def _root_logging_kept():
    """``MCPServer()`` runs ``logging.basicConfig`` (a handler and level on the root logger); the
    project's loggers have their own handlers and propagate, so every line would print twice."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


with _root_logging_kept():
    server = MCPServer(
        name="memfuse",
        instructions=(
            "Long-term memory of chats. memory_add stores turns, memory_query finds what is relevant "
            "(hybrid BM25 + vector retrieval, optionally within a time window), memory_list browses "
            "sessions and messages, memory_delete forgets, knowledge_add stores facts about a user. "
            "With a tenant key, name the user in each call; a user key acts for its own user."
        ),
    )


# --- calling ---------------------------------------------------------------------------------


def _run(principal: Principal | None, work: Callable[[Principal], Any]):
    """``work(principal)`` in a worker thread, its refusals (``memory.errors.error_for``) as
    ``ToolError``; returns its connections to the pool."""
    close_old_connections()
    try:
        if principal is None:  # stdio: the command's key, unless revoked or expired since
            principal = _stdio_principal
            if principal is None or not tenancy.still_usable(principal):
                raise Unauthenticated()
        return work(principal)
    except Exception as exc:
        answer = error_for(exc)
        if answer is None:
            raise
        raise ToolError(_error_text(answer, exc)) from None
    finally:
        connections.close_all()


def _error_text(answer: ErrorAnswer, exc: Exception) -> str:
    """A tool error's text: the message, and the arguments it names (a validation error's
    message names them already)."""
    if isinstance(exc, ValidationError) or not answer.fields:
        return answer.message
    return f"{answer.message} (argument: {', '.join(answer.fields)})"


async def _call(ctx: Context, work: Callable[[Principal], Any]):
    request = ctx.request_context.request
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY) if request is not None else None
    if request is not None and principal is None:  # served outside memory.mcp.http: refuse
        raise ToolError(Unauthenticated.default_message)
    return await database_sync_to_async(_run, thread_sensitive=False)(principal, work)


def _result(data: dict, text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TEXT_PREVIEW_CHARS else text[: TEXT_PREVIEW_CHARS - 1] + "…"


def _present(**values) -> dict:
    """The arguments that were given (``None`` is absent), for a serializer."""
    return {name: value for name, value in values.items() if value is not None}


# --- who and where ---------------------------------------------------------------------------


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _user(principal: Principal, user: str | None, *, create: bool = False) -> User:
    """The user named by ``user`` (a name or an id) as ``principal`` sees it.

    A user key's own user when ``user`` is ``None``; with a tenant key ``user`` is required
    and, with ``create``, a name not taken yet creates that user (the ``memfuse`` client's
    ``init``). Raises ``NotFound`` (argument ``user``) for a user the key may not see.
    """
    if user is None:
        if principal.is_user_key:
            return selectors.user_get(principal=principal, user_id=principal.user_id, field="user")
        raise InvalidInput("user is required with a tenant key: a user's name or id", field="user")
    if not isinstance(user, str) or not user.strip() or len(user) > 255 or not s.storable(user):
        raise InvalidInput("user must be a user's name or id (1 to 255 characters)", field="user")
    user_id = _as_uuid(user)
    found = (
        selectors.users_visible(principal=principal).filter(pk=user_id).first()
        if user_id is not None
        else selectors.users_list(principal=principal, name=user).first()
    )
    if found is not None:
        return found
    if create and user_id is None and not principal.is_user_key:
        try:
            return services.user_create(tenant_id=principal.tenant_id, name=user)
        except Conflict:  # created meanwhile by another call
            return selectors.users_list(principal=principal, name=user).get()
    raise NotFound(f"User '{user}' not found", field="user")


def _session(principal: Principal, session_id: str, *, field: str = "session_id") -> Session:
    session_uuid = _as_uuid(session_id) if isinstance(session_id, str) else None
    if session_uuid is None:
        raise NotFound(f"Session '{session_id}' not found", field=field)
    return selectors.session_get(principal=principal, session_id=session_uuid, field=field)


def _agent(principal: Principal, name: str) -> Agent:
    agent = selectors.agents_list(principal=principal, name=name).first()
    if agent is not None:
        return agent
    if principal.is_user_key:
        raise Forbidden(f"Agent '{name}' does not exist and a user key cannot create agents", field="agent")
    try:
        return services.agent_create(tenant_id=principal.tenant_id, name=name)
    except Conflict:
        return selectors.agents_list(principal=principal, name=name).get()


def _named_session(principal: Principal, *, user: str | None, agent: str, session: str) -> Session:
    """The session called ``session`` of the user, created with ``agent`` (created too) on first use."""
    for name, value in (("agent", agent), ("session", session)):
        if not value.strip() or len(value) > 255 or not s.storable(value):
            raise InvalidInput(f"{name} must be a name of 1 to 255 characters", field=name)
    owner = _user(principal, user, create=True)
    existing = selectors.sessions_list(principal=principal, user_id=owner.pk, name=session).first()
    if existing is not None:
        return existing
    try:
        return services.session_create(user=owner, agent=_agent(principal, agent), name=session)
    except Conflict:
        return selectors.sessions_list(principal=principal, user_id=owner.pk, name=session).get()


# --- arguments ----------------------------------------------------------------------------------


class MessageArg(TypedDict):
    """One chat turn, as in REST ``POST sessions/{id}/messages``."""

    role: Annotated[Literal["user", "assistant", "system"], Field(description="Who spoke.")]
    content: Annotated[str, Field(description="What was said.")]
    name: NotRequired[Annotated[str, Field(description="The speaker's display name (stored as metadata.speaker).")]]
    created_at: NotRequired[
        Annotated[str, Field(description="When it was said, ISO 8601 with a UTC offset (imports of old chats); default: now.")]
    ]
    metadata: NotRequired[Annotated[dict[str, Any], Field(description="Any JSON object kept with the message.")]]


UserArg = Annotated[
    str | None,
    Field(
        description="The user: a name or an id. Required with a tenant key (memory_add and knowledge_add create "
        "a new name); with a user key, omit it (or give the key's own user)."
    ),
]
SessionIdArg = Annotated[str | None, Field(description="A session's id.")]
SinceArg = Annotated[
    str | None,
    Field(description="Only memories created at or after this instant: ISO 8601 with a UTC offset (2026-03-01T00:00:00+01:00)."),
]
UntilArg = Annotated[
    str | None, Field(description="Only memories created at or before this instant: ISO 8601 with a UTC offset.")
]


# --- tools -------------------------------------------------------------------------------------


@server.tool(annotations=ToolAnnotations(title="Add messages to a session", destructive_hint=False))
async def memory_add(
    messages: Annotated[list[MessageArg], Field(description="The turns to store, in order.")],
    ctx: Context,
    session_id: Annotated[str | None, Field(description="The session's id; or give user, agent and session names.")] = None,
    user: UserArg = None,
    agent: Annotated[str, Field(description="The agent's name, created on first use (not by a user key).")] = DEFAULT_AGENT,
    session: Annotated[str, Field(description="The session's name, created for the user on first use.")] = DEFAULT_SESSION,
) -> CallToolResult:
    """Store chat turns at the end of a session: by session_id, or by user + agent + session names
    (each created on first use). The turns are searchable at once (before they are embedded).

    Returns {session_id, user_id, agent_id, message_ids, pending_messages}. Nothing is stored
    when any argument is refused."""

    def work(principal: Principal) -> dict:
        batch = validated(s.MessagesAdd, {"messages": messages})["messages"]
        with transaction.atomic():  # a session created here goes with the add, or not at all
            target = (
                _session(principal, session_id)
                if session_id is not None
                else _named_session(principal, user=user, agent=agent, session=session)
            )
            rows = services.messages_add(session=target, messages=batch)
        return {
            "session_id": str(target.pk),
            "user_id": str(target.user_id),
            "agent_id": str(target.agent_id),
            "message_ids": [str(row.pk) for row in rows],
            "pending_messages": rows.pending,
        }

    data = await _call(ctx, work)
    return _result(data, f"Stored {len(data['message_ids'])} message(s) in session {data['session_id']}.")


@server.tool(annotations=ToolAnnotations(title="Search the memory", read_only_hint=True))
async def memory_query(
    query: Annotated[str, Field(description="What to look for, in words.")],
    ctx: Context,
    user: UserArg = None,
    top_k: Annotated[int, Field(description="How many results, 1 to 100.")] = 5,
    session_id: Annotated[
        str | None, Field(description="The current session: results are tagged in_session or cross_session.")
    ] = None,
    agent_id: Annotated[str | None, Field(description="Only messages of this agent's sessions.")] = None,
    since: SinceArg = None,
    until: UntilArg = None,
    layers: Annotated[
        list[str] | None,
        Field(description='Memory layers to search: "m0" (messages, knowledge), "m1" (facts, when the LLM layer is on).'),
    ] = None,
) -> CallToolResult:
    """Find the user's messages and knowledge most relevant to a query (hybrid BM25 + vector
    retrieval, fused by RRF), optionally within a time window (since/until, inclusive, on each
    memory's creation time). Messages not embedded yet are found too.

    Returns {results: [{id, type, content, role, score, created_at, metadata: {session_id,
    session_name, scope, retrievers, ...}}], total}, best first: the REST query's results."""

    def work(principal: Principal) -> dict:
        data = validated(
            s.QueryIn,
            _present(query=query, top_k=top_k, session_id=session_id, agent_id=agent_id, since=since, until=until, layers=layers),
        )
        if user is None and not principal.is_user_key and data.get("session_id") is not None:
            owner = selectors.session_get(principal=principal, session_id=data["session_id"]).user
        else:
            owner = _user(principal, user)
        results = selectors.memory_query(
            user=owner,
            query=data["query"],
            top_k=data["top_k"],
            session_id=data.get("session_id"),
            agent_id=data.get("agent_id"),
            config=RetrievalConfig.from_settings(),
            since=data.get("since"),
            until=data.get("until"),
            layers=data.get("layers"),
        )
        return {"results": results, "total": len(results)}

    data = await _call(ctx, work)
    lines = [
        f"{rank}. [{r['score']:.4f}] {r['type']} {r['role'] or ''} {r['created_at']}: {_preview(r['content'])}"
        for rank, r in enumerate(data["results"], 1)
    ]
    return _result(data, "\n".join(lines) if lines else "No memories found.")


@server.tool(annotations=ToolAnnotations(title="List sessions or messages", read_only_hint=True))
async def memory_list(
    ctx: Context,
    user: UserArg = None,
    session_id: Annotated[str | None, Field(description="List this session's messages instead of the user's sessions.")] = None,
    limit: Annotated[int, Field(ge=1, le=1000, description="Page size.")] = 20,
    offset: Annotated[int, Field(ge=0, description="Items to skip: the next_offset of the previous page.")] = 0,
) -> CallToolResult:
    """List a user's sessions (oldest first), or a session's messages (in order), one page at a time.

    Returns {sessions: [...]} or {messages: [...]} (the REST shapes) with next_offset (null on
    the last page)."""

    def work(principal: Principal) -> dict:
        if session_id is not None:
            rows = selectors.messages_list(
                session=_session(principal, session_id), limit=limit + 1, order="asc", sort_by="position", offset=offset
            )
            key, items = "messages", s.MessageOut(rows[:limit], many=True).data
        else:
            owner = _user(principal, user)
            rows = list(selectors.sessions_list(principal=principal, user_id=owner.pk)[offset : offset + limit + 1])
            key, items = "sessions", s.SessionOut(rows[:limit], many=True).data
        return {key: items, "next_offset": offset + limit if len(rows) > limit else None}

    data = await _call(ctx, work)
    if "messages" in data:
        lines = [f"{m['position']}. {m['role']}: {_preview(m['content'])}" for m in data["messages"]]
    else:
        lines = [f"{x['id']} {x['name']}" for x in data["sessions"]]
    more = f"\n(more: offset {data['next_offset']})" if data["next_offset"] is not None else ""
    return _result(data, ("\n".join(lines) or "Nothing to list.") + more)


@server.tool(annotations=ToolAnnotations(title="Forget memories", destructive_hint=True, idempotent_hint=True))
async def memory_delete(
    what: Annotated[
        Literal["messages", "session", "user"],
        Field(description="messages: the given message_ids of session_id; session: a whole session; user: "
              "the user with all of their memory."),
    ],
    ctx: Context,
    session_id: SessionIdArg = None,
    message_ids: Annotated[list[str] | None, Field(description="The messages to delete (what=messages).")] = None,
    user: UserArg = None,
) -> CallToolResult:
    """Delete messages of a session, a session with its messages, or a user with all their memory.

    Returns {deleted: what, ids: [...]}. An id the key may not see is refused (nothing deleted)."""

    def work(principal: Principal) -> dict:
        if what == "user":
            owner = _user(principal, user)
            owner_id = str(owner.pk)  # Model.delete() clears it
            services.user_delete(user=owner)
            return {"deleted": "user", "ids": [owner_id]}
        if session_id is None:
            raise InvalidInput(f"session_id is required to delete {what}", field="session_id")
        target = _session(principal, session_id)
        if what == "session":
            services.session_delete(session=target)
            return {"deleted": "session", "ids": [str(target.pk)]}
        if message_ids is None:
            raise InvalidInput("message_ids is required to delete messages", field="message_ids")
        ids = validated(s.MessageIds, {"message_ids": message_ids})["message_ids"]
        services.messages_delete(session=target, message_ids=ids)
        return {"deleted": "messages", "ids": [str(i) for i in ids]}

    data = await _call(ctx, work)
    return _result(data, f"Deleted {data['deleted']}: {', '.join(data['ids'])}.")


@server.tool(annotations=ToolAnnotations(title="Add facts about a user", destructive_hint=False))
async def knowledge_add(
    knowledge: Annotated[list[str], Field(description="Facts about the user, one per item.")],
    ctx: Context,
    user: UserArg = None,
) -> CallToolResult:
    """Store user-level facts (knowledge items), found by memory_query across all sessions.

    Returns {user_id, knowledge_ids}."""

    def work(principal: Principal) -> dict:
        contents = validated(s.KnowledgeAdd, {"knowledge": knowledge})["knowledge"]
        owner = _user(principal, user, create=True)
        rows = services.knowledge_add(user=owner, contents=contents)
        return {"user_id": str(owner.pk), "knowledge_ids": [str(row.pk) for row in rows]}

    data = await _call(ctx, work)
    return _result(data, f"Stored {len(data['knowledge_ids'])} knowledge item(s) for user {data['user_id']}.")
