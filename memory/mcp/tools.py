"""The MCP tools: ``memory_add``, ``memory_query``, ``memory_list``, ``memory_delete``, ``knowledge_add``.

Each tool checks its arguments with the REST API's serializers (``memory.api.serializers``)
and calls the selectors and services the REST views call, through the caller's
``Principal``: the same rules, the same scoping (another tenant's objects do not exist; a
user key reaches its own user only) and the same result shapes as REST. Results are
structured content (``structuredContent``) with a short text rendering beside it. A refused
call is an MCP tool error (``isError``) whose text names the argument, and writes nothing.

The tools only parse their arguments and call: getting or creating a user, an agent and a
session is the services' (``user_get_or_create``, ``session_get_or_create``,
``messages_add_to_named_session``), as REST and the WebSocket would call them.

The principal of an HTTP call is put on the request by ``memory.mcp.http`` (the Bearer key,
resolved as REST resolves it); over stdio it is the key ``manage.py mcp_stdio`` was started
with (``use_stdio_key``), re-checked on every call. Database work and model inference run in
a worker thread, never on the event loop. The server (``mcp_server``) is built on first use,
by the transport that serves it.

Protocol: https://modelcontextprotocol.io/specification/2025-06-18/server/tools
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, NotRequired

from channels.db import database_sync_to_async
from django.db import close_old_connections, connections
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field
from rest_framework.exceptions import ValidationError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from memory import selectors, tenancy
from memory.api import serializers as s
from memory.api.serializers import validated
from memory.errors import ErrorAnswer, InvalidInput, NotFound, Unauthenticated, error_for
from memory.models import Session
from memory.services import knowledge as knowledge_services
from memory.services.messages import messages_add, messages_add_to_named_session, messages_delete
from memory.services.sessions import session_delete
from memory.services.users import user_delete, user_get_or_create
from memory.tenancy import Principal
from memory.validation import storable

PRINCIPAL_SCOPE_KEY = "memfuse.principal"  # set on the ASGI scope by memory.mcp.http
DEFAULT_AGENT = "mcp"  # the agent and session names memory_add uses when none is given
DEFAULT_SESSION = "mcp"
TEXT_PREVIEW_CHARS = 160

_stdio_principal: Principal | None = None


def use_stdio_key(principal: Principal) -> None:
    """Serve stdio calls (no HTTP request) as ``principal`` (``manage.py mcp_stdio``)."""
    global _stdio_principal
    _stdio_principal = principal


INSTRUCTIONS = (
    "Long-term memory of chats. memory_add stores turns, memory_query finds what is relevant "
    "(hybrid BM25 + vector retrieval, optionally within a time window), memory_list browses "
    "sessions and messages, memory_delete forgets, knowledge_add stores facts about a user. "
    "With a tenant key, name the user in each call; a user key acts for its own user."
)

_tools: list[tuple[Callable, ToolAnnotations]] = []
_server: MCPServer | None = None
_server_lock = threading.Lock()


def _tool(annotations: ToolAnnotations):
    """Declare the decorated coroutine a tool of the server ``mcp_server`` builds."""

    def declare(function: Callable) -> Callable:
        _tools.append((function, annotations))
        return function

    return declare


def mcp_server() -> MCPServer:
    """The MCP server with every tool of this module, built on first use (once per process):
    by ``memory.mcp.http`` on the first request to ``/mcp``, by ``manage.py mcp_stdio``."""
    global _server
    with _server_lock:
        if _server is None:
            server = MCPServer(name="memfuse", instructions=INSTRUCTIONS)
            for function, annotations in _tools:
                server.add_tool(function, annotations=annotations)
            _server = server
        return _server


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


def _user_ref(user: str | None) -> uuid.UUID | str | None:
    """The ``user`` argument parsed: an id, a name, or ``None`` (a user key's own user).
    Raises ``InvalidInput`` (argument ``user``) for a value that is neither."""
    if user is None:
        return None
    if not isinstance(user, str) or not user.strip() or len(user) > 255 or not storable(user):
        raise InvalidInput("user must be a user's name or id (1 to 255 characters)", field="user")
    return _as_uuid(user) or user


def _name(value: str, field: str) -> str:
    """An agent's or session's name argument; ``InvalidInput`` naming ``field`` unless storable, 1 to 255 characters."""
    if not value.strip() or len(value) > 255 or not storable(value):
        raise InvalidInput(f"{field} must be a name of 1 to 255 characters", field=field)
    return value


def _session(principal: Principal, session_id: str, *, field: str = "session_id") -> Session:
    session_uuid = _as_uuid(session_id) if isinstance(session_id, str) else None
    if session_uuid is None:
        raise NotFound(f"Session '{session_id}' not found", field=field)
    return selectors.session_get(principal=principal, session_id=session_uuid, field=field)


# --- arguments ----------------------------------------------------------------------------------


class MessageArg(TypedDict):
    """One chat turn, as in REST ``POST sessions/{id}/messages``."""

    role: Annotated[Literal["user", "assistant", "system"], Field(description="Who spoke.")]
    content: Annotated[str, Field(description="What was said.")]
    name: NotRequired[Annotated[str, Field(description="The speaker's display name (stored as metadata.speaker).")]]
    created_at: NotRequired[
        Annotated[
            str, Field(description="When it was said, ISO 8601 with a UTC offset (imports of old chats); default: now.")
        ]
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
    Field(
        description="Only memories created at or after this instant: ISO 8601 with a UTC offset (2026-03-01T00:00:00+01:00)."
    ),
]
UntilArg = Annotated[
    str | None, Field(description="Only memories created at or before this instant: ISO 8601 with a UTC offset.")
]
RetrievalArg = Annotated[
    dict[str, Any] | None,
    Field(
        description="Per-query overrides of the retrieval settings, as in the REST query: bm25_weight, "
        "vector_weight, rrf_k, bm25_candidates, vector_candidates, rerank, rerank_top_n, prf_docs, prf_weight, "
        "fusion (rrf or convex), speaker_weight. An unknown or out-of-range field is refused, named."
    ),
]


# --- tools -------------------------------------------------------------------------------------


@_tool(ToolAnnotations(title="Add messages to a session", destructive_hint=False))
async def memory_add(
    messages: Annotated[list[MessageArg], Field(description="The turns to store, in order.")],
    ctx: Context,
    session_id: Annotated[
        str | None, Field(description="The session's id; or give user, agent and session names.")
    ] = None,
    user: UserArg = None,
    agent: Annotated[
        str, Field(description="The agent's name, created on first use (not by a user key).")
    ] = DEFAULT_AGENT,
    session: Annotated[
        str, Field(description="The session's name, created for the user on first use.")
    ] = DEFAULT_SESSION,
) -> CallToolResult:
    """Store chat turns at the end of a session: by session_id, or by user + agent + session names
    (each created on first use). The turns are searchable at once (before they are embedded).

    Returns {session_id, user_id, agent_id, message_ids, pending_messages}. Nothing is stored
    when any argument is refused."""

    def work(principal: Principal) -> dict:
        batch = validated(s.MessagesAdd, {"messages": messages})["messages"]
        if session_id is not None:
            target = _session(principal, session_id)
            rows = messages_add(session=target, messages=batch)
        else:
            target, rows = messages_add_to_named_session(
                principal=principal,
                user=_user_ref(user),
                agent_name=_name(agent, "agent"),
                session_name=_name(session, "session"),
                messages=batch,
            )
        return {
            "session_id": str(target.pk),
            "user_id": str(target.user_id),
            "agent_id": str(target.agent_id),
            "message_ids": [str(row.pk) for row in rows],
            "pending_messages": rows.pending,
        }

    data = await _call(ctx, work)
    return _result(data, f"Stored {len(data['message_ids'])} message(s) in session {data['session_id']}.")


@_tool(ToolAnnotations(title="Search the memory", read_only_hint=True))
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
    retrieval: RetrievalArg = None,
    layers: Annotated[
        list[str] | None,
        Field(description='Memory layers to search: "m0" (messages, knowledge), "m1" (facts, when the LLM layer is on).'),
    ] = None,
) -> CallToolResult:
    """Find the user's messages and knowledge most relevant to a query (hybrid BM25 + vector
    retrieval, fused by RRF), optionally within a time window (since/until, inclusive, on each
    memory's creation time) and with per-query retrieval overrides (as in the REST query).
    Messages not embedded yet are found too.

    Returns {results: [{id, type, content, role, score, created_at, metadata: {session_id,
    session_name, scope, retrievers, ...}}], total}, best first: the REST query's results."""

    def work(principal: Principal) -> dict:
        data = validated(
            s.QueryIn,
            _present(
                query=query,
                top_k=top_k,
                session_id=session_id,
                agent_id=agent_id,
                since=since,
                until=until,
                retrieval=retrieval,
                layers=layers,
            ),
        )
        if user is None and not principal.is_user_key and data.get("session_id") is not None:
            owner = selectors.session_get(principal=principal, session_id=data["session_id"]).user
        else:
            owner = selectors.user_find(principal=principal, user=_user_ref(user))
        results = selectors.memory_query(s.memory_query_of(data, user=owner))
        return {"results": results, "total": len(results)}

    data = await _call(ctx, work)
    lines = [
        f"{rank}. [{r['score']:.4f}] {r['type']} {r['role'] or ''} {r['created_at']}: {_preview(r['content'])}"
        for rank, r in enumerate(data["results"], 1)
    ]
    return _result(data, "\n".join(lines) if lines else "No memories found.")


@_tool(ToolAnnotations(title="List sessions or messages", read_only_hint=True))
async def memory_list(
    ctx: Context,
    user: UserArg = None,
    session_id: Annotated[
        str | None, Field(description="List this session's messages instead of the user's sessions.")
    ] = None,
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
            owner = selectors.user_find(principal=principal, user=_user_ref(user))
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


@_tool(ToolAnnotations(title="Forget memories", destructive_hint=True, idempotent_hint=True))
async def memory_delete(
    what: Annotated[
        Literal["messages", "session", "user"],
        Field(
            description="messages: the given message_ids of session_id; session: a whole session; user: "
            "the user with all of their memory."
        ),
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
            owner = selectors.user_find(principal=principal, user=_user_ref(user))
            owner_id = str(owner.pk)  # Model.delete() clears it
            user_delete(user=owner)
            return {"deleted": "user", "ids": [owner_id]}
        if session_id is None:
            raise InvalidInput(f"session_id is required to delete {what}", field="session_id")
        target = _session(principal, session_id)
        if what == "session":
            session_delete(session=target)
            return {"deleted": "session", "ids": [str(target.pk)]}
        if message_ids is None:
            raise InvalidInput("message_ids is required to delete messages", field="message_ids")
        ids = validated(s.MessageIds, {"message_ids": message_ids})["message_ids"]
        messages_delete(session=target, message_ids=ids)
        return {"deleted": "messages", "ids": [str(i) for i in ids]}

    data = await _call(ctx, work)
    return _result(data, f"Deleted {data['deleted']}: {', '.join(data['ids'])}.")


@_tool(ToolAnnotations(title="Add facts about a user", destructive_hint=False))
async def knowledge_add(
    knowledge: Annotated[list[str], Field(description="Facts about the user, one per item.")],
    ctx: Context,
    user: UserArg = None,
) -> CallToolResult:
    """Store user-level facts (knowledge items), found by memory_query across all sessions.

    Returns {user_id, knowledge_ids}."""

    def work(principal: Principal) -> dict:
        contents = validated(s.KnowledgeAdd, {"knowledge": knowledge})["knowledge"]
        owner = user_get_or_create(principal=principal, user=_user_ref(user))
        rows = knowledge_services.knowledge_add(user=owner, contents=contents)
        return {"user_id": str(owner.pk), "knowledge_ids": [str(row.pk) for row in rows]}

    data = await _call(ctx, work)
    return _result(data, f"Stored {len(data['knowledge_ids'])} knowledge item(s) for user {data['user_id']}.")
