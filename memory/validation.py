"""Checks of what a client sends, shared by every way in: the REST API and the WebSocket
(``memory.api``), MCP (``memory.mcp``) and the import's records (``memory.portability``).

- JSON nesting within ``MAX_JSON_DEPTH`` (objects and arrays, the document itself being
  level 1): ``check_depth`` raises ``JSONTooDeep`` naming where;
- text PostgreSQL can store (``storable``), at every depth of a jsonb value
  (``jsonb_storable``); ``UNSTORABLE`` is the message of a refusal.

No database access, no import of the rest of ``memory``.
"""

from __future__ import annotations

from django.conf import settings


class JSONTooDeep(ValueError):
    """JSON nested deeper than ``MAX_JSON_DEPTH``; ``path`` names where (``messages[0].metadata.a``), if known."""

    def __init__(self, path: str | None = None):
        self.path = path
        super().__init__(too_deep_message())


def too_deep_message() -> str:
    return f"JSON nested deeper than {settings.MEMFUSE['MAX_JSON_DEPTH']} levels (MAX_JSON_DEPTH)"


def check_depth(value, limit: int | None = None) -> None:
    """Raise ``JSONTooDeep`` (with the path of the first too-deep value) if ``value`` nests past ``limit``.

    Iterative (a decoded document may be nested up to the interpreter's recursion limit):
    one pass over the containers; the path is worked out only for a refusal.
    """
    limit = settings.MEMFUSE["MAX_JSON_DEPTH"] if limit is None else limit
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise JSONTooDeep(_path_to_depth(value, limit + 1))
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _path_to_depth(value, depth: int) -> str | None:
    """The field name (``messages[0].metadata.a``) of the first container at ``depth`` in ``value``."""
    stack = [(value, 1, "")]
    while stack:
        item, level, path = stack.pop()
        if level == depth:
            return path or None
        if isinstance(item, dict):
            stack.extend((child, level + 1, f"{path}.{key}" if path else str(key)) for key, child in item.items() if isinstance(child, dict | list))
        elif isinstance(item, list):
            stack.extend((child, level + 1, f"{path}[{index}]") for index, child in enumerate(item) if isinstance(child, dict | list))
    return None


def storable(value: str) -> bool:
    """Whether PostgreSQL can store ``value`` as text: UTF-8 encodable (no unpaired surrogate,
    which JSON's ``\\ud800`` escapes can produce) and without NUL (refused in text and jsonb)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


UNSTORABLE = "Must be valid Unicode text without NUL characters or unpaired surrogates."


def jsonb_storable(value) -> bool:
    """Whether jsonb can hold ``value``'s keys and strings (``storable``, at every depth);
    the depth is bounded by ``MAX_JSON_DEPTH`` beforehand."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return all(storable(key) and jsonb_storable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(jsonb_storable(item) for item in value)
    return True
