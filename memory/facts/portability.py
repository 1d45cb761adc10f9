"""Facts in export files (``memory.portability``): a ``fact`` record per fact of the user,
versions and deleted ones included, with the ids of the messages it was extracted from.

An import writes a fact only where at least one of its source messages is the target user's
(the file's messages are written first), with the sources bound to those messages as
stored; its embedding is computed again by the active model (never the LLM). Idempotent by
id, like the other records.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import date

from django.db import connection, transaction
from pgvector import Vector

from memory import embedding_guard, embedding_model
from memory.inference import BACKGROUND, registry
from memory.pgvector_binary import use_binary_vectors

KINDS = ("preference", "plan", "relation", "event", "attribute", "other")


def fact_records(*, user_id: uuid.UUID) -> Iterator[dict]:
    """The user's facts as export records, oldest first: ``{"type": "fact", "id", "text",
    "kind", "entities", "valid_from", "time_expression", "confidence", "model", "version",
    "superseded_by", "deleted_at", "metadata": {}, "created_at", "sources": [message ids]}``;
    only the sources that still hold (a fact with none is left out)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT f.id, f.text, f.kind, f.entities, f.valid_from, f.time_expression, f.confidence, f.model,
                   f.version, f.superseded_by_id, f.deleted_at, f.created_at,
                   array(SELECT s.message_id FROM memory_factsource s JOIN memory_message m
                         ON m.id = s.message_id AND m.seq = s.message_seq WHERE s.fact_id = f.id ORDER BY s.id)
            FROM memory_fact f WHERE f.user_id = %s ORDER BY f.created_at, f.version, f.id
            """,
            [user_id],
        )
        rows = cursor.fetchall()
    for (
        fid,
        text,
        kind,
        entities,
        valid_from,
        expression,
        confidence,
        model,
        version,
        successor,
        deleted,
        created,
        sources,
    ) in rows:
        if not sources:
            continue
        yield {
            "type": "fact",
            "id": str(fid),
            "text": text,
            "kind": kind,
            "entities": list(entities),
            "valid_from": valid_from.isoformat() if valid_from else None,
            "time_expression": expression,
            "confidence": confidence,
            "model": model,
            "version": version,
            "superseded_by": str(successor) if successor else None,
            "deleted_at": deleted.isoformat() if deleted else None,
            "metadata": {},
            "created_at": created.isoformat(),
            "sources": [str(source) for source in sources],
        }


def check_fact(check, values: dict) -> None:
    """Check a ``fact`` record's own fields into ``values`` (``check``: the line's
    ``memory.portability.records.Checker``); raises ``InvalidInput`` naming the field."""
    record = check.record
    values["content"] = check.text("text", max_length=1000, blank=False)
    values["embedding"] = None
    kind = check.text("kind")
    if kind not in KINDS:
        raise check.fail("kind", f"Must be one of {', '.join(KINDS)}.")
    values["kind"] = kind
    entities = record.get("entities", [])
    if not isinstance(entities, list) or not all(isinstance(e, str) and len(e) <= 255 for e in entities):
        raise check.fail("entities", "Must be a list of strings of at most 255 characters.")
    values["entities"] = entities
    valid_from = record.get("valid_from")
    try:
        values["valid_from"] = date.fromisoformat(valid_from) if valid_from is not None else None
    except (TypeError, ValueError):
        raise check.fail("valid_from", "Must be a date (YYYY-MM-DD) or null.") from None
    values["time_expression"] = check.text("time_expression", max_length=255, default="")
    confidence = record.get("confidence", 1.0)
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        raise check.fail("confidence", "Must be a number from 0 to 1.")
    values["confidence"] = float(confidence)
    values["model"] = check.text("model", max_length=255, default="")
    values["version"] = check.integer("version", minimum=1) if "version" in record else 1
    values["superseded_by"] = check.uuid("superseded_by") if record.get("superseded_by") is not None else None
    values["deleted_at"] = check.moment("deleted_at") if record.get("deleted_at") is not None else None
    sources = record.get("sources")
    if not isinstance(sources, list) or not sources or len(sources) > 1000:
        raise check.fail("sources", "Must be a list of 1 to 1000 message ids.")
    try:
        values["sources"] = [uuid.UUID(source) for source in sources]
    except (TypeError, ValueError, AttributeError):
        raise check.fail("sources", "Must hold message ids (UUIDs).") from None


def facts_import(*, records: Iterable[dict], user_id: uuid.UUID, batch_size: int = 256) -> int:
    """Write the checked ``fact`` records (``check_fact``'s values) for user ``user_id``;
    returns how many were new. Per batch: embedded by the active model outside the
    transaction, then written in one transaction holding the user row ``FOR KEY SHARE``
    (the lock order of the user's writers). A fact whose id exists (any user's) is left as
    it is; one none of whose sources is the user's message is skipped. Version links
    (``superseded_by``) are restored once every fact of the file is in."""
    written, links, batch = 0, [], []
    for values in records:
        batch.append(values)
        if len(batch) == batch_size:
            written += _import_batch(batch, user_id=user_id, links=links)
            batch = []
    if batch:
        written += _import_batch(batch, user_id=user_id, links=links)
    if links:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE memory_fact f SET superseded_by_id = l.successor FROM unnest(%s::uuid[], %s::uuid[]) AS l(id, successor) "
                "WHERE f.id = l.id AND f.user_id = %s AND EXISTS (SELECT 1 FROM memory_fact s WHERE s.id = l.successor AND s.user_id = %s)",
                [[str(i) for i, _ in links], [str(s) for _, s in links], user_id, user_id],
            )
    return written


def _import_batch(batch: list[dict], *, user_id: uuid.UUID, links: list) -> int:
    generation = embedding_model.follow_active_model()
    vectors = registry.embed([values["content"] for values in batch], priority=BACKGROUND)
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        embedding_guard.guard_write(cursor, generation=generation)
        cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [user_id])
        if cursor.rowcount != 1:
            return 0
        message_ids = list({str(source) for values in batch for source in values["sources"]})
        cursor.execute(
            "SELECT id, seq FROM memory_message WHERE user_id = %s AND id = ANY(%s::uuid[])", [user_id, message_ids]
        )
        seqs = dict(cursor.fetchall())
        use_binary_vectors(cursor)
        for values, vector in zip(batch, vectors, strict=True):
            sources = [(source, seqs[source]) for source in values["sources"] if source in seqs]
            if not sources:
                continue
            cursor.execute(
                """
                INSERT INTO memory_fact (id, user_id, text, kind, entities, valid_from, time_expression, confidence,
                                         model, embedding, embedding_generation, version, deleted_at, created_at)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (id) DO NOTHING
                """,
                [
                    values["id"], user_id, values["content"], values["kind"], values["entities"], values["valid_from"],
                    values["time_expression"], values["confidence"], values["model"], Vector(vector), generation,
                    values["version"], values["deleted_at"], values["created_at"],
                ],
            )  # fmt: skip
            if cursor.rowcount != 1:
                continue
            cursor.execute(
                "INSERT INTO memory_factsource (fact_id, message_id, message_seq) "
                "SELECT %s, s.id, s.seq FROM unnest(%s::uuid[], %s::bigint[]) AS s(id, seq) ON CONFLICT DO NOTHING",
                [values["id"], [str(s) for s, _ in sources], [seq for _, seq in sources]],
            )
            if values["superseded_by"] is not None:
                links.append((values["id"], values["superseded_by"]))
            written += 1
    return written
