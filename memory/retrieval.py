"""Hybrid retrieval over one user's messages and knowledge: BM25 + vector, fused by weighted RRF.

Two retrievers rank the user's documents (messages and knowledge items):

- **BM25** (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond",
  2009) with Lucene's idf, ``log(1 + (N - n + 0.5) / (n + 0.5))`` (the ``bm25s`` library,
  ``method="lucene"``, k1 = 1.5, b = 0.75). Okapi's original idf is zero or negative for a term
  in half the documents or more, which on a user's small corpus silences common but
  relevant words. Each message is indexed with its neighbouring turns
  (``context_documents``: ``BM25_CONTEXT_TURNS`` either side, its own words counted
  ``BM25_OWN_WEIGHT`` times) and returned alone. It runs over PostgreSQL's English analysis of each
  document: the lexemes of its generated ``search_vector`` column (Snowball stemming,
  stop words removed) and of ``to_tsvector('english', query)``. PostgreSQL's own ``ts_rank``
  is not BM25: it has no inverse document frequency, which is what makes rare words (names,
  places) count. A user's corpus is small (hundreds to thousands of documents), so the BM25
  index is built in Python per user and cached in the user's ``UserMemory`` until the user's
  ``memory_version`` changes.
- **Vector**: cosine distance between the query's embedding and each document's embedding,
  by an exact scan of the user's rows (see ``vector_candidates`` for why not HNSW here).

**Fusion**: weighted reciprocal rank fusion (Cormack, Clarke & Büttcher, "Reciprocal Rank
Fusion outperforms Condorcet and individual Rank Learning Methods", SIGIR 2009):
``score(d) = sum_r w_r / (k + rank_r(d))``, ranks from 1, ``k = 60`` (the paper's value).
The weights are configuration (``BM25_WEIGHT``, ``VECTOR_WEIGHT``); the defaults and the
measurements behind them are in the README's retrieval section.

**Neighbouring turns on the vector side** (``context_scores``, on by default): each turn's
cosine similarity is averaged with its neighbours' in the session, the counterpart of BM25's
context documents.

**The named speaker's turns** (``speaker_candidates``, on by default): when the query names
one of the conversation's speakers, that speaker's turns, in the fused order, are a third
list of the fusion.

**Pseudo-relevance feedback** (in ``vector_candidates``, on by default): the vector
retriever's query embedding moves toward the embeddings of BM25's top documents (Rocchio).
**Convex fusion** (``convex_fuse``, off by default) is the alternative to RRF.

**Reranking** (optional, ``rerank``): a cross-encoder (``RERANKER_MODEL_PATH``, the registry's
tier-1 reranker) rescores the fused top ``RERANK_TOP_N`` (query, document) pairs and reorders
them; off when no model is configured.

Every knob is a field of ``RetrievalConfig`` (defaults from ``settings.MEMFUSE``); the safe
ones can be overridden per query (``memory.api.serializers.RetrievalOverrides``).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import bm25s
import numpy as np
from cachetools import LRUCache
from django.conf import settings
from django.db import connection
from pgvector import Vector

from memory import registry
from memory.vectors import vector_literal

# A lexeme of a tsvector's text form: 'word':1,5 ('' escapes a quote inside a lexeme).
_TSVECTOR_ENTRY = re.compile(r"'((?:[^']|'')*)'(?::([0-9A-D,]+))?")


def tsvector_tokens(text: str) -> list[str]:
    """Tokens of a tsvector's text form, each lexeme repeated once per position.

    ``"'group':6,9 'support':5"`` -> ``["group", "group", "support"]``. A lexeme without
    positions counts once.
    """
    tokens: list[str] = []
    for lexeme, positions in _TSVECTOR_ENTRY.findall(text or ""):
        lexeme = lexeme.replace("''", "'")
        tokens.extend([lexeme] * (positions.count(",") + 1 if positions else 1))
    return tokens


@dataclass(frozen=True)
class RetrievalConfig:
    """Knobs of one query; defaults from ``settings.MEMFUSE``.

    ``bm25_candidates`` / ``vector_candidates``: the most documents each retriever
    contributes to the fusion (a query asking for more than their sum gets fewer).
    ``rerank``: whether the fused top ``rerank_top_n`` go through the cross-encoder (only
    possible with ``RERANKER_MODEL_PATH``). A weight of 0 switches its retriever off. ``prf_docs`` / ``prf_weight``: the vector retriever's query moves
    toward BM25's top ``prf_docs`` documents (``vector_candidates``; 0 docs: off).
    ``fusion``: ``"rrf"`` (``rrf_fuse``) or ``"convex"`` (``convex_fuse``).
    ``vector_context_turns`` / ``vector_own_weight``: the vector retriever's similarities are
    averaged over that many neighbouring turns either side, the turn's own counted
    ``vector_own_weight`` times (``context_scores``; 0 turns: off). ``speaker_weight``: the
    RRF weight of the named speaker's turns (``speaker_candidates``; 0: off).
    """

    rrf_k: int
    bm25_weight: float
    vector_weight: float
    bm25_candidates: int
    vector_candidates: int
    rerank: bool
    rerank_top_n: int
    prf_docs: int = 0
    prf_weight: float = 0.0
    fusion: str = "rrf"
    vector_context_turns: int = 0
    vector_own_weight: int = 1
    speaker_weight: float = 0.0

    @classmethod
    def from_settings(cls, **overrides) -> RetrievalConfig:
        """The configured defaults with ``overrides`` (``None`` values ignored) applied."""
        config = settings.MEMFUSE
        values = {
            "rrf_k": config["RRF_K"],
            "bm25_weight": config["BM25_WEIGHT"],
            "vector_weight": config["VECTOR_WEIGHT"],
            "bm25_candidates": config["BM25_CANDIDATES"],
            "vector_candidates": config["VECTOR_CANDIDATES"],
            "rerank": bool(config["RERANK"] and config["RERANKER_MODEL_PATH"]),
            "rerank_top_n": config["RERANK_TOP_N"],
            "prf_docs": config["VECTOR_PRF_DOCS"],
            "prf_weight": config["VECTOR_PRF_WEIGHT"],
            "fusion": config["FUSION"],
            "vector_context_turns": config["VECTOR_CONTEXT_TURNS"],
            "vector_own_weight": config["VECTOR_OWN_WEIGHT"],
            "speaker_weight": config["SPEAKER_WEIGHT"],
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


class DocKey(tuple):
    """A retrievable document: ``kind`` (``"message"`` or ``"knowledge"``) and ``id`` (its UUID).

    ``DocKey(kind, id)``. A tuple ``(kind, id.int)`` underneath, so that it is hashed and
    compared in C: the fusion hashes every candidate key several times per query, and a
    dataclass's generated hash (a tuple's, then ``UUID.__hash__`` in Python) was most of its
    time (cProfile). ``BM25Index.key`` makes keys from the index's integers (``from_int``)
    without a ``UUID``: making a hundred ``UUID`` objects and dataclass keys per retriever was
    the web process's largest single cost per query (py-spy, ``--gil``); ``id`` builds the
    ``UUID`` when it is asked for.
    """

    __slots__ = ()

    def __new__(cls, kind: str, id: uuid.UUID) -> DocKey:  # noqa: A002 (the field's name)
        return tuple.__new__(cls, (kind, id.int))

    @classmethod
    def from_int(cls, kind: str, value: int) -> DocKey:
        """The key of the document whose UUID's integer (``UUID.int``) is ``value``."""
        return tuple.__new__(cls, (kind, value))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def int(self) -> int:
        """The id as ``UUID.int``."""
        return self[1]

    @property
    def id(self) -> uuid.UUID:
        return uuid.UUID(int=self[1])

    def __repr__(self) -> str:
        return f"DocKey(kind={self[0]!r}, id={self.id!r})"

    def __reduce__(self):
        return DocKey, (self[0], self.id)


