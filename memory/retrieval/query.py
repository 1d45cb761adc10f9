"""What one memory query asks (``MemoryQuery``): built once by the REST view, the MCP tool, the
WebSocket consumer and the LoCoMo evaluation, read by ``memory.selectors`` and the search."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from memory.retrieval.config import RetrievalConfig

if TYPE_CHECKING:
    from memory.models import User


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryQuery:
    """One query of one user's memory.

    ``user``: the ``User`` whose rows are searched, with ``pk``, ``memory_version`` (as just
    read: the BM25 index catches up to it) and ``ann_bucket`` loaded. ``query``: the text.
    ``top_k``: the most results (the API allows 1 to 100). ``session_id``: the caller's
    session, for each result's ``scope`` tag (``None``: no tag). ``agent_id``: only messages of
    that agent's sessions, and facts with a source there (knowledge is user-level).
    ``config``: the retrieval knobs (``None``: ``RetrievalConfig.from_settings()``).
    ``since`` / ``until``: aware datetimes, both inclusive: only what was created in that
    window (a fact: a source said in it). ``layers``: ``("m0",)`` (messages and
    knowledge), ``("m1",)`` (facts), or both; ``None``: ``memory.facts.selectors.default_layers()``
    (read only while the facts layer is on).
    """

    user: User
    query: str
    top_k: int = 5
    session_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    config: RetrievalConfig | None = None
    since: datetime | None = None
    until: datetime | None = None
    layers: tuple[str, ...] | None = None
