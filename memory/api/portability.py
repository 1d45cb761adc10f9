"""``GET /api/v1/users/{id}/export`` and ``POST /api/v1/users/{id}/import``: a user's memory as a file.

The format and the import's guarantees are ``memory.portability``'s. Thin views: the export
streams ``portability.export.user_export``; the import reads the body from the file it was
received into (``_body_file``: the import reads it more than once) and calls
``importer.memory_import``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import connections
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers

from memory import selectors
from memory.api.base import ConcurrentAPIView as APIView
from memory.api.errors import envelope
from memory.api.schema import ERROR_DESCRIPTIONS, ERRORS, WITH_CONFLICT, ErrorEnvelope, api_doc
from memory.api.serializers import validated
from memory.api.views import parse_id
from memory.errors import NotFound
from memory.portability import export, importer

CONTENT_TYPE = "application/x-ndjson"


class ExportQuery(serializers.Serializer):
    embeddings = serializers.BooleanField(required=False, default=False)


async def _chunks_in_threads(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` for the ASGI server, one chunk at a time in a worker thread (Django would
    otherwise read a sync iterator to the end before sending anything). Each chunk's
    connection goes back to the pool at once: the next may be read on another thread."""

    def step() -> bytes | None:
        try:
            return next(chunks)
        except StopIteration:
            return None
        finally:
            connections.close_all()

    while (chunk := await sync_to_async(step, thread_sensitive=False)()) is not None:
        yield chunk


class UserExportView(APIView):
    """A user's memory as JSON Lines; a user key may export its own user."""

    @extend_schema(
        parameters=[ExportQuery],
        responses={
            (200, CONTENT_TYPE): OpenApiResponse(OpenApiTypes.STR, description="JSON Lines (memory.portability's format)"),
            **{status: OpenApiResponse(ErrorEnvelope, description=ERROR_DESCRIPTIONS[status]) for status in ERRORS},
        },
        summary="Export a user's memory (JSON Lines, streamed)",
    )
    def get(self, request, user_id):
        user = selectors.user_get(principal=request.auth, user_id=parse_id(user_id, field="user_id", what="User"))
        embeddings = validated(ExportQuery, request.query_params)["embeddings"]
        chunks = export.user_export(user=user, embeddings=embeddings)
        content = _chunks_in_threads(chunks) if isinstance(request._request, ASGIRequest) else chunks
        response = StreamingHttpResponse(content, content_type=CONTENT_TYPE)
        response["Content-Disposition"] = f'attachment; filename="memfuse-user-{user.pk}.jsonl"'
        return response


@contextmanager
def _body_file(request) -> Iterator[BinaryIO]:
    """The body of Django request ``request`` as a seekable binary file, read from the client once.

    Under ASGI, Django's handler has received the body into a ``SpooledTemporaryFile``
    (``ASGIHandler.read_body``) before the view runs: that file is the request's stream,
    read here as it is. A stream that cannot seek (WSGI's input, the test client's) is
    spooled once into a temporary file.
    """
    # Django keeps the body's file as the request's private stream; no public accessor gives
    # it. A seekable one holds the whole body (the import seeks to its start).
    stream = getattr(request, "_stream", None)
    if stream is not None and stream.seekable():
        yield stream
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(request, spool, 1 << 20)
        yield spool


class UserImportView(APIView):
    """Import a file of the export format into this user (created when the id is unknown)."""

    parser_classes = []  # the body is read as a stream, never parsed by DRF

    @api_doc(
        "ImportReport",
        {
            "user_id": serializers.UUIDField(),
            "created": serializers.DictField(child=serializers.IntegerField()),
            "existing": serializers.DictField(child=serializers.IntegerField()),
            "embeddings_used": serializers.BooleanField(),
            "pending_messages": serializers.IntegerField(),
        },
        request={CONTENT_TYPE: OpenApiTypes.STR},
        errors=WITH_CONFLICT,
        summary="Import a user's memory (JSON Lines, the export's format); idempotent by record id",
    )
    def post(self, request, user_id):
        principal = request.auth
        wanted = parse_id(user_id, field="user_id", what="User")
        user = selectors.users_visible(principal=principal).filter(pk=wanted).first()
        if user is None and principal.is_user_key:
            raise NotFound(f"User '{user_id}' not found", field="user_id")
        with _body_file(request._request) as body:
            report = importer.memory_import(
                tenant_id=principal.tenant_id,
                source=importer.jsonl_source(body),
                user=user,
                user_id=None if user is not None else wanted,
                scope=principal.scope,
            )
        return envelope(report.as_dict(), message="Import done")