@dataclass
class BM25Index:
    """The BM25 index of one user's corpus at one ``memory_version``.

    Documents are the user's messages in (session, position) order, then their knowledge
    items; row ``i`` of each array is document ``i``. ``ids`` holds their UUIDs' bytes
    (``(n, 16)`` uint8), the first ``messages`` of them messages; ``session_codes`` is
    each document's session as a row of ``session_ids`` (the sessions' UUIDs' bytes,
    ``(sessions, 16)`` uint8), ``-1`` for knowledge. ``speaker_codes`` is each document's
    speaker (its ``metadata["speaker"]``) as an index into ``speaker_lexemes``, the lexemes
    of each distinct speaker's name under the English analysis; ``-1`` for none.

    Compact on purpose: a few arrays per user, not a Python object per document. With a
    thousand users cached, one object per document (a key, its UUID, its session's UUID)
    made a million objects that every full pass of Python's cyclic garbage collector walks
    while it holds the GIL: pauses of up to 0.75 s stalled every request (measured).
    """

    version: int
    ids: np.ndarray
    messages: int
    session_codes: np.ndarray
    session_ids: np.ndarray
    bm25: bm25s.BM25 | None
    speaker_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    speaker_lexemes: tuple[frozenset[str], ...] = ()
    _message_rows: dict[int, int] = field(init=False, repr=False)
    _knowledge_rows: dict[int, int] = field(init=False, repr=False)
    _id_order: np.ndarray = field(init=False, repr=False)
    _ints: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Rows by the id's integer (UUID.int), one dict per kind: ints, which the collector
        # ignores, and a key's lookup costs no bytes conversion.
        ints = [int.from_bytes(doc_id.tobytes(), "big") for doc_id in self.ids]
        self._ints = ints  # each row's, for ``key`` (the dicts' own int objects: 8 bytes a row)
        self._message_rows = {value: i for i, value in enumerate(ints[: self.messages])}
        self._knowledge_rows = {value: i for i, value in enumerate(ints[self.messages :], start=self.messages)}
        # The rows in the ids' byte order, for ``rows`` (4 bytes per document).
        self._id_order = np.argsort(self.ids.reshape(-1).view("V16"), kind="stable").astype(np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, row: int) -> DocKey:
        """The document at ``row``."""
        return DocKey.from_int("message" if row < self.messages else "knowledge", self._ints[row])

    def row(self, key: DocKey) -> int | None:
        """The row of ``key``, ``None`` if the index does not hold it (added after the build)."""
        return (self._message_rows if key[0] == "message" else self._knowledge_rows).get(key[1])

    def rows(self, ids: np.ndarray, *, kind: str) -> np.ndarray:
        """The rows of ``ids`` (``(m,)`` ``V16``: UUIDs' bytes) of documents of ``kind``, all at
        once: ``(m,)`` int, ``-1`` where the index holds no such document."""
        if not len(self.ids) or not len(ids):
            return np.full(len(ids), -1)
        held = self.ids.reshape(-1).view("V16")
        at = np.minimum(np.searchsorted(held, ids, sorter=self._id_order), len(held) - 1)
        rows = self._id_order[at].astype(np.int64)
        messages = rows < self.messages
        found = (held[rows] == ids) & (messages if kind == "message" else ~messages)
        return np.where(found, rows, -1)

    def named_speaker(self, query_tokens: list[str]) -> int | None:
        """The speaker code of the only speaker the query names, else ``None``.

        A speaker is named when a lexeme of their name is among ``query_tokens``, the query's
        lexemes (so "Caroline's" names Caroline; a name of stop words only, such as "Will",
        is never named). None named, or several ("What did Anna tell Ben?", two Smiths):
        ``None``.
        """
        words = set(query_tokens)
        named = [code for code, lexemes in enumerate(self.speaker_lexemes) if lexemes & words]
        return named[0] if len(named) == 1 else None

    def search(self, query_tokens: list[str], *, limit: int, allowed_sessions: set | None = None) -> list[tuple[DocKey, float]]:
        """Top ``limit`` documents by BM25 score (> 0) as ``(key, score)``, best first.

        ``allowed_sessions``: when given, only messages of these sessions (and knowledge)."""
        if self.bm25 is None or not query_tokens:
            return []
        scores = self.bm25.get_scores(query_tokens)
        allowed = None
        if allowed_sessions is not None:
            allowed_bytes = {session.bytes for session in allowed_sessions}
            allowed = {code for code, session in enumerate(self.session_ids) if session.tobytes() in allowed_bytes}
        order = np.argsort(-scores, kind="stable")
        results = []
        for i in order:
            if scores[i] <= 0 or len(results) >= limit:
                break
            if allowed is not None and i < self.messages and self.session_codes[i] not in allowed:
                continue
            results.append((self.key(i), float(scores[i])))
        return results


