"""BM25 scores of one user's context documents, and the queries of the index over them.

**Scoring**: BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", 2009) with Lucene's variant (Kamphuis et al., "Which BM25 Do You Mean?", ECIR
2020), as the ``bm25s`` library's ``method="lucene"`` computes it:
``idf = log(1 + (N - n + 0.5) / (n + 0.5))``, ``tfc = tf / (tf + k1 (1 - b + b dl / avgdl))``,
``score = sum over query tokens of idf * tfc``, k1 = 1.5, b = 0.75 (a query term counts once
per occurrence). Okapi's original idf is zero or negative for a term in half the documents
or more, which on a user's small corpus silences common but relevant words.

A query term's frequency in each context document is spread from the term's own postings
over the session links when the query runs (``memory.retrieval.bm25`` says what is stored).
"""

from __future__ import annotations

import math

import numpy as np

from memory.retrieval.keys import KNOWLEDGE, MESSAGE, DocKey

K1 = 1.5
B = 0.75


class BM25Scoring:
    """The queries of ``memory.retrieval.bm25.BM25Index``, a base class of it: BM25 scores,
    the search, and the named speaker. They read the index's arrays and change nothing but
    its context lengths (``_recompute_all``, after a load or a compaction)."""

    def _lengths(self) -> tuple[np.ndarray, int, float]:
        """``(context document lengths (n,) float64, N, mean length)`` as maintained."""
        mean = self._context_total / self.live if self.live else 1.0
        return self._context_length[: self.n], self.live, mean if mean > 0 else 1.0

    def _recompute_all(self) -> None:
        """Every row's context length at once (after a load or a compaction)."""
        n = self.n
        length = self.length[:n].astype(np.float64)
        total = np.where(self.kind[:n] == MESSAGE, self.own_weight, 1) * length
        for links in (self.prev[:n], self.next[:n]):
            rows, hop = np.arange(n), np.arange(n)  # the row credited, where its chain is
            for _ in range(self.window):
                neighbours = links[hop]
                keep = neighbours >= 0
                rows, hop = rows[keep], neighbours[keep]
                total[rows] += length[hop]
        total[~self.alive[:n]] = 0.0
        self._context_length = np.zeros(self._capacity)
        self._context_length[:n] = total
        self._context_total = float(total.sum())

    def _postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """The live rows holding ``term`` and its count in each: ``(rows int64, tf float64)``."""
        parts_rows, parts_tf = [], []
        if term < len(self._base_ptr) - 1:
            start, end = self._base_ptr[term], self._base_ptr[term + 1]
            parts_rows.append(self._base_rows[start:end])
            parts_tf.append(self._base_tf[start:end])
        if self._tail_n:
            match = self._tail_term[: self._tail_n] == term
            parts_rows.append(self._tail_row[: self._tail_n][match])
            parts_tf.append(self._tail_tf[: self._tail_n][match])
        rows = np.concatenate(parts_rows).astype(np.int64) if parts_rows else np.zeros(0, dtype=np.int64)
        tf = np.concatenate(parts_tf).astype(np.float64) if parts_tf else np.zeros(0)
        live = self.alive[rows]
        return rows[live], tf[live]

    def _context_frequencies(self, rows: np.ndarray, tf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A term's frequency in each context document it occurs in, from its own postings
        (``rows``, ``tf``): ``(documents, frequencies)``, documents distinct."""
        weight = np.where(self.kind[rows] == MESSAGE, self.own_weight, 1)
        documents, counts = [rows], [tf * weight]
        for links in (self.prev, self.next):
            hop, hop_tf = rows, tf
            for _ in range(self.window):
                neighbours = links[hop]
                keep = neighbours >= 0
                hop, hop_tf = neighbours[keep].astype(np.int64), hop_tf[keep]
                if not len(hop):
                    break
                documents.append(hop)
                counts.append(hop_tf)
        documents, counts = np.concatenate(documents), np.concatenate(counts)
        if len(documents) * 16 < self.n:  # few: sort them
            unique, inverse = np.unique(documents, return_inverse=True)
            return unique, np.bincount(inverse, weights=counts)
        dense = np.bincount(documents, weights=counts, minlength=self.n)
        unique = np.flatnonzero(dense)
        return unique, dense[unique]

    def scores(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score of every document matching ``tokens`` (the query's lexemes, repeated
        per occurrence): ``(rows (m,) int64, scores (m,) float64)``, scores > 0."""
        counts: dict[int, int] = {}
        for token in tokens:
            term = self.vocab.get(token)
            if term is not None:
                counts[term] = counts.get(term, 0) + 1
        if not counts or not self.live:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        lengths, live, mean = self._lengths()
        total = np.zeros(self.n)
        for term, occurrences in counts.items():
            rows, tf = self._postings(term)
            if not len(rows):
                continue
            documents, frequencies = self._context_frequencies(rows, tf)
            idf = math.log(1 + (live - len(documents) + 0.5) / (len(documents) + 0.5))
            norm = K1 * (1 - B + B * lengths[documents] / mean)
            total[documents] += occurrences * idf * frequencies / (frequencies + norm)
        matched = np.flatnonzero(total > 0)
        return matched, total[matched]

    def search(
        self,
        tokens: list[str],
        *,
        limit: int,
        sessions: set[int] | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[DocKey, float]]:
        """Top ``limit`` documents by BM25 score (> 0) as ``(key, score)``, best first.

        ``sessions``: session codes (``session_codes``); when given, only messages of those
        sessions (and knowledge). ``since_us`` / ``until_us``: only documents created in that
        window (microseconds since the epoch, both inclusive). Filters apply before the cut
        at ``limit``. Equal scores (to 1e-9) go in the order of (kind, session id, position):
        the same however the index was built.
        """
        rows, scores = self.scores(tokens)
        if sessions is not None and len(rows):
            allowed = np.isin(self.session[rows], np.fromiter(sessions, dtype=np.int32, count=len(sessions)))
            keep = allowed | (self.kind[rows] == KNOWLEDGE)
            rows, scores = rows[keep], scores[keep]
        if since_us is not None:
            keep = self.created[rows] >= since_us
            rows, scores = rows[keep], scores[keep]
        if until_us is not None:
            keep = self.created[rows] <= until_us
            rows, scores = rows[keep], scores[keep]
        if not len(rows):
            return []
        rounded = np.round(scores, 9)
        if len(rows) > limit:
            threshold = np.partition(rounded, len(rows) - limit)[len(rows) - limit]
            keep = rounded >= threshold
            rows, scores, rounded = rows[keep], scores[keep], rounded[keep]
        order = np.lexsort(
            (
                self._canonical_tiebreak(rows),
                self.position[rows],
                self._session_ranks()[self.session[rows] + 1],
                self.kind[rows],
                -rounded,
            )
        )[:limit]
        return list(zip(self.keys(rows[order]), scores[order].tolist()))

    def _session_ranks(self) -> np.ndarray:
        """Each session code's rank by session id (offset by one: index 0 is 'no session')."""
        if self._session_rank is None or len(self._session_rank) != len(self.session_ids) + 1:
            order = sorted(range(len(self.session_ids)), key=lambda code: self.session_ids[code])
            ranks = np.zeros(len(self.session_ids) + 1, dtype=np.int64)
            ranks[np.asarray(order, dtype=np.int64) + 1] = np.arange(1, len(order) + 1)
            self._session_rank = ranks
        return self._session_rank

    def _canonical_tiebreak(self, rows: np.ndarray) -> np.ndarray:
        """Last tie-break: the id's first 8 bytes (knowledge items have no position)."""
        return self.ids[rows, :8].copy().view(">u8").reshape(-1)

    def named_speaker(self, tokens: list[str]) -> int | None:
        """The speaker code of the only speaker the query names, else ``None``.

        A speaker is named when a lexeme of their name is among ``tokens``, the query's
        lexemes (so "Caroline's" names Caroline; a name of stop words only, such as "Will",
        is never named). None named, or several ("What did Anna tell Ben?", two Smiths):
        ``None``.
        """
        words = set(tokens)
        named = [code for code, lexemes in enumerate(self.speaker_lexemes) if lexemes & words]
        return named[0] if len(named) == 1 else None

    def spoken_by(self, keys: list[DocKey], speaker: int) -> list[bool]:
        """For each of ``keys``, whether the index holds it as a turn of ``speaker``."""
        rows = self.rows(keys)
        held = rows >= 0
        said = np.zeros(len(keys), dtype=bool)
        said[held] = self.speaker[rows[held]] == speaker
        return said.tolist()
