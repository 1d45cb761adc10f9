"""The WebSocket of a session (``ws/v1/sessions/<session_id>/``): the memory API over a socket.

It parses frames and dispatches them to the services and selectors the REST views call;
errors are answered as ``memory.errors.error_for`` maps them, as REST and MCP answer them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from buffers import events
from memory import selectors, tenancy
from memory.api import limits
from memory.api import serializers as s
from memory.api.auth import WS_SUBPROTOCOL, check_rate
from memory.api.serializers import validated
from memory.errors import InvalidInput, NotFound, Unauthenticated, error_for
from memory.models import Session
from memory.services.messages import AddedMessages, messages_add
from memory.tenancy import Principal
from memory.validation import JSONTooDeep

logger = logging.getLogger(__name__)


MAX_REQUEST_ID_CHARS = 128


def in_thread(func):
    """``func`` as a coroutine run in the event loop's thread pool, closing stale DB connections.

    Not ``thread_sensitive`` (the default of ``database_sync_to_async``): that runs the sync
    work of every consumer of the process in one shared thread, so a socket's query would wait
    behind all the others' and the embedding batcher could never batch them together (the
    REST views run concurrently for the same reason, ``memory.api.base``). Each call here is
    self-contained (a pooled connection, no transaction left open), so any thread will do.
    The pool is the event loop's default executor (daphne sizes it with ``ASGI_THREADS``).
    """
    return database_sync_to_async(func, thread_sensitive=False)


class ClientLeft(Exception):
    """The WebSocket client left before its answer could be sent."""


class SessionConsumer(AsyncJsonWebsocketConsumer):
    """The WebSocket of one session: ``ws/v1/sessions/<session_id>/``.

    Every frame is a JSON object with a ``type``. A client frame may carry a ``request_id``
    (a string of at most 128 characters, or an integer) chosen by the client; every frame
    answering it echoes it (``null`` when absent or invalid).

    Client to server:

    - ``{"type": "messages.add", "messages": [{role, content, metadata?, name?, created_at?}],
      "request_id"?}``: store the messages at the end of the session (validated as the REST
      ``POST sessions/{id}/messages``: the whole batch, or nothing is stored).
    - ``{"type": "memory.query", "query", "top_k"? (1..100, default 5), "agent_id"?,
      "session_id"? (default: this session, for the ``scope`` tag of results), "retrieval"?
      (per-query overrides, as in the REST query), "since"?, "until"? (ISO 8601 with a UTC
      offset, inclusive, as in the REST query), "request_id"?}``: query the memory of the
      session's user.

    Server to client:

    - ``{"type": "messages.added", "request_id", "message_ids": [...], "pending_messages": n}``:
      the messages are rows (durable); ``n`` is the user's messages waiting for a flush.
    - ``{"type": "memory.results", "request_id", "stage": "partial"|"final", "final": bool,
      "results": [...], "total": n}``: one frame per stage, sent as soon as it is ready: the
      BM25 ranking first (``partial``), then the fused BM25 + vector ranking (``final``;
      only this one when a retriever is switched off by its weight).
      Results have the shape of the REST query's (``memory.selectors.memory_query``).
    - ``{"type": "flush.completed", "session_id", "message_ids": [...]}``: these messages of
      the session were embedded and indexed (pushed whenever a flush writes some; at most
      once, so a client that must know polls ``GET sessions/{id}/messages`` instead).
    - ``{"type": "error", "request_id", "error": {"code", "message", "errors": [{"field",
      "message"}]}}``: code 400 for a bad frame (not JSON, binary, not an object, missing or
      unknown ``type``, invalid ``request_id``, invalid fields such as ``messages[0].role``,
      JSON nested past ``MAX_JSON_DEPTH``), 404 for an unknown id, 413 for a frame over
      ``WS_MAX_FRAME_BYTES`` (not parsed), 429 past the key's ``API_RATE_LIMIT`` (shared with
      its REST requests; the message says when to retry), 503 when no database connection is
      free in time, the database cannot be reached or the flush backlog is full (retry), 500
      for a server error (logged). The connection stays open.

    The connection needs an API key (``memory.api.auth``: the ``Authorization`` header, or a
    ``bearer.<key>`` subprotocol next to ``memfuse``): without a usable one, a 401 error frame
    and close code 4401. An unknown session (or an id that is not a UUID, or a session the key
    may not see: another tenant's or another user's) gets a 404 error frame, then close code
    4404; no database connection free in time (or no database), a 503 frame and code 4503; a
    key past its rate limit, a 429 frame and code 4429 (the connect counts as a request, and
    so does every add or query frame). The key is checked
    when the socket opens and again with each client frame (``tenancy.still_usable``): once
    it is revoked or expired, the next frame gets a 401 error frame and close code 4401.
    Frames of one connection are answered in order: a query delays the frames after it.
    Model inference and database work run in the event loop's thread pool (``in_thread``), never on
    the event loop.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.session_id: uuid.UUID | None = None
        self.group_name: str | None = None

    # --- connection -----------------------------------------------------------------------

    async def connect(self) -> None:
        raw_id = self.scope["url_route"]["kwargs"]["session_id"]
        # A browser that offered subprotocols fails the handshake unless one is chosen.
        subprotocol = WS_SUBPROTOCOL if WS_SUBPROTOCOL in self.scope.get("subprotocols", []) else None
        try:
            session = await in_thread(self._open_session)(raw_id)
        except Exception as exc:
            answer = error_for(exc)
            if answer is None:
                raise
            await self.refuse(answer.status, answer.message, answer.errors, subprotocol=subprotocol)
            return
        self.session_id = session.pk
        self.group_name = events.session_group(session.pk)
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.accept(subprotocol)

    async def refuse(
        self, status: int, message: str, errors: list[dict] | None = None, *, subprotocol: str | None = None
    ) -> None:
        """Accept, send an error frame, and close with code 4000 + ``status``."""
        await self.accept(subprotocol)
        await self.send_error(None, status, message, errors)
        # 4000-4999 are the application's close codes (RFC 6455, 7.4.2): 4000 + HTTP status.
        await self.close(code=4000 + status)

    async def disconnect(self, code: int) -> None:
        if self.group_name is not None:
            await self.channel_layer.group_discard(self.group_name, self.channel_name)

    def _open_session(self, raw_id: str) -> Session:
        """The session of the URL, if the principal may use it (worker thread).

        Raises ``Unauthenticated`` (401) without a usable key, ``NotFound`` (field ``session_id``)
        for a session it may not see, exactly as for an unknown one.
        """
        if self.scope.get("principal_error") is not None:  # the database could not resolve the key
            raise self.scope["principal_error"]
        principal = self.scope.get("principal")
        if not isinstance(principal, Principal):
            raise Unauthenticated()
        check_rate(principal)
        try:
            session_id = uuid.UUID(raw_id)
        except ValueError:
            raise NotFound(f"Session '{raw_id}' not found", field="session_id") from None
        session = selectors.session_get(principal=principal, session_id=session_id)
        if not self.authorize(principal, session):
            raise NotFound(f"Session '{session_id}' not found", field="session_id")
        return session

    def authorize(self, principal: Principal, session: Session) -> bool:
        """Whether ``principal`` (``scope["principal"]``, from ``WebSocketAuthMiddleware``) may use ``session``.

        ``session`` was already looked up through the principal (its tenant, its user for a
        user key); this hook is for finer rules. Runs in a worker thread: it may query.
        """
        return True

    def _principal(self) -> Principal:
        """The connection's principal if its key is still usable and within its rate limit (worker
        thread); else ``Unauthenticated`` (401), or ``RateLimited`` (429)."""
        principal = self.scope["principal"]
        if not tenancy.still_usable(principal):
            raise Unauthenticated()
        check_rate(principal)
        return principal

    # --- client frames --------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        """Decode a frame ourselves: a bad one gets an error frame instead of closing the socket."""
        if self.session_id is None:
            return  # refused at connect; the close is on its way
        if text_data is None:
            await self.send_error(None, 400, "Binary frames are not supported: send JSON text frames")
            return
        limit = settings.MEMFUSE["WS_MAX_FRAME_BYTES"]
        # A character is 1 to 4 bytes in UTF-8: encode only when the length alone cannot tell.
        if len(text_data) > limit or (len(text_data) * 4 > limit and len(text_data.encode("utf-8", "surrogatepass")) > limit):
            message = limits.too_large_message(limit, "frame", "WS_MAX_FRAME_BYTES")
            await self.send_error(None, 413, message)
            return
        try:
            content = await self.decode_json(text_data)
        except JSONTooDeep as exc:
            await self.send_error(None, 400, str(exc), [{"field": exc.path, "message": str(exc)}])
            return
        except ValueError as exc:  # JSONDecodeError, a number out of range
            await self.send_error(None, 400, f"Invalid JSON: {exc}")
            return
        await self.receive_json(content)

    @classmethod
    async def decode_json(cls, text_data: str):
        """A client frame decoded within the limits of ``memory.api.limits`` (as a REST body)."""
        return limits.loads(text_data)

    async def __call__(self, scope, receive, send):
        # Every frame this consumer sends goes through ``send``; uvicorn raises its
        # ``ClientDisconnected`` (an ``OSError``) from a send on a closed connection.
        async def send_to_client(message: dict) -> None:
            try:
                await send(message)
            except OSError as exc:
                raise ClientLeft from exc

        return await super().__call__(scope, receive, send_to_client)

    async def dispatch(self, message: dict) -> None:
        # A client that left before its answer (a frame's, or a flush event's) is not an error:
        # nobody to answer, nothing to log. A write its frame made is committed or not, as on
        # any disconnect.
        try:
            await super().dispatch(message)
        except ClientLeft:
            logger.debug("websocket client of session %s left before its answer", self.session_id)

    async def receive_json(self, content, **kwargs) -> None:
        """Answer one decoded client frame; an error is answered as ``memory.errors.error_for``
        maps it, in an error frame (a 401 also closes the connection: code 4401)."""
        request_id = None
        try:
            if not isinstance(content, dict):
                raise InvalidInput(f"A frame must be a JSON object, not {type(content).__name__}")
            request_id = self._request_id(content)
            handler = self._handler(content)
            await handler(content, request_id)
        except ClientLeft:
            raise
        except Exception as exc:
            answer = error_for(exc)
            if answer is None:
                logger.exception("websocket frame of session %s failed", self.session_id)
                await self.send_error(request_id, 500, "Internal server error")
                return
            await self.send_error(request_id, answer.status, answer.message, answer.errors)
            if answer.status == Unauthenticated.status:
                await self.close(code=4000 + answer.status)

    @staticmethod
    def _request_id(content: dict) -> str | int | None:
        """The frame's ``request_id``: a string of at most 128 characters, an integer, or absent."""
        request_id = content.get("request_id")
        if request_id is None:
            return None
        if isinstance(request_id, bool) or not isinstance(request_id, str | int):
            raise InvalidInput("request_id must be a string or an integer", field="request_id")
        if isinstance(request_id, str) and len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidInput(f"request_id must have at most {MAX_REQUEST_ID_CHARS} characters", field="request_id")
        return request_id

    def _handler(self, content: dict):
        # A table, not Channels' type-to-method dispatch: a client must not reach the
        # handlers of channel-layer events (``flush.completed``) by naming their type.
        handlers = {"messages.add": self.messages_add_frame, "memory.query": self.memory_query_frame}
        frame_type = content.get("type")
        if frame_type is None:
            raise InvalidInput("type is required", field="type")
        if not isinstance(frame_type, str) or frame_type not in handlers:
            raise InvalidInput(f"Unknown frame type {frame_type!r}; expected one of {', '.join(handlers)}", field="type")
        return handlers[frame_type]

    async def messages_add_frame(self, content: dict, request_id: str | int | None) -> None:
        rows = await in_thread(self._messages_add)(_fields(content, "messages"))
        await self.send_json(
            {
                "type": "messages.added",
                "request_id": request_id,
                "message_ids": [str(row.pk) for row in rows],
                "pending_messages": rows.pending,
                "oldest_pending_age_s": rows.oldest_pending_age_s,
            }
        )

    def _messages_add(self, data: dict) -> AddedMessages:
        """Validate the whole batch, then store it (worker thread)."""
        principal = self._principal()
        messages = validated(s.MessagesAdd, data)["messages"]
        # Fresh: it may have been deleted.
        session = selectors.session_get(principal=principal, session_id=self.session_id)
        return messages_add(session=session, messages=messages)

    async def memory_query_frame(self, content: dict, request_id: str | int | None) -> None:
        data = _fields(content, "query", "top_k", "session_id", "agent_id", "retrieval", "since", "until", "layers")
        stages = await in_thread(self._memory_query_stages)(data)
        # One step of the generator per thread hop, so the partial frame leaves before the
        # query is embedded for the final stage.
        while (step := await in_thread(next)(stages, None)) is not None:
            stage, results = step
            await self.send_json(
                {
                    "type": "memory.results",
                    "request_id": request_id,
                    "stage": stage,
                    "final": stage == "final",
                    "results": results,
                    "total": len(results),
                }
            )

    def _memory_query_stages(self, data: dict) -> Iterator[tuple[str, list[dict]]]:
        """Validate the query and start it (worker thread); the stages run as they are pulled."""
        principal = self._principal()
        data = validated(s.QueryIn, data)
        # The user is read per query: its memory_version keys the BM25 cache, and a copy
        # kept since connect would miss the messages added since.
        session = selectors.session_get(principal=principal, session_id=self.session_id)
        return selectors.memory_query_stages(s.memory_query_of(data, user=session.user, session_id=self.session_id))

    # --- server frames --------------------------------------------------------------------

    async def flush_completed(self, event: dict) -> None:
        """Group event from ``events.flush_completed``: forward it to the client."""
        await self.send_json(
            {"type": "flush.completed", "session_id": event["session_id"], "message_ids": event["message_ids"]}
        )

    async def send_error(
        self, request_id: str | int | None, code: int, message: str, errors: list[dict] | None = None
    ) -> None:
        """Send an error frame; ``errors`` default to one entry with no field."""
        errors = errors if errors is not None else [{"field": None, "message": message}]
        await self.send_json(
            {"type": "error", "request_id": request_id, "error": {"code": code, "message": message, "errors": errors}}
        )


def _fields(content: dict, *names: str) -> dict:
    """The named fields the frame has: an absent one stays absent, so it is "required", not null."""
    return {name: content[name] for name in names if name in content}