def context_documents(tokens: list[list[str]], sessions: list, *, window: int, own_weight: int) -> list[list[str]]:
    """BM25 documents of turns in conversation order: each turn with its neighbours' words.

    Document i is turn i's tokens repeated ``own_weight`` times plus the tokens of the turns
    at most ``window`` positions before and after it in the same session. A turn often
    answers or is answered by its neighbours ("Which trail?" / "The one by the lake"), so a
    question's words may sit next to the turn that holds the fact. The turn itself is still
    what is returned; counting its own words more keeps it ahead of its neighbours.
    ``tokens`` and ``sessions`` are parallel lists in (session, position) order.
    """
    documents = []
    for i, own in enumerate(tokens):
        document = list(own) * own_weight
        for j in range(max(0, i - window), min(len(tokens), i + window + 1)):
            if j != i and sessions[j] == sessions[i]:
                document.extend(tokens[j])
        documents.append(document)
    return documents


def context_scores(scores: np.ndarray, session_codes: np.ndarray, *, window: int, own_weight: int) -> np.ndarray:
    """Each turn's score averaged with its neighbours' in the same session.

    ``scores``: ``(n,)`` float, one per turn in conversation order, ``NaN`` where a turn was
    not scored; ``session_codes``: ``(n,)`` int, each turn's session as a number
    (``BM25Index.session_codes``), ``-1`` for a document outside any session, which has no
    neighbours. Returns ``(n,)``: ``(own_weight * s_i + sum of s_j) / (own_weight
    + number of j)`` over the scored turns j at most ``window`` positions from i in i's
    session; ``NaN`` where ``scores`` is ``NaN``. This is score regularisation over a graph
    of related documents (Diaz, "Regularizing Ad Hoc Retrieval Scores", CIKM 2005), the
    graph being the conversation's adjacency: the same assumption as ``context_documents``
    (a fact is spread over a turn and its neighbours), applied to a retriever's scores
    rather than to its documents' words.
    """
    scored = ~np.isnan(scores)
    values = np.where(scored, scores, 0.0)
    total = own_weight * values
    count = own_weight * scored.astype(np.float64)
    for distance in range(1, min(window, len(scores) - 1) + 1):
        # pairs (i, i + distance) of scored turns of one session
        pair = (session_codes[distance:] == session_codes[:-distance]) & (session_codes[distance:] >= 0)
        pair &= scored[distance:] & scored[:-distance]
        total[:-distance] += np.where(pair, values[distance:], 0.0)
        count[:-distance] += pair
        total[distance:] += np.where(pair, values[:-distance], 0.0)
        count[distance:] += pair
    return np.where(scored, total / np.maximum(count, 1e-12), np.nan)


def vector_context_candidates(
    scores: np.ndarray, unknown: list[tuple[DocKey, float]], index: BM25Index, *, window: int, own_weight: int, limit: int
) -> list[tuple[DocKey, float]]:
    """The vector retriever's similarities rescored by ``context_scores``, as a ranked list.

    ``scores`` and ``unknown`` are ``vector_row_scores``' output: every document of the user
    by ``index`` row (``NaN``: not scored, and then it counts as absent for its neighbours),
    and the documents ``index`` does not know (added after its build), which keep their own
    similarity. Positions come from ``index`` (the user's turns in conversation order).
    Returns the best ``limit`` as ``(key, score)``, best first.
    """
    smoothed = context_scores(scores, index.session_codes, window=window, own_weight=own_weight)
    rows = np.flatnonzero(~np.isnan(smoothed))
    best = rows[np.argsort(-smoothed[rows], kind="stable")[:limit]]
    results = [(index.key(row), float(smoothed[row])) for row in best.tolist()]
    if unknown:
        results = sorted(results + unknown, key=lambda item: -item[1])
    return results[:limit]


