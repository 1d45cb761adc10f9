"""REST API under ``/api/v1/``, compatible with MemFuse's server and its ``memfuse`` client.

Views are thin: validate with a serializer, call one service or selector, answer in MemFuse's
envelope. Ids in paths are UUIDs; anything else is an unknown id (404 naming the field).

Every view but health needs an API key (``memory.api.auth``); ``request.auth`` is its
``Principal`` and every lookup goes through it, so another tenant's object (or, for a user
key, another user's) is a 404 like an unknown id. A user key may not create users nor
create, change or delete agents (403): an agent is shared by the tenant's users, and
deleting one deletes every session with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from django.conf import settings
from django.db import connection, transaction

from buffers import backlog as buffer_backlog
from buffers import services as buffer_services
from buffers.models import Priority, Reason, State
from memory import selectors
from memory.api import admission
from memory.api import serializers as s
from memory.api.base import ConcurrentAPIView as APIView
from memory.api.errors import envelope
from memory.api.schema import WITH_CONFLICT, Buffer, FlushJob, QueryResult, api_doc, envelope_of, ids
from memory.api.serializers import validated
from memory.errors import Forbidden, NotFound
from memory.models import KeyScope
from memory.services.agents import agent_create, agent_delete, agent_update
from memory.services.api_keys import api_key_create, api_key_revoke
from memory.services.knowledge import knowledge_add, knowledge_delete, knowledge_update
from memory.services.messages import messages_add, messages_delete, messages_update
from memory.services.sessions import session_create, session_delete, session_update
from memory.services.users import user_create, user_delete, user_update
from memory.tenancy import Principal

API_VERSION = "0.3.0"  # the MemFuse API generation we are compatible with (client 0.3.x)


def parse_id(value: str, *, field: str, what: str) -> uuid.UUID:
    """``value`` as a UUID; ``NotFound`` naming ``field`` when it is not one."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} '{value}' not found", field=field) from None


def _user(request, user_id: str):
    return selectors.user_get(principal=request.auth, user_id=parse_id(user_id, field="user_id", what="User"))


def _agent(request, agent_id: str):
    return selectors.agent_get(principal=request.auth, agent_id=parse_id(agent_id, field="agent_id", what="Agent"))


def _session(request, session_id: str):
    return selectors.session_get(
        principal=request.auth, session_id=parse_id(session_id, field="session_id", what="Session")
    )


def _tenant_key_only(request, action: str) -> Principal:
    """The caller's principal when it is a tenant key; ``Forbidden`` for a user key."""
    if request.auth.is_user_key:
        raise Forbidden(f"A user key cannot {action}: use a tenant key")
    return request.auth


class HealthView(APIView):
    authentication_classes = []  # open, and a stale key must not turn a health check into a 401
    permission_classes = []
    throttle_classes = []

    @api_doc(
        "Health",
        {
            "status": s.serializers.ChoiceField(choices=["ok", "degraded"]),
            "version": s.serializers.CharField(),
            "database": s.serializers.CharField(),
        },
        errors=(500, 503),
        description="`degraded` (still 200) when the flush is behind: its oldest pending message is older "
        "than `BACKLOG_DEGRADED_SECONDS`, or the backlog of all tenants is at `MAX_BACKLOG_MESSAGES_TOTAL`. "
        "No figures: it needs no key, and the backlog's are the operators' (`admin/stats`, `/metrics`). "
        "503 when the database cannot be reached.",
    )
    def get(self, request):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        status = buffer_backlog.status()
        message = "Service is healthy" if status == "ok" else "Service is degraded: the flush is behind"
        return envelope({"status": status, "version": API_VERSION, "database": "ok"}, message=message)


# --- users -------------------------------------------------------------------------------------


