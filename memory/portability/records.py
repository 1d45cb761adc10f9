"""Validation of the records of an export file (``memory.portability``), one line at a time.

``check_record`` turns a decoded line into the values the importer writes, or raises
``InvalidInput`` naming the line and the field (``lines[7].content``); ``checked_records``
reads a ``Source`` again for the records of some types, checked. No database access.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

import numpy as np
from django.conf import settings

from memory.errors import InvalidInput
from memory.facts.portability import check_fact
from memory.models import Role
from memory.portability import FORMAT, VERSION
from memory.validation import UNSTORABLE, JSONTooDeep, check_depth, jsonb_storable, storable, too_deep_message

RECORD_TYPES = ("header", "user", "agent", "session", "message", "knowledge", "fact")
ROLES = frozenset(Role.values)  # once: Role.values builds its list on every read


def invalid(line: int, field: str | None, message: str) -> InvalidInput:
    """``InvalidInput`` for ``field`` of line ``line`` (1-based): field ``lines[<line>].<field>``."""
    name = f"lines[{line}]" + (f".{field}" if field else "")
    return InvalidInput(f"Invalid import file: line {line}: {field or 'line'}: {message}", field=name)


class Checker:
    """The checks of one line: ``checker.uuid("id")`` returns the value or raises ``invalid``."""

    def __init__(self, line: int, record: dict) -> None:
        self.line, self.record = line, record

    def fail(self, field: str | None, message: str) -> InvalidInput:
        return invalid(self.line, field, message)

    def present(self, field: str):
        if field not in self.record:
            raise self.fail(field, "This field is required.")
        return self.record[field]

    def uuid(self, field: str) -> uuid.UUID:
        value = self.present(field)
        try:
            return uuid.UUID(value) if isinstance(value, str) else _raise()
        except ValueError:
            raise self.fail(field, f"Must be a UUID, not {value!r:.60}.") from None

    def text(self, field: str, *, max_length: int | None = None, blank: bool = True, default: str | None = None) -> str:
        if default is not None and field not in self.record:
            return default
        value = self.present(field)
        if not isinstance(value, str):
            raise self.fail(field, "Must be a string.")
        if not blank and not value.strip():
            raise self.fail(field, "May not be blank.")
        if max_length is not None and len(value) > max_length:
            raise self.fail(field, f"Longer than {max_length} characters.")
        if not storable(value):
            raise self.fail(field, UNSTORABLE)
        return value

    def mapping(self, field: str) -> dict:
        """A JSON object within the API's limits (``MAX_JSON_DEPTH`` below the line, finite numbers)."""
        value = self.record.get(field, {})
        if not isinstance(value, dict):
            raise self.fail(field, "Must be a JSON object.")
        if value:
            try:
                check_depth(value, settings.MEMFUSE["MAX_JSON_DEPTH"] - 1)
                json.dumps(value, allow_nan=False)  # 1e400 decodes as infinity: jsonb cannot hold it
            except JSONTooDeep:
                raise self.fail(field, too_deep_message()) from None
            except ValueError:
                raise self.fail(field, "Numbers must be finite.") from None
            if not jsonb_storable(value):
                raise self.fail(field, UNSTORABLE)
        return value

    def moment(self, field: str) -> datetime:
        value = self.present(field)
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else _raise()
        except ValueError:
            raise self.fail(field, f"Must be an ISO 8601 time, not {value!r:.60}.") from None
        if moment.tzinfo is None:
            raise self.fail(field, "Must carry a time zone.")
        return moment

    def integer(self, field: str, *, minimum: int = 0) -> int:
        value = self.present(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value > 2**31 - 1:
            raise self.fail(field, f"Must be an integer from {minimum}.")
        return value

    def vector(self, field: str, dimension: int | None) -> np.ndarray | None:
        """The embedding of the line (``(dimension,)`` float32), or ``None``; ``dimension``: the
        header's (``None``: the file declares no embeddings, so a line may not carry one)."""
        value = self.record.get(field)
        if value is None:
            return None
        if dimension is None:
            raise self.fail(field, "The header declares no embedding model.")
        if not isinstance(value, list) or len(value) != dimension:
            raise self.fail(field, f"Must be a list of {dimension} numbers (the header's dimension).")
        # One C pass instead of a Python test per number: a string, null or list among them
        # gives a non-numeric array.
        array = np.array(value)
        if array.dtype.kind not in "fiu" or array.ndim != 1:
            raise self.fail(field, "Must hold numbers only.")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():  # also what overflows float32
            raise self.fail(field, "Must hold finite numbers only.")
        return array


def _raise():
    raise ValueError


def check_header(line: int, record: dict) -> dict | None:
    """The header's ``embedding`` (``{"model", "dimension"}`` or ``None``), checked."""
    check = Checker(line, record)
    if record.get("type") != "header":
        raise check.fail("type", 'The first line must be the header ({"type": "header", ...}).')
    if record.get("format") != FORMAT:
        raise check.fail("format", f"Must be {FORMAT!r}.")
    if record.get("version") != VERSION:
        raise check.fail(
            "version", f"Unsupported version {record.get('version')!r}: this server reads version {VERSION}."
        )
    embedding = record.get("embedding")
    if embedding is None:
        return None
    if not isinstance(embedding, dict) or not isinstance(embedding.get("model"), str):
        raise check.fail("embedding", 'Must be null or {"model": name, "dimension": n}.')
    dimension = embedding.get("dimension")
    if not isinstance(dimension, int) or isinstance(dimension, bool) or not 0 < dimension <= 16_000:
        raise check.fail("embedding.dimension", "Must be a positive integer.")
    return {"model": embedding["model"], "dimension": dimension}


def check_record(line: int, record, *, dimension: int | None) -> tuple[str, dict]:
    """``(type, values)`` of one record after the header; ``dimension``: the header's.

    Raises ``InvalidInput`` naming ``lines[<line>].<field>`` for a wrong or missing field.
    """
    if not isinstance(record, dict):
        raise invalid(line, None, "Must be a JSON object.")
    check = Checker(line, record)
    kind = record.get("type")
    if kind not in RECORD_TYPES[1:]:
        raise check.fail("type", f"Must be one of {', '.join(RECORD_TYPES[1:])}.")
    values: dict = {
        "id": check.uuid("id"),
        "metadata": check.mapping("metadata"),
        "created_at": check.moment("created_at"),
    }
    if kind in ("user", "agent"):
        values["name"] = check.text("name", max_length=255, blank=False)
        values["description"] = check.text("description", default="")
    elif kind == "session":
        values["name"] = check.text("name", max_length=255, blank=False)
        values["agent_id"] = check.uuid("agent_id")
    elif kind == "message":
        values["session_id"] = check.uuid("session_id")
        values["position"] = check.integer("position")
        role = check.text("role")
        if role not in ROLES:
            raise check.fail("role", f"Must be one of {', '.join(Role.values)}.")
        values["role"] = role
        values["content"] = check.text("content", max_length=settings.MEMFUSE["MAX_MESSAGE_CHARS"])
        values["embedding"] = check.vector("embedding", dimension)
    elif kind == "fact":  # the facts layer's (memory.facts.portability)
        check_fact(check, values)
    else:
        values["content"] = check.text("content", max_length=settings.MEMFUSE["MAX_MESSAGE_CHARS"], blank=False)
        values["embedding"] = check.vector("embedding", dimension)
    return kind, values


Source = Callable[[], Iterator[tuple[int, object]]]
"""A re-readable source of records: each call iterates ``(line number, decoded JSON)`` from the start."""


def checked_records(source: Source, kinds: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """The messages or knowledge items (``kinds``), checked again (they were in pass 1: the
    same file); each with ``_line`` (its line number), ``metadata_json`` and ``_size`` (about
    the bytes it holds: content, metadata, embedding)."""
    dimension = None
    first = True
    for line, record in source():
        if first:
            embedding = check_header(line, record)
            dimension = embedding and embedding["dimension"]
            first = False
            continue
        if not isinstance(record, dict) or record.get("type") not in kinds:
            continue
        kind, values = check_record(line, record, dimension=dimension)
        values["_line"] = line
        values["metadata_json"] = json.dumps(values["metadata"])
        embedded = values["embedding"] is not None
        values["_size"] = len(values["content"]) + len(values["metadata_json"]) + (4 * dimension if embedded else 0)
        yield kind, values
