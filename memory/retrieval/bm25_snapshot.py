"""The snapshot format of ``memory.retrieval.bm25.BM25Index``: the index's arrays as one byte
stream (a magic number, a JSON header, the vocabulary, then each array's bytes), written and
read in parts so that neither side ever holds the whole stream.

The index's own layout (its arrays, ``BM25Index.ROW_ARRAYS``) is ``memory.retrieval.bm25``'s;
this module writes and reads it, and so reaches into the index's private arrays. A snapshot
of another ``FORMAT`` is not read (the index is rebuilt from the database).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np

FORMAT = 1
_MAGIC = b"MFBM"


class _PartReader:
    """A byte stream given as consecutive parts (bytes-like, of any sizes), read by copying
    each read straight into its destination: the stream is never held whole."""

    def __init__(self, parts: Iterable[bytes]) -> None:
        self._parts = iter(parts)
        self._part = memoryview(b"")

    def read_into(self, out: np.ndarray) -> None:
        """Fill the contiguous array ``out`` with the stream's next ``out.nbytes`` bytes.
        Raises ``ValueError`` when the stream ends first."""
        target = memoryview(out).cast("B")
        filled = 0
        while filled < len(target):
            if not self._part:
                part = next(self._parts, None)
                if part is None:
                    raise ValueError(f"the stream ended {len(target) - filled} bytes early")
                self._part = memoryview(part).cast("B")
            count = min(len(self._part), len(target) - filled)
            target[filled : filled + count] = self._part[:count]
            self._part = self._part[count:]
            filled += count

    def read(self, count: int) -> bytes:
        """The stream's next ``count`` bytes. Raises ``ValueError`` when it ends first."""
        out = np.empty(count, dtype=np.uint8)
        self.read_into(out)
        return out.tobytes()


def in_parts(buffers: list, size: int) -> Iterator[bytes]:
    """The concatenation of ``buffers`` (bytes-like) as consecutive parts of ``size`` bytes."""
    part = bytearray()
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while view:
            count = size - len(part)
            part += view[:count]
            view = view[count:]
            if len(part) == size:
                yield bytes(part)
                part.clear()
    if part:
        yield bytes(part)


def snapshot_buffers(index) -> list:
    """The snapshot's pieces in order: bytes, and views of the index's arrays."""
    if index._tail_n or index.live != index.n:
        index.compact()
    n = index.n
    header = {
        "format": FORMAT,
        "seq": index.seq,
        "rows": n,
        "postings": len(index._base_rows),
        "terms": len(index._base_ptr) - 1,
        "sessions": len(index.session_ids),
        "speakers": [[name, sorted(lexemes)] for name, lexemes in zip(index.speakers, index.speaker_lexemes)],
    }
    vocabulary = "\x00".join(index.vocab).encode()  # dict order is term order
    header["vocabulary_bytes"] = len(vocabulary)
    encoded = json.dumps(header).encode()
    # The arrays go in as views (their leading rows are contiguous), not copies.
    parts = [_MAGIC, len(encoded).to_bytes(4, "little"), encoded, vocabulary, index.ids[:n].data]
    parts += [getattr(index, name)[:n].data for name in index.ROW_ARRAYS]
    parts += [index._base_ptr.data, index._base_rows.data, index._base_tf.data]
    parts += [b"".join(index.session_ids), np.asarray(index._session_last, dtype=np.int32).data]
    return parts


def index_from_parts(cls, parts: Iterable[bytes], *, window: int, own_weight: int):
    """An index of class ``cls`` (``BM25Index``) from ``snapshot_buffers``' output given as
    consecutive parts (bytes-like, of any sizes); ``None`` if it is of another format. Each array is read straight into its
    place, so a load holds one part beyond the index it builds, never the whole snapshot.

    Raises ``ValueError`` when the parts end before the snapshot does.
    """
    reader = _PartReader(parts)
    try:
        if reader.read(4) != _MAGIC:
            return None
    except ValueError:  # shorter than the magic number: not a snapshot
        return None
    header = json.loads(reader.read(int.from_bytes(reader.read(4), "little")))
    if header.get("format") != FORMAT:
        return None

    def take(count: int, dtype) -> np.ndarray:
        array = np.empty(count, dtype=dtype)
        reader.read_into(array)
        return array

    vocabulary = reader.read(header["vocabulary_bytes"]).decode()
    n = header["rows"]
    index = cls(window=window, own_weight=own_weight, capacity=1)
    index.seq = header["seq"]
    terms = vocabulary.split("\x00") if vocabulary else []
    index.vocab = dict(zip(terms, range(len(terms))))
    index._vocab_bytes = sum(len(term) + 90 for term in terms)
    capacity = max(16, int(n * 1.25) + 16)
    index.ids = np.zeros((capacity, 16), dtype=np.uint8)
    reader.read_into(index.ids[:n])
    for name, (dtype, fill) in cls.ROW_ARRAYS.items():
        array = np.empty(capacity, dtype=dtype)
        reader.read_into(array[:n])
        array[n:] = fill
        setattr(index, name, array)
    index._capacity = capacity
    index.n = n
    index.live = int(index.alive[:n].sum())
    index._base_ptr = take(header["terms"] + 1, np.int64)
    index._base_rows = take(header["postings"], np.int32)
    index._base_tf = take(header["postings"], np.uint16)
    sessions = reader.read(header["sessions"] * 16)
    index.session_ids = [sessions[i : i + 16] for i in range(0, len(sessions), 16)]
    index._session_codes = {session: code for code, session in enumerate(index.session_ids)}
    index._session_last = take(header["sessions"], np.int32).tolist()
    for name, lexemes in header["speakers"]:
        index._speaker_code(name, frozenset(lexemes))
    index._index_ids()
    index._recompute_all()
    return index