class UsersView(APIView):
    @api_doc("UserList", {"users": s.UserOut(many=True)}, query=s.NameFilter)
    def get(self, request):
        name = validated(s.NameFilter, request.query_params).get("name")
        users = list(selectors.users_list(principal=request.auth, name=name))
        if name is not None and not users:
            # The memfuse client's get-or-create expects 404 for an unknown name.
            raise NotFound(f"User with name '{name}' not found", field="name")
        return envelope({"users": s.UserOut(users, many=True).data})

    @api_doc("User", {"user": s.UserOut()}, code=201, request=s.NamedIn, errors=WITH_CONFLICT)
    def post(self, request):
        principal = _tenant_key_only(request, "create users")
        data = validated(s.NamedIn, request.data)
        user = user_create(tenant_id=principal.tenant_id, **data)
        return envelope({"user": s.UserOut(user).data}, code=201, message="User created successfully")


class UserDetailView(APIView):
    @api_doc("User", {"user": s.UserOut()})
    def get(self, request, user_id):
        return envelope({"user": s.UserOut(_user(request, user_id)).data})

    @api_doc("User", {"user": s.UserOut()}, request=s.NamedUpdate, errors=WITH_CONFLICT)
    def put(self, request, user_id):
        user = _user(request, user_id)
        user = user_update(user=user, **validated(s.NamedUpdate, request.data))
        return envelope({"user": s.UserOut(user).data}, message="User updated successfully")

    @api_doc("UserDeleted", {"user_id": s.serializers.UUIDField()})
    def delete(self, request, user_id):
        user = _user(request, user_id)
        user_delete(user=user)
        return envelope({"user_id": user_id}, message="User deleted successfully")


class UserQueryView(APIView):
    @api_doc(
        "QueryResults",
        {"results": QueryResult(many=True), "total": s.serializers.IntegerField()},
        request=s.QueryIn,
        description="`since` / `until` (ISO 8601 with a UTC offset; both inclusive) keep only messages whose "
        "`created_at` (which an add may set) and knowledge items whose creation time fall in the window; they "
        "apply inside each retriever, before `top_k` is cut. A naive date-time is a 400 naming the field; an "
        "empty window is an empty result.",
    )
    def post(self, request, user_id):
        user = selectors.user_ref(principal=request.auth, user_id=parse_id(user_id, field="user_id", what="User"))
        data = validated(s.QueryIn, request.data)
        results = selectors.memory_query(s.memory_query_of(data, user=user))
        return envelope({"results": results, "total": len(results)})


class UserKnowledgeView(APIView):
    @api_doc("KnowledgeList", {"knowledge": s.KnowledgeOut(many=True)})
    def get(self, request, user_id):
        items = selectors.knowledge_list(user=_user(request, user_id))
        return envelope({"knowledge": s.KnowledgeOut(items, many=True).data})

    @api_doc("KnowledgeIds", ids("knowledge_ids"), code=201, request=s.KnowledgeAdd)
    def post(self, request, user_id):
        user = _user(request, user_id)
        rows = knowledge_add(user=user, contents=validated(s.KnowledgeAdd, request.data)["knowledge"])
        return envelope({"knowledge_ids": [str(r.pk) for r in rows]}, code=201, message="Knowledge added successfully")

    @api_doc("KnowledgeIds", ids("knowledge_ids"), request=s.KnowledgeUpdate)
    def put(self, request, user_id):
        user = _user(request, user_id)
        data = validated(s.KnowledgeUpdate, request.data)
        rows = knowledge_update(user=user, knowledge_ids=data["knowledge_ids"], new_contents=data["new_knowledge"])
        return envelope({"knowledge_ids": [str(r.pk) for r in rows]}, message="Knowledge updated successfully")

    @api_doc("KnowledgeIds", ids("knowledge_ids"), request=s.KnowledgeIds)
    def delete(self, request, user_id):
        user = _user(request, user_id)
        ids = validated(s.KnowledgeIds, request.data)["knowledge_ids"]
        knowledge_delete(user=user, knowledge_ids=ids)
        return envelope({"knowledge_ids": [str(i) for i in ids]}, message="Knowledge deleted successfully")