def _load_bm25_index(user_id: uuid.UUID, version: int) -> BM25Index:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, session_id, search_vector::text, coalesce(metadata->>'speaker', '') FROM memory_message "
            "WHERE user_id = %s ORDER BY session_id, position",
            [user_id],
        )
        rows = cursor.fetchall()
        cursor.execute("SELECT id, search_vector::text FROM memory_knowledge WHERE user_id = %s", [user_id])
        knowledge = cursor.fetchall()
        speakers = sorted({speaker for _, _, _, speaker in rows if speaker})
        lexemes = []
        if speakers:
            cursor.execute("SELECT to_tsvector('english', name)::text FROM unnest(%s::text[]) WITH ORDINALITY AS s(name, i) ORDER BY i", [speakers])
            lexemes = [frozenset(tsvector_tokens(text)) for (text,) in cursor.fetchall()]
    config = settings.MEMFUSE
    messages = context_documents(
        [tsvector_tokens(text) for _, _, text, _ in rows],
        [session_id for _, session_id, _, _ in rows],
        window=config["BM25_CONTEXT_TURNS"],
        own_weight=config["BM25_OWN_WEIGHT"],
    )
    sessions = list(dict.fromkeys(session_id for _, session_id, _, _ in rows))
    codes = {session_id: code for code, session_id in enumerate(sessions)}
    session_ids = np.frombuffer(b"".join(session.bytes for session in sessions), dtype=np.uint8).reshape(-1, 16)
    session_codes = np.array([codes[session_id] for _, session_id, _, _ in rows] + [-1] * len(knowledge), dtype=np.int32)
    speaker_code = {speaker: code for code, speaker in enumerate(speakers)}
    speaker_codes = np.array([speaker_code.get(speaker, -1) for _, _, _, speaker in rows] + [-1] * len(knowledge), dtype=np.int32)
    ids = np.frombuffer(b"".join(row[0].bytes for row in rows + knowledge), dtype=np.uint8).reshape(-1, 16)
    corpus = messages + [tsvector_tokens(text) for _, text in knowledge]
    bm25 = None
    if any(corpus):  # an all-empty corpus has no vocabulary to index
        bm25 = bm25s.BM25(method="lucene")
        bm25.index(corpus, show_progress=False)
        # bm25s keeps its vocabulary's ids in a set (for retrieve(); we call get_scores()).
        # The garbage collector walks every element of a set at each full pass; a dict of the
        # same ints keeps `in` working and, holding no containers, is not tracked at all.
        bm25.unique_token_ids_set = dict.fromkeys(bm25.unique_token_ids_set)
    return BM25Index(
        version=version,
        ids=ids,
        messages=len(rows),
        session_codes=session_codes,
        session_ids=session_ids,
        bm25=bm25,
        speaker_codes=speaker_codes,
        speaker_lexemes=tuple(lexemes),
    )


@dataclass
class UserMemory:
    """Tier 2: one user's memory service, cached per process (see ``user_memory``).

    Holds what is worth keeping between a user's queries: the BM25 index of their corpus,
    rebuilt when their ``memory_version`` moves. Everything durable lives in the database,
    so evicting this object loses nothing.
    """

    user_id: uuid.UUID
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bm25: BM25Index | None = None
    _pending_vectors: dict = field(default_factory=dict, repr=False)

    def pending_embeddings(self, rows: list[tuple[uuid.UUID, object, str]]) -> np.ndarray:
        """Embeddings ``(len(rows), dim)`` of pending messages ``[(id, updated_at, text)]``.

        Read your writes: a message not flushed yet is embedded on demand, once per version
        of its text (cached by ``(id, updated_at)``); entries of messages no longer pending
        are dropped. The flush embeds it again for the index: the price of never making an
        add wait for the model.
        """
        keys = [(message_id, updated_at) for message_id, updated_at, _ in rows]
        with self._lock:
            self._pending_vectors = {key: self._pending_vectors[key] for key in keys if key in self._pending_vectors}
            missing = [(key, text) for key, (_, _, text) in zip(keys, rows) if key not in self._pending_vectors]
        if missing:
            vectors = registry.embed([text for _, text in missing])
            with self._lock:
                self._pending_vectors.update({key: vector for (key, _), vector in zip(missing, vectors)})
        with self._lock:
            return np.stack([self._pending_vectors[key] for key in keys])

    def bm25_index(self, version: int) -> BM25Index:
        """The BM25 index at ``version``, rebuilt (one query over the user's rows) if stale."""
        with self._lock:
            if self._bm25 is None or self._bm25.version != version:
                self._bm25 = _load_bm25_index(self.user_id, version)
            return self._bm25


