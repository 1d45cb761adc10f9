"""BM25 over one user's messages and knowledge, updated in place as the documents change.

**Scoring** and the queries: ``memory.retrieval.bm25_scoring`` (a base class of the index);
the snapshot format: ``memory.retrieval.bm25_snapshot``.

**Documents** are context documents: a turn's own lexemes counted ``own_weight`` times plus
those of the ``window`` turns before and after it in its session (a turn often answers or is
answered by its neighbours: "Which trail?" / "The one by the lake"); the turn alone is
returned. A knowledge item is its own lexemes, once.

**What is stored** is each document's own lexemes (postings: term -> (row, count)) and the
order of each session's turns as links (``prev`` / ``next``). Context documents are never
materialised: a query term's frequency in each context document is spread from its own
postings over the links when the query runs, and N, the mean length and every document
frequency are read then too. So an add, an edit or a delete touches only its own rows
(appends, and a dead flag), whatever the history's length, and the scores are exactly those
of an index built from scratch over the same documents. Postings live in a compressed-sparse
base (terms in order) and an unsorted tail of recent ones; ``compact`` merges them and drops
dead rows when the tail or the dead grow large.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from memory.retrieval.bm25_scoring import BM25Scoring
from memory.retrieval.bm25_snapshot import in_parts, index_from_parts, snapshot_buffers
from memory.retrieval.keys import KINDS, KNOWLEDGE, MESSAGE, DocKey

__all__ = ["KINDS", "KNOWLEDGE", "MESSAGE", "BM25Index", "Document"]


@dataclass(frozen=True)
class Document:
    """One document to index. ``lexemes``: its own lexeme counts (``lexemes.tsvector_counts``).
    ``session`` / ``position``: a message's session id and place in it (``None`` / 0 for
    knowledge). ``speaker``: ``metadata["speaker"]``; ``speaker_lexemes`` its name's lexemes.
    ``created_us``: creation time in microseconds since the Unix epoch (time-bounded queries).
    """

    kind: int
    id: uuid.UUID
    lexemes: dict[str, int]
    created_us: int
    session: uuid.UUID | None = None
    position: int = 0
    speaker: str | None = None
    speaker_lexemes: frozenset[str] = frozenset()


# Per-row arrays: name -> dtype, fill value of an unused row.
_ROW_ARRAYS = {
    "kind": (np.int8, 0),
    "session": (np.int32, -1),
    "position": (np.int64, 0),
    "length": (np.int32, 0),
    "speaker": (np.int32, -1),
    "created": (np.int64, 0),
    "alive": (np.bool_, False),
    "prev": (np.int32, -1),
    "next": (np.int32, -1),
}


class BM25Index(BM25Scoring):
    """The lexical index of one user's documents (see the module docstring).

    Rows are documents in the order they were added (``compact`` renumbers them); a replaced
    or deleted document's row stays, dead, until then. ``window`` / ``own_weight``: the
    context documents' shape (``BM25_CONTEXT_TURNS``, ``BM25_OWN_WEIGHT``). ``seq``: the
    highest change number (``memory_change_seq``) applied. Not thread-safe: the caller
    (``memory.retrieval.cache.UserIndex``) holds a lock around every use.

    Memory: about 30 bytes per posting (a turn's distinct lexemes, ~10-15) and 60 per row,
    plus the vocabulary; ``nbytes`` counts it.
    """

    ROW_ARRAYS = _ROW_ARRAYS  # the layout the snapshot writes (memory.retrieval.bm25_snapshot)

    def __init__(self, *, window: int, own_weight: int, capacity: int = 16) -> None:
        self.window = window
        self.own_weight = own_weight
        self.seq = 0
        self.n = 0  # rows used, live and dead
        self.live = 0
        self._capacity = 0
        self.ids = np.zeros((0, 16), dtype=np.uint8)
        for name, (dtype, _) in _ROW_ARRAYS.items():
            setattr(self, name, np.zeros(0, dtype=dtype))
        self._grow(max(capacity, 16))
        self.session_ids: list[bytes] = []  # session code -> the session's UUID bytes
        self._session_codes: dict[bytes, int] = {}
        self._session_last: list[int] = []  # session code -> row of its last turn (-1: none)
        self.speakers: list[str] = []
        self.speaker_lexemes: list[frozenset[str]] = []
        self._speaker_codes: dict[str, int] = {}
        self.vocab: dict[str, int] = {}
        self._vocab_bytes = 0
        # Postings: base (CSR over terms 0..len(base_ptr)-2) and tail (unsorted triples).
        self._base_ptr = np.zeros(1, dtype=np.int64)
        self._base_rows = np.zeros(0, dtype=np.int32)
        self._base_tf = np.zeros(0, dtype=np.uint16)
        self._tail_n = 0
        self._tail_term = np.zeros(64, dtype=np.int32)
        self._tail_row = np.zeros(64, dtype=np.int32)
        self._tail_tf = np.zeros(64, dtype=np.uint16)
        # Rows by id: the rows below _sorted_n sorted by id bytes, the later ones in a dict.
        self._sorted_n = 0
        self._sorted = np.zeros(0, dtype=np.int32)
        self._recent: dict[int, int] = {}
        # Each row's context document length (0 when dead) and their sum: kept up to date by
        # every change (``_recompute``), so a query after a write does no O(n) pass.
        self._context_length = np.zeros(self._capacity)
        self._context_total = 0.0
        self._session_rank: np.ndarray | None = None

    # --- size ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live documents."""
        return self.live

    @property
    def nbytes(self) -> int:
        """Bytes held (arrays, vocabulary, lookups): what the per-user cache counts."""
        arrays = self.ids.nbytes + sum(getattr(self, name).nbytes for name in _ROW_ARRAYS)
        postings = self._base_ptr.nbytes + self._base_rows.nbytes + self._base_tf.nbytes
        postings += self._tail_term.nbytes + self._tail_row.nbytes + self._tail_tf.nbytes
        lookups = self._sorted.nbytes + 100 * len(self._recent) + 120 * len(self.session_ids)
        derived = self._context_length.nbytes
        return arrays + postings + lookups + derived + self._vocab_bytes + 64 * len(self.speakers) + 512

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        ids = np.zeros((capacity, 16), dtype=np.uint8)
        ids[:old] = self.ids[:old]
        self.ids = ids
        for name, (dtype, fill) in _ROW_ARRAYS.items():
            array = np.full(capacity, fill, dtype=dtype)
            array[:old] = getattr(self, name)[:old]
            setattr(self, name, array)
        if hasattr(self, "_context_length"):
            grown = np.zeros(capacity)
            grown[:old] = self._context_length[:old]
            self._context_length = grown
        self._capacity = capacity

    # --- changes ---------------------------------------------------------------------------

    def add(self, document: Document) -> None:
        """Index ``document``, replacing the live document with its id if there is one."""
        previous = self._row_of_bytes(document.id.bytes)
        if previous is not None:
            self._kill(previous)
        if self.n == self._capacity:
            self._grow(int(self._capacity * 1.5) + 16)
        row = self.n
        self.n += 1
        self.live += 1
        self.ids[row] = np.frombuffer(document.id.bytes, dtype=np.uint8)
        self.kind[row] = document.kind
        self.position[row] = document.position
        self.created[row] = document.created_us
        self.alive[row] = True
        self.length[row] = sum(document.lexemes.values())
        if document.speaker:
            self.speaker[row] = self._speaker_code(document.speaker, document.speaker_lexemes)
        self._add_postings(row, document.lexemes)
        if document.kind == MESSAGE and document.session is not None:
            self.session[row] = self._session_code(document.session.bytes)
            self._link(row)
        self._recompute(self._around(row))
        self._recent[document.id.int] = row

    def remove(self, doc_id: uuid.UUID) -> bool:
        """Drop the live document with ``doc_id``; ``False`` if the index does not hold it."""
        row = self._row_of_bytes(doc_id.bytes)
        if row is None:
            return False
        self._kill(row)
        self._recent.pop(doc_id.int, None)
        return True

    def _around(self, row: int) -> list[int]:
        """``row`` and the rows at most ``window`` turns from it in its session: those whose
        context document holds it."""
        rows = [row]
        for links in (self.prev, self.next):
            hop = row
            for _ in range(self.window):
                hop = int(links[hop])
                if hop < 0:
                    break
                rows.append(hop)
        return rows

    def _recompute(self, rows: list[int]) -> None:
        """The context length of each live row of ``rows``, from its window as linked now."""
        for row in rows:
            if not self.alive[row]:
                continue
            total = (self.own_weight if self.kind[row] == MESSAGE else 1) * int(self.length[row])
            for hop in self._around(row)[1:]:
                total += int(self.length[hop])
            self._context_total += total - self._context_length[row]
            self._context_length[row] = total

    def _kill(self, row: int) -> None:
        around = self._around(row)[1:]
        self._context_total -= self._context_length[row]
        self._context_length[row] = 0.0
        self.alive[row] = False
        self.live -= 1
        before, after = int(self.prev[row]), int(self.next[row])
        if before >= 0:
            self.next[before] = after
        if after >= 0:
            self.prev[after] = before
        code = int(self.session[row])
        if code >= 0 and self._session_last[code] == row:
            self._session_last[code] = before
        self.prev[row] = self.next[row] = -1
        self._recompute(around)  # their windows reach one turn further now

    def _link(self, row: int) -> None:
        """Put ``row`` into its session's order by position (usually at the end)."""
        code = int(self.session[row])
        position = self.position[row]
        after = self._session_last[code]  # the turn ``row`` goes after (-1: first)
        later = -1
        while after >= 0 and self.position[after] > position:
            later, after = after, int(self.prev[after])
        self.prev[row], self.next[row] = after, later
        if after >= 0:
            self.next[after] = row
        if later >= 0:
            self.prev[later] = row
        else:
            self._session_last[code] = row

    def _session_code(self, session: bytes) -> int:
        code = self._session_codes.get(session)
        if code is None:
            code = self._session_codes[session] = len(self.session_ids)
            self.session_ids.append(session)
            self._session_last.append(-1)
            self._session_rank = None
        return code

    def _speaker_code(self, speaker: str, lexemes: frozenset[str]) -> int:
        code = self._speaker_codes.get(speaker)
        if code is None:
            code = self._speaker_codes[speaker] = len(self.speakers)
            self.speakers.append(speaker)
            self.speaker_lexemes.append(frozenset(lexemes))
        return code

    def _add_postings(self, row: int, lexemes: dict[str, int]) -> None:
        count = len(lexemes)
        if not count:
            return
        if self._tail_n + count > len(self._tail_term):
            size = max(2 * len(self._tail_term), self._tail_n + count)
            for name in ("_tail_term", "_tail_row", "_tail_tf"):
                array = getattr(self, name)
                grown = np.zeros(size, dtype=array.dtype)
                grown[: self._tail_n] = array[: self._tail_n]
                setattr(self, name, grown)
        vocab = self.vocab
        terms = []
        for lexeme in lexemes:
            term = vocab.get(lexeme)
            if term is None:
                term = vocab[lexeme] = len(vocab)
                self._vocab_bytes += len(lexeme) + 90  # str object + dict slot
            terms.append(term)
        end = self._tail_n + count
        self._tail_term[self._tail_n : end] = terms
        self._tail_row[self._tail_n : end] = row
        self._tail_tf[self._tail_n : end] = np.minimum(list(lexemes.values()), 65535)
        self._tail_n = end

    def needs_compaction(self) -> bool:
        """Whether the tail of postings or the dead rows have grown past a quarter of the index."""
        base = len(self._base_rows)
        return self._tail_n > max(8192, base // 4) or (self.n - self.live) > max(256, self.n // 4)

    def compact(self) -> None:
        """Merge the tail of postings into the base and drop dead rows (renumbering rows).

        O(postings log postings); the scores do not change.
        """
        keep = np.flatnonzero(self.alive[: self.n])
        renumber = np.full(self.n + 1, -1, dtype=np.int64)  # old row -> new row (index -1: -1)
        renumber[keep] = np.arange(len(keep))
        terms, rows, tfs = self._all_postings()
        live = self.alive[rows]
        terms, rows, tfs = terms[live], renumber[rows[live]], tfs[live]
        order = np.lexsort((rows, terms))
        counts = np.bincount(terms, minlength=len(self.vocab))
        self._base_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._base_rows = rows[order].astype(np.int32)
        self._base_tf = tfs[order].astype(np.uint16)
        self._tail_n = 0
        self._tail_term = np.zeros(64, dtype=np.int32)
        self._tail_row = np.zeros(64, dtype=np.int32)
        self._tail_tf = np.zeros(64, dtype=np.uint16)
        capacity = max(16, int(len(keep) * 1.25) + 16)
        ids = np.zeros((capacity, 16), dtype=np.uint8)
        ids[: len(keep)] = self.ids[keep]
        self.ids = ids
        for name, (dtype, fill) in _ROW_ARRAYS.items():
            array = np.full(capacity, fill, dtype=dtype)
            values = getattr(self, name)[keep]
            if name in ("prev", "next"):
                values = renumber[values].astype(np.int32)
            array[: len(keep)] = values
            setattr(self, name, array)
        self._capacity = capacity
        self._session_last = [int(renumber[row]) for row in self._session_last]
        self.n = self.live = len(keep)
        self._index_ids()
        self._recompute_all()

    def _index_ids(self) -> None:
        """Sort every row by id for ``_row_of_bytes`` (after a load or a compaction)."""
        self._sorted = np.argsort(self.ids[: self.n].reshape(-1).view("V16"), kind="stable").astype(np.int32)
        self._sorted_n = self.n
        self._recent = {}

    def _all_postings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every posting, base then tail: ``(terms, rows, tfs)`` as int64 arrays."""
        base_terms = np.repeat(np.arange(len(self._base_ptr) - 1), np.diff(self._base_ptr))
        terms = np.concatenate((base_terms, self._tail_term[: self._tail_n])).astype(np.int64)
        rows = np.concatenate((self._base_rows, self._tail_row[: self._tail_n])).astype(np.int64)
        tfs = np.concatenate((self._base_tf, self._tail_tf[: self._tail_n])).astype(np.int64)
        return terms, rows, tfs

    # --- lookups ---------------------------------------------------------------------------

    def _row_of_bytes(self, doc_id: bytes) -> int | None:
        """The live row of the document whose UUID bytes are ``doc_id``, else ``None``."""
        row = self._recent.get(int.from_bytes(doc_id, "big"))
        if row is None and self._sorted_n:
            held = self.ids[: self._sorted_n].reshape(-1).view("V16")
            target = np.frombuffer(doc_id, dtype="V16")[0]
            at = int(np.searchsorted(held, target, sorter=self._sorted))
            if at < self._sorted_n and held[self._sorted[at]] == target:
                row = int(self._sorted[at])
        return row if row is not None and self.alive[row] else None

    def row(self, key: DocKey) -> int | None:
        """The row of ``key``'s live document, ``None`` if the index does not hold it."""
        row = int(self.rows([key])[0])
        return None if row < 0 else row

    def rows(self, keys: list[DocKey]) -> np.ndarray:
        """``row`` of each of ``keys`` at once: ``(len(keys),)`` int64, -1 where the index does
        not hold that live document. One binary search of the sorted ids for all of them."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        searched = []
        for i, key in enumerate(keys):
            row = self._recent.get(key[1])
            if row is None:
                searched.append(i)
            else:
                rows[i] = row
        if searched and self._sorted_n:
            held = self.ids[: self._sorted_n].reshape(-1).view("V16")
            targets = np.frombuffer(b"".join(keys[i][1].to_bytes(16, "big") for i in searched), dtype="V16")
            at = np.searchsorted(held, targets, sorter=self._sorted)
            candidates = self._sorted[np.minimum(at, self._sorted_n - 1)]
            found = (at < self._sorted_n) & (held[candidates] == targets)
            rows[np.asarray(searched)[found]] = candidates[found]
        kinds = np.fromiter((KINDS.index(key[0]) for key in keys), dtype=np.int8, count=len(keys))
        held_rows = rows >= 0
        live = np.zeros(len(keys), dtype=bool)
        live[held_rows] = self.alive[rows[held_rows]] & (self.kind[rows[held_rows]] == kinds[held_rows])
        rows[~live] = -1
        return rows

    def key(self, row: int) -> DocKey:
        """The document at ``row``."""
        return DocKey.from_int(KINDS[self.kind[row]], int.from_bytes(self.ids[row].tobytes(), "big"))

    def keys(self, rows: np.ndarray) -> list[DocKey]:
        """The documents at ``rows`` (``(m,)`` int), in that order: ``key`` of each, with one
        copy of their ids and kinds rather than one per row."""
        raw = self.ids[rows].tobytes()
        return [
            DocKey.from_int(KINDS[kind], int.from_bytes(raw[16 * i : 16 * i + 16], "big"))
            for i, kind in enumerate(self.kind[rows].tolist())
        ]

    def session_codes(self, sessions: Iterable[uuid.UUID]) -> set[int]:
        """The codes of those of ``sessions`` the index knows."""
        codes = (self._session_codes.get(session.bytes) for session in sessions)
        return {code for code in codes if code is not None}

    # --- snapshots (memory.retrieval.bm25_snapshot) ----------------------------------------

    def to_bytes(self) -> bytes:
        """The index as bytes for ``from_bytes`` (compacted first: no tail, no dead rows)."""
        return b"".join(snapshot_buffers(self))

    def to_parts(self, size: int) -> Iterator[bytes]:
        """``to_bytes``' output as consecutive parts of ``size`` bytes (the last one shorter),
        each made as it is taken: the snapshot is never held whole. Compacts the index at once;
        the index must not change until the last part is taken."""
        return in_parts(snapshot_buffers(self), size)

    @classmethod
    def from_bytes(cls, data: bytes, *, window: int, own_weight: int) -> BM25Index | None:
        """An index from ``to_bytes``' output; ``None`` if ``data`` is of another format."""
        return cls.from_parts([data], window=window, own_weight=own_weight)

    @classmethod
    def from_parts(cls, parts: Iterable[bytes], *, window: int, own_weight: int) -> BM25Index | None:
        """An index from ``to_bytes``' output given as consecutive parts (bytes-like, of any
        sizes); ``None`` if it is of another format. Each array is read straight into its
        place, so a load holds one part beyond the index it builds, never the whole snapshot.

        Raises ``ValueError`` when the parts end before the snapshot does.
        """
        return index_from_parts(cls, parts, window=window, own_weight=own_weight)