class UserKnowledgeReadView(APIView):
    @api_doc("KnowledgeList", {"knowledge": s.KnowledgeOut(many=True)}, request=s.KnowledgeIds)
    def post(self, request, user_id):
        user = _user(request, user_id)
        ids = validated(s.KnowledgeIds, request.data)["knowledge_ids"]
        rows = selectors.knowledge_by_ids(user=user, knowledge_ids=ids)
        return envelope({"knowledge": s.KnowledgeOut(rows, many=True).data})


# --- agents ------------------------------------------------------------------------------------


class AgentsView(APIView):
    @api_doc("AgentList", {"agents": s.AgentOut(many=True)}, query=s.NameFilter)
    def get(self, request):
        name = validated(s.NameFilter, request.query_params).get("name")
        agents = list(selectors.agents_list(principal=request.auth, name=name))
        if name is not None and not agents:
            raise NotFound(f"Agent with name '{name}' not found", field="name")
        return envelope({"agents": s.AgentOut(agents, many=True).data})

    @api_doc("Agent", {"agent": s.AgentOut()}, code=201, request=s.NamedIn, errors=WITH_CONFLICT)
    def post(self, request):
        principal = _tenant_key_only(request, "create agents")
        agent = agent_create(tenant_id=principal.tenant_id, **validated(s.NamedIn, request.data))
        return envelope({"agent": s.AgentOut(agent).data}, code=201, message="Agent created successfully")


class AgentDetailView(APIView):
    @api_doc("Agent", {"agent": s.AgentOut()})
    def get(self, request, agent_id):
        return envelope({"agent": s.AgentOut(_agent(request, agent_id)).data})

    @api_doc("Agent", {"agent": s.AgentOut()}, request=s.NamedUpdate, errors=WITH_CONFLICT)
    def put(self, request, agent_id):
        _tenant_key_only(request, "change agents")
        agent = agent_update(agent=_agent(request, agent_id), **validated(s.NamedUpdate, request.data))
        return envelope({"agent": s.AgentOut(agent).data}, message="Agent updated successfully")

    @api_doc("AgentDeleted", {"agent_id": s.serializers.UUIDField()})
    def delete(self, request, agent_id):
        _tenant_key_only(request, "delete agents")
        agent_delete(agent=_agent(request, agent_id))
        return envelope({"agent_id": agent_id}, message="Agent deleted successfully")


# --- sessions ----------------------------------------------------------------------------------


class SessionsView(APIView):
    @api_doc("SessionList", {"sessions": s.SessionOut(many=True)}, query=s.SessionFilter)
    def get(self, request):
        filters = validated(s.SessionFilter, request.query_params)
        sessions = list(selectors.sessions_list(principal=request.auth, **filters))
        if "name" in filters and not sessions:
            raise NotFound(f"Session with name '{filters['name']}' not found", field="name")
        return envelope({"sessions": s.SessionOut(sessions, many=True).data})

    @api_doc("Session", {"session": s.SessionOut()}, code=201, request=s.SessionIn, errors=WITH_CONFLICT)
    def post(self, request):
        data = validated(s.SessionIn, request.data)
        user = selectors.user_get(principal=request.auth, user_id=data["user_id"])
        agent = selectors.agent_get(principal=request.auth, agent_id=data["agent_id"])
        session = session_create(user=user, agent=agent, name=data.get("name"), metadata=data.get("metadata"))
        return envelope({"session": s.SessionOut(session).data}, code=201, message="Session created successfully")


class SessionDetailView(APIView):
    @api_doc("Session", {"session": s.SessionOut()})
    def get(self, request, session_id):
        return envelope({"session": s.SessionOut(_session(request, session_id)).data})

    @api_doc("Session", {"session": s.SessionOut()}, request=s.SessionUpdate, errors=WITH_CONFLICT)
    def put(self, request, session_id):
        session = session_update(session=_session(request, session_id), **validated(s.SessionUpdate, request.data))
        return envelope({"session": s.SessionOut(session).data}, message="Session updated successfully")

    @api_doc("SessionDeleted", {"session_id": s.serializers.UUIDField()})
    def delete(self, request, session_id):
        session_delete(session=_session(request, session_id))
        return envelope({"session_id": session_id}, message="Session deleted successfully")