class UserMemoryCache(LRUCache):
    """cachetools' ``LRUCache`` that counts its hits, misses and evictions (for operators).

    Not thread-safe by itself, like its base: ``user_memory`` holds ``_cache_lock``.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def popitem(self):
        # cachetools evicts through popitem() when an insert finds the cache full.
        item = super().popitem()
        self.evictions += 1
        return item



_cache_lock = threading.Lock()
_cache: UserMemoryCache | None = None


def _user_cache() -> UserMemoryCache:
    """The process's cache, created on first use (caller holds ``_cache_lock``)."""
    global _cache
    if _cache is None:
        _cache = UserMemoryCache(maxsize=settings.MEMFUSE["USER_CACHE_SIZE"])
    return _cache


def user_memory(user_id: uuid.UUID) -> UserMemory:
    """The process's ``UserMemory`` for ``user_id`` from a thread-safe, bounded LRU cache.

    At most ``USER_CACHE_SIZE`` users are kept; the least recently used one is evicted. An
    evicted ``UserMemory`` only held rebuildable data (its BM25 index, embeddings of pending
    messages): its pending messages are rows and are still queried and flushed.
    """
    with _cache_lock:
        cache = _user_cache()
        service = cache.get(user_id)
        if service is None:
            cache.misses += 1
            service = cache[user_id] = UserMemory(user_id=user_id)
        else:
            cache.hits += 1
        return service


def cache_stats() -> dict:
    """The per-user service cache of this process since start.

    ``{"size", "max_size", "hits", "misses", "evictions", "hit_rate"}``; ``hit_rate`` is
    hits / lookups in [0, 1], ``None`` before the first lookup.
    """
    with _cache_lock:
        cache = _user_cache()
        lookups = cache.hits + cache.misses
        return {
            "size": len(cache),
            "max_size": int(cache.maxsize),
            "hits": cache.hits,
            "misses": cache.misses,
            "evictions": cache.evictions,
            "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
        }


def reset_user_cache(*, max_size: int | None = None) -> None:
    """Drop every cached ``UserMemory`` and the counters; ``max_size`` overrides the setting.

    For tests and for an operator who wants a fresh start; nothing durable is lost.
    """
    global _cache
    with _cache_lock:
        _cache = UserMemoryCache(maxsize=max_size or settings.MEMFUSE["USER_CACHE_SIZE"])