class SessionMessagesView(APIView):
    @api_doc("MessageList", {"messages": s.MessageOut(many=True)}, query=s.MessagesListQuery)
    def get(self, request, session_id):
        session = _session(request, session_id)
        params = validated(s.MessagesListQuery, request.query_params)
        rows = selectors.messages_list(
            session=session,
            limit=params["limit"],
            order=params["order"],
            sort_by=params["sort_by"],
            buffered=params["buffer_only"],
        )
        return envelope({"messages": s.MessageOut(rows, many=True).data})

    @api_doc(
        "MessagesAdded",
        {
            **ids("message_ids"),
            "pending_messages": s.serializers.IntegerField(help_text="the user's messages waiting for a flush"),
            "oldest_pending_age_s": s.serializers.FloatField(help_text="seconds the oldest of them has waited (0: none)"),
        },
        code=201,
        request=s.MessagesAdd,
        description="503 with `Retry-After` when the flush backlog of the key's tenant would pass "
        "`MAX_BACKLOG_MESSAGES`, or it holds its share of a backlog of all tenants past "
        "`MAX_BACKLOG_MESSAGES_TOTAL` (nothing is stored).",
    )
    def post(self, request, session_id):
        session = selectors.session_ref(
            principal=request.auth, session_id=parse_id(session_id, field="session_id", what="Session")
        )
        messages = validated(s.MessagesAdd, request.data)["messages"]
        rows = messages_add(session=session, messages=messages)
        return envelope(
            {"message_ids": [str(r.pk) for r in rows], "pending_messages": rows.pending, "oldest_pending_age_s": rows.oldest_pending_age_s},
            code=201,
            message="Messages added successfully",
        )

    @api_doc("MessageIds", ids("message_ids"), request=s.MessagesUpdate)
    def put(self, request, session_id):
        session = _session(request, session_id)
        data = validated(s.MessagesUpdate, request.data)
        rows = messages_update(session=session, message_ids=data["message_ids"], new_messages=data["new_messages"])
        return envelope({"message_ids": [str(r.pk) for r in rows]}, message="Messages updated successfully")

    @api_doc("MessageIds", ids("message_ids"), request=s.MessageIds)
    def delete(self, request, session_id):
        session = _session(request, session_id)
        ids = validated(s.MessageIds, request.data)["message_ids"]
        messages_delete(session=session, message_ids=ids)
        return envelope({"message_ids": [str(i) for i in ids]}, message="Messages deleted successfully")


class SessionMessagesReadView(APIView):
    @api_doc("MessageList", {"messages": s.MessageOut(many=True)}, request=s.MessageIds)
    def post(self, request, session_id):
        session = _session(request, session_id)
        ids = validated(s.MessageIds, request.data)["message_ids"]
        rows = selectors.messages_by_ids(session=session, message_ids=ids)
        return envelope({"messages": s.MessageOut(rows, many=True).data})


# --- buffers -----------------------------------------------------------------------------------


def _queue_manual_flush(target: Callable[[], tuple[uuid.UUID, uuid.UUID | None]]) -> int:
    user_id, session_id = target()
    with transaction.atomic():
        return buffer_services.request_flush(user_id=user_id, session_id=session_id, priority=Priority.HIGH, reason=Reason.MANUAL)


def _manual_flush(request, target: Callable[[], tuple[uuid.UUID, uuid.UUID | None]]):
    """Queue a high-priority flush of ``target()`` (``(user id, session id or None)``, looked up
    for the caller: 404 for an unknown id): 202; with ``{"wait": true}`` answer when it has run (200).

    A wait holds a request thread (no connection): past ``FLUSH_WAIT_MAX_PER_TENANT`` waits of
    the tenant in this process, a 429 with ``Retry-After``, before any lookup, nothing queued.
    A 429 rather than a 202 without waiting: a client that asked to wait would send the request
    again at once. Under ASGI the edge answers most of these 429s (``memory.api.admission``).
    The wait gives its place among the tenant's requests back (``admission.release``): it
    sleeps, holding no connection.
    """
    if not validated(s.FlushIn, request.data).get("wait", False):
        job_id = _queue_manual_flush(target)
        return envelope({"job_id": job_id, "state": State.QUEUED.value}, code=202, message="Flush queued")
    try:
        with buffer_services.wait_place(tenant_id=request.auth.tenant_id):
            job_id = _queue_manual_flush(target)
            admission.release(request)
            job = buffer_services.wait_for_job(job_id=job_id, timeout=settings.BUFFERS["TIMEOUT_SECONDS"])
    except buffer_services.WaitsFull as exc:
        raise admission.wait_refused(exc) from None
    return envelope(buffer_services.job_dict(job), message=f"Flush {job.state}")


flush_doc = api_doc(
    "FlushQueued",
    {"job_id": s.serializers.IntegerField(), "state": s.serializers.ChoiceField(choices=[State.QUEUED.value])},
    code=202,
    request=s.FlushIn,
    responses={200: envelope_of("FlushJob", FlushJob())},
    description="202 with the queued job; with `{\"wait\": true}`, 200 with the job once it has run, or 429 "
    "with `Retry-After` (nothing queued) when `FLUSH_WAIT_MAX_PER_TENANT` flushes of the tenant are waited for "
    "already. A session's repeated requests merge into its one waiting job.",
)


class UserFlushView(APIView):
    @flush_doc
    def post(self, request, user_id):
        return _manual_flush(request, lambda: (_user(request, user_id).pk, None))


class SessionFlushView(APIView):
    @flush_doc
    def post(self, request, session_id):
        def target():
            session = _session(request, session_id)
            return session.user_id, session.pk

        return _manual_flush(request, target)


class UserBufferView(APIView):
    @api_doc("Buffer", Buffer())
    def get(self, request, user_id):
        return envelope(buffer_services.buffer_status(user_id=_user(request, user_id).pk))


# --- API keys (MemFuse's users/{id}/api-keys) --------------------------------------------------


class UserApiKeysView(APIView):
    """A user's keys: a tenant key manages any user's, a user key its own user's. A key made
    with a user key is its child: it expires no later than it and is revoked with it
    (``api_key_create``); a user has at most ``MAX_API_KEYS_PER_USER`` live keys (409)."""

    @api_doc("ApiKeyList", {"api_keys": s.ApiKeyOut(many=True)})
    def get(self, request, user_id):
        keys = selectors.api_keys_list(user=_user(request, user_id))
        return envelope({"api_keys": s.ApiKeyOut(keys, many=True).data})

    @api_doc("ApiKeyCreated", {"api_key": s.ApiKeyCreatedOut()}, code=201, request=s.ApiKeyIn, errors=WITH_CONFLICT)
    def post(self, request, user_id):
        user = _user(request, user_id)
        data = validated(s.ApiKeyIn, request.data)
        api_key, key = api_key_create(
            scope=KeyScope.USER,
            user=user,
            name=data.get("name") or f"{user.name[:40]} key",
            expires_at=data.get("expires_at"),
            created_by=request.auth,
        )
        # The only time the key is shown: it is stored hashed.
        return envelope(
            {"api_key": {**s.ApiKeyOut(api_key).data, "key": key}}, code=201, message="API key created: store it now"
        )


class UserApiKeyDetailView(APIView):
    @api_doc("ApiKeyRevoked", {"api_key_id": s.serializers.CharField()})
    def delete(self, request, user_id, api_key_id):
        api_key = selectors.api_key_get(user=_user(request, user_id), api_key_id=api_key_id)
        api_key_revoke(api_key=api_key)
        return envelope({"api_key_id": api_key.prefix}, message="API key revoked")