def query_tokens(text: str) -> list[str]:
    """The query's lexemes under PostgreSQL's English analysis (the documents' analysis)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_tsvector('english', %s)::text", [text])
        return tsvector_tokens(cursor.fetchone()[0])


def vector_candidates(
    *,
    user_id: uuid.UUID,
    embedding: np.ndarray,
    limit: int,
    agent_id: uuid.UUID | None = None,
    feedback: list[DocKey] = (),
    feedback_weight: float = 0.0,
) -> list[tuple[DocKey, float]]:
    """Top ``limit`` documents by cosine similarity to the query (``embedding``, ``(dim,)``
    float32), moved toward ``feedback`` documents when given (Rocchio, below).

    Returns ``(key, similarity)`` best first, similarity = 1 - cosine distance. Flushed rows:
    an exact scan of the user's rows (the schema has no HNSW index, see migration 0006): an
    HNSW search filtered by user afterwards returns the ``ef_search`` nearest rows of all
    users and can silently miss a small user's rows, while a user's rows are few enough to
    scan through the ``user_id`` index. Pending rows (not flushed yet) are embedded on demand
    (``UserMemory.pending_embeddings``) and scored the same way, so a message is found, with
    the same score, right after its add.

    **Pseudo-relevance feedback**: with ``feedback`` and ``feedback_weight`` > 0, the query is
    ``q + feedback_weight * mean(e_d for d in feedback)``: Rocchio's relevance feedback
    (Rocchio, 1971; the weight is his beta, 0.75 by default) with BM25's top documents taken
    as relevant. The embedding model alone is weak on conversations (it misses names and
    rare words); the documents BM25 ranks first carry them to the vector side, which then
    finds their paraphrases. Feedback documents not embedded yet (pending) are skipped;
    with none left the query is not moved. Computed in the same statement as the scan (as
    ``q / beta + mean``, the same direction, and cosine ignores length): no extra round trip.
    """
    rows, pending = _vector_scan(
        user_id=user_id, embedding=embedding, limit=limit, agent_id=agent_id, feedback=feedback, feedback_weight=feedback_weight
    )
    results = [(DocKey(kind, doc_id), float(similarity)) for kind, doc_id, similarity in rows]
    results.extend(pending)
    if pending:
        results.sort(key=lambda item: -item[1])
    return results[:limit]


def vector_row_scores(
    *,
    user_id: uuid.UUID,
    embedding: np.ndarray,
    index: BM25Index,
    agent_id: uuid.UUID | None = None,
    feedback: list[DocKey] = (),
    feedback_weight: float = 0.0,
) -> tuple[np.ndarray, list[tuple[DocKey, float]]]:
    """Every document of the user scored as ``vector_candidates`` scores them, by ``index`` row.

    Returns ``(scores, unknown)``: ``scores`` is ``(len(index),)`` float64, the similarity of
    row i's document, ``NaN`` where it was not scored (a message of another agent than
    ``agent_id``); ``unknown`` is ``[(key, similarity)]`` of documents ``index`` does not
    hold (added after its build). The input of ``vector_context_candidates``.

    The same scan as ``vector_candidates``, but its rows come back as two arrays (the ids'
    bytes, the similarities) placed by ``BM25Index.rows``: no Python object per document
    (a key and a UUID per row were ~1 ms of the web process's time per query, measured).
    """
    aggregates, pending = _vector_scan(
        user_id=user_id, embedding=embedding, limit=None, agent_id=agent_id, feedback=feedback, feedback_weight=feedback_weight
    )
    scores = np.full(len(index), np.nan)
    unknown = []
    for kind, ids, similarities in aggregates:
        ids = np.frombuffer(ids, dtype="V16")
        similarities = np.asarray(similarities, dtype=np.float64)
        rows = index.rows(ids, kind=kind)
        held = rows >= 0
        scores[rows[held]] = similarities[held]
        for i in np.flatnonzero(~held).tolist():
            unknown.append((DocKey.from_int(kind, int.from_bytes(ids[i].tobytes(), "big")), float(similarities[i])))
    for key, similarity in pending:
        row = index.row(key)
        if row is None:
            unknown.append((key, similarity))
        else:
            scores[row] = similarity
    return scores, unknown


def _vector_scan(
    *,
    user_id: uuid.UUID,
    embedding: np.ndarray,
    limit: int | None,
    agent_id: uuid.UUID | None,
    feedback: list[DocKey],
    feedback_weight: float,
) -> tuple[list[tuple], list[tuple[DocKey, float]]]:
    """The scan of ``vector_candidates`` (see there): ``(flushed, pending)``.

    ``flushed``: with a ``limit``, the best ``limit`` flushed documents as rows ``(kind, id,
    similarity)`` best first; with ``limit=None``, all of them, one row per kind
    present, ``(kind, ids, similarities)``: the ids' 16-byte UUIDs concatenated and the
    similarities in the same order. ``pending``: ``(key, similarity)`` of the messages not
    flushed yet, embedded on demand.
    """
    agent_join = "JOIN memory_session s ON s.id = m.session_id AND s.agent_id = %(agent)s" if agent_id else ""
    moving = bool(feedback) and feedback_weight > 0
    if limit is None:
        scanned = """SELECT kind, NULL::uuid, NULL::float8, NULL::timestamptz, NULL::text,
               string_agg(uuid_send(id), ''::bytea ORDER BY id), array_agg(1 - (embedding <=> query.q) ORDER BY id)
            FROM mine, query GROUP BY kind"""
    else:
        scanned = """(SELECT kind, id, 1 - (embedding <=> query.q), NULL::timestamptz, NULL, NULL::bytea, NULL::float8[]
            FROM mine, query ORDER BY embedding <=> query.q LIMIT %(limit)s)"""
    sql = f"""
        WITH feedback AS (
            SELECT avg(e) AS mean FROM (
                SELECT embedding AS e FROM memory_message
                WHERE user_id = %(user)s AND id = ANY(%(fm)s) AND embedding IS NOT NULL
                UNION ALL
                SELECT embedding FROM memory_knowledge
                WHERE user_id = %(user)s AND id = ANY(%(fk)s) AND embedding IS NOT NULL
            ) f
        ), query AS MATERIALIZED (
            SELECT coalesce(%(q_scaled)s::vector + mean, %(q)s::vector) AS q, mean IS NOT NULL AS moved FROM feedback
        ), mine AS MATERIALIZED (
            SELECT 'message' AS kind, m.id, m.embedding FROM memory_message m {agent_join}
            WHERE m.user_id = %(user)s AND m.flushed_at IS NOT NULL
            UNION ALL
            SELECT 'knowledge', k.id, k.embedding FROM memory_knowledge k
            WHERE k.user_id = %(user)s AND k.embedding IS NOT NULL
        ), pending AS MATERIALIZED (
            SELECT m.id, m.updated_at, m.index_text FROM memory_message m {agent_join}
            WHERE m.user_id = %(user)s AND m.flushed_at IS NULL
        )
        {scanned}
        UNION ALL
        SELECT 'pending', id, NULL, updated_at, index_text, NULL, NULL FROM pending
        UNION ALL
        -- the moved query, for scoring pending messages here, only when there are some
        SELECT 'query', NULL, NULL, NULL, q::text, NULL, NULL FROM query WHERE moved AND EXISTS (SELECT FROM pending)
    """
    params = {
        "user": user_id,
        "agent": agent_id,
        "q": vector_literal(embedding),
        "q_scaled": vector_literal(embedding / feedback_weight) if moving else None,
        "fm": [key.id for key in feedback if key.kind == "message"] if moving else [],
        "fk": [key.id for key in feedback if key.kind == "knowledge"] if moving else [],
        "limit": limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    if limit is None:
        flushed = [(row[0], row[5], row[6]) for row in rows if row[0] in ("message", "knowledge")]
    else:
        flushed = [row[:3] for row in rows if row[0] in ("message", "knowledge")]
    waiting = [(doc_id, updated_at, text) for kind, doc_id, _, updated_at, text, _, _ in rows if kind == "pending"]
    pending = []
    if waiting:
        moved = [row[4] for row in rows if row[0] == "query"]
        query = Vector._from_db(moved[0]) if moved else embedding
        query = (query / np.linalg.norm(query)).astype(np.float32)
        similarities = user_memory(user_id).pending_embeddings(waiting) @ query
        pending = [(DocKey("message", doc_id), float(sim)) for (doc_id, _, _), sim in zip(waiting, similarities)]
    return flushed, pending


def convex_fuse(ranked_lists: dict[str, list[tuple[DocKey, float]]], weights: dict[str, float]) -> list[tuple[DocKey, float, dict]]:
    """Convex combination of min-max normalised scores: ``sum_r w_r / W * norm_r(d)``.

    An alternative to RRF (Bruch, Gai & Ingber, "An Analysis of Fusion Functions for Hybrid
    Retrieval", ACM TOIS 2023): it uses how far apart the scores are, not only the ranks.
    Each list's scores are scaled to [0, 1] by its own min and max (a list of one scores 1);
    a document missing from a list gets 0 there. Same input and output shapes as
    ``rrf_fuse``.
    """
    total = sum(weights.get(name, 1.0) for name in ranked_lists) or 1.0
    fused: dict[DocKey, float] = {}
    found: dict[DocKey, dict] = {}
    for name, ranked in ranked_lists.items():
        if not ranked:
            continue
        weight = weights.get(name, 1.0) / total
        scores = [score for _, score in ranked]
        low, span = min(scores), max(scores) - min(scores)
        for rank, (key, score) in enumerate(ranked, start=1):
            normalised = (score - low) / span if span > 0 else 1.0
            fused[key] = fused.get(key, 0.0) + weight * normalised
            found.setdefault(key, {})[name] = {"rank": rank, "score": round(score, 6)}
    ordered = sorted(fused.items(), key=lambda item: -item[1])
    return [(key, score, found[key]) for key, score in ordered]


def speaker_candidates(hits: list[tuple[DocKey, float, dict]], index: BM25Index, speaker: int) -> list[tuple[DocKey, float]]:
    """The ``hits`` spoken by ``speaker`` (a code of ``index``), in their order, as ``(key, fused score)``.

    The third ranked list of the fusion when the query names one of the conversation's
    speakers (``BM25Index.named_speaker``): a question about a person is mostly answered by
    that person's own turns (in the LoCoMo development file, 96.5% of the evidence turns of
    questions naming one speaker are that speaker's), while BM25's context windows and the
    vector side's neighbour smoothing rank both sides of an exchange alike. As one more list
    of the RRF, not a filter: the other speaker's turns keep their place when both
    retrievers agree on them. Hits the index does not know (added after its build) are left
    out.
    """
    spoken = (index.speaker_codes == speaker).tobytes()  # one byte per row: 1 if the speaker's
    rows = [index.row(key) for key, _, _ in hits]
    return [(key, score) for (key, score, _), row in zip(hits, rows) if row is not None and spoken[row]]


def fuse(ranked_lists: dict[str, list[tuple[DocKey, float]]], config: RetrievalConfig) -> list[tuple[DocKey, float, dict]]:
    """The ranked lists fused as ``config.fusion`` says (``rrf_fuse`` or ``convex_fuse``)."""
    weights = {"bm25": config.bm25_weight, "vector": config.vector_weight, "speaker": config.speaker_weight}
    if config.fusion == "convex":
        return convex_fuse(ranked_lists, weights)
    return rrf_fuse(ranked_lists, weights, config.rrf_k)


def rrf_fuse(ranked_lists: dict[str, list[tuple[DocKey, float]]], weights: dict[str, float], k: int) -> list[tuple[DocKey, float, dict]]:
    """Weighted reciprocal rank fusion of ranked lists (see module docstring).

    ``ranked_lists[name]`` is ``[(key, retriever_score), ...]`` best first. Returns
    ``[(key, fused_score, {name: {"rank": r, "score": s}})]`` sorted by fused score, ties
    broken by the first list's order.
    """
    fused: dict[DocKey, float] = {}
    found: dict[DocKey, dict] = {}
    for name, ranked in ranked_lists.items():
        weight = weights.get(name, 1.0)
        for rank, (key, score) in enumerate(ranked, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
            found.setdefault(key, {})[name] = {"rank": rank, "score": round(score, 6)}
    ordered = sorted(fused.items(), key=lambda item: -item[1])
    return [(key, score, found[key]) for key, score in ordered]


def document_texts(user_id: uuid.UUID, keys: list[DocKey]) -> dict[DocKey, str]:
    """The indexed text of each of ``keys`` (a message's ``index_text``, a knowledge item's
    content), read from ``user_id``'s rows only; keys not found are absent."""
    message_ids = [key.id for key in keys if key.kind == "message"]
    knowledge_ids = [key.id for key in keys if key.kind == "knowledge"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 'message', id, index_text FROM memory_message WHERE user_id = %(user)s AND id = ANY(%(m)s) "
            "UNION ALL SELECT 'knowledge', id, content FROM memory_knowledge WHERE user_id = %(user)s AND id = ANY(%(k)s)",
            {"user": user_id, "m": message_ids, "k": knowledge_ids},
        )
        return {DocKey(kind, doc_id): text for kind, doc_id, text in cursor.fetchall()}


def rerank(
    *, user_id: uuid.UUID, query: str, hits: list[tuple[DocKey, float, dict]], top_n: int
) -> list[tuple[DocKey, float, dict]]:
    """The first ``top_n`` hits reordered by the cross-encoder's relevance to ``query``.

    Each reranked hit keeps its fused score and gains ``retrievers["reranker"] = {"rank",
    "score"}``; hits after ``top_n`` follow unchanged. Ties keep the fused order. Costs one
    cross-encoder call over ``top_n`` (query, document) pairs. Raises
    ``registry.RerankerLoadError`` when no reranker is configured.
    """
    head, tail = hits[:top_n], hits[top_n:]
    if not head:
        return hits
    texts = document_texts(user_id, [key for key, _, _ in head])
    scores = registry.rerank_scores(query, [texts.get(key, "") for key, _, _ in head])
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    reranked = []
    for rank, i in enumerate(order, start=1):
        key, fused, found = head[i]
        reranked.append((key, fused, {**found, "reranker": {"rank": rank, "score": round(float(scores[i]), 6)}}))
    return reranked + tail


def hybrid_search_stages(
    *,
    user_id: uuid.UUID,
    memory_version: int,
    query: str,
    top_k: int,
    agent_id: uuid.UUID | None = None,
    config: RetrievalConfig | None = None,
    partial: bool = True,
) -> Iterator[tuple[str, list[tuple[DocKey, float, dict]]]]:
    """The search in stages: ``("partial", hits)`` from BM25 alone, then ``("final", hits)``.

    ``hits`` are ``(key, fused_score, retrievers)``, at most ``top_k``. BM25 is fast and
    already covers pending messages, so a UI can show its ranking before the query has been
    embedded. ``agent_id`` restricts messages to that agent's sessions (knowledge is
    user-level). With a retriever switched off (weight 0), or ``partial=False``, only the
    final stage comes. When the query names one of the user's speakers and
    ``config.speaker_weight`` > 0, that speaker's turns are fused in as a third list
    (``speaker_candidates``). With
    ``config.rerank`` the final stage's first ``rerank_top_n`` are reordered by the
    cross-encoder (``rerank``).
    """
    config = config or RetrievalConfig.from_settings()
    allowed_sessions = None
    if agent_id is not None:
        from memory.models import Session

        allowed_sessions = set(Session.objects.filter(user_id=user_id, agent_id=agent_id).values_list("id", flat=True))
    ranked: dict[str, list] = {}
    context_turns = config.vector_context_turns if config.vector_weight > 0 else 0
    # The query is embedded while BM25 runs (its SQL, and the index build of a user not
    # cached): both are on every query's critical path, and the model waits in its own thread.
    embedding = registry.submit_query([query]) if config.vector_weight > 0 else None
    index, speaker = None, None
    if config.bm25_weight > 0 or context_turns or config.speaker_weight > 0:
        index = user_memory(user_id).bm25_index(memory_version)
    if config.bm25_weight > 0 or (config.speaker_weight > 0 and index.speaker_lexemes):
        tokens = query_tokens(query)
        if config.speaker_weight > 0:
            speaker = index.named_speaker(tokens)
    if config.bm25_weight > 0:
        ranked["bm25"] = index.search(tokens, limit=config.bm25_candidates, allowed_sessions=allowed_sessions)
        if partial and config.vector_weight > 0:
            yield "partial", _fuse_with_speaker(ranked, config, index, speaker)[:top_k]
    if embedding is not None:
        scan = dict(
            user_id=user_id,
            embedding=embedding.result()[0],
            agent_id=agent_id,
            feedback=[key for key, _ in ranked.get("bm25", [])[: config.prf_docs]],
            feedback_weight=config.prf_weight,
        )
        if context_turns:
            scores, unknown = vector_row_scores(**scan, index=index)
            ranked["vector"] = vector_context_candidates(
                scores, unknown, index, window=context_turns, own_weight=config.vector_own_weight, limit=config.vector_candidates
            )
        else:
            ranked["vector"] = vector_candidates(**scan, limit=config.vector_candidates)
    hits = _fuse_with_speaker(ranked, config, index, speaker)
    if config.rerank:
        hits = rerank(user_id=user_id, query=query, hits=hits, top_n=config.rerank_top_n)
    yield "final", hits[:top_k]


def _fuse_with_speaker(ranked: dict[str, list], config: RetrievalConfig, index: BM25Index | None, speaker: int | None) -> list:
    """``fuse`` of ``ranked``, then with the named speaker's turns of that fusion as a third list.

    Under RRF the third list only adds ``speaker_weight / (k + rank)`` to its documents'
    fused scores, so it is added in one pass over the hits instead of a second fusion (which
    cost ~1 ms of Python per query, measured); convex fusion renormalises every list, so it
    fuses again.
    """
    hits = fuse(ranked, config)
    if speaker is None:
        return hits
    spoken = speaker_candidates(hits, index, speaker)
    if config.fusion == "convex":
        return fuse({**ranked, "speaker": spoken}, config)
    ranks = {key: rank for rank, (key, _) in enumerate(spoken, start=1)}
    rescored = []
    for key, score, found in hits:
        rank = ranks.get(key)
        if rank is not None:
            found = {**found, "speaker": {"rank": rank, "score": round(score, 6)}}
            score += config.speaker_weight / (config.rrf_k + rank)
        rescored.append((key, score, found))
    rescored.sort(key=lambda hit: -hit[1])
    return rescored


def hybrid_search(**kwargs) -> list[tuple[DocKey, float, dict]]:
    """The final stage of ``hybrid_search_stages`` (same arguments; no partial stage is computed)."""
    *_, (_, hits) = hybrid_search_stages(**kwargs, partial=False)
    return hits
