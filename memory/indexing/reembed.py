"""Changing the embedding model without downtime: ``python manage.py reembed --model PATH``.

The service keeps answering with the old model while the new one fills shadow columns;
one short transaction then swaps them in. Phases (``PHASES``), each resumable after a kill:

1. **prepare**: a ``building`` ``EmbeddingModel`` row (the run's progress, on the operator
   dashboard), and shadow columns of the new dimension: ``memory_message.embedding_next``,
   ``context_embedding_next`` (``STORAGE PLAIN``, as the served one), ``embedding_next_seq``,
   and ``memory_knowledge.embedding_next``, ``embedding_next_seq``. Added with ``ADD COLUMN``
   (no default: a catalogue change, no table rewrite).
2. **messages**, **knowledge**: every embedded row in batches, by primary key (a stable
   order; each batch its own commit). A row's ``embedding_next_seq`` records the ``seq`` (its
   change number) of the text that was embedded: a filled row whose ``seq`` still matches is
   skipped, so a resumed run redoes nothing finished, and an edit is seen. Pending messages
   are left out: their flush embeds them, with the new model once it is active.
3. **context**: the context embeddings of the new vectors, user by user, with the served
   formula (``memory.indexing.context.context_refresh_all`` on the shadow columns).
4. **indexes**: the ``ANN_BUCKETS`` partial HNSW indexes on ``context_embedding_next``,
   ``CREATE INDEX CONCURRENTLY`` (writes go on); an invalid one left by a kill is rebuilt.
5. **catch-up**: rows flushed, edited or added during the run are embedded (and their users'
   context embeddings recomputed, as are those of users with deletions since), without locks,
   pass after pass, until fewer than a batch remain.
6. **switch**, one transaction: the advisory lock every embedding write takes shared
   (``memory.embedding_guard.guard_write``), taken exclusively, and ``LOCK TABLE ... IN
   EXCLUSIVE MODE`` (writes wait, queries go on); the last rows are caught up (under a
   batch: a fraction of a second); then ``ACCESS EXCLUSIVE`` for the renames (instant):
   ``embedding`` becomes ``embedding_old`` and ``embedding_next`` ``embedding`` (so for the
   context column and the indexes), and the new row becomes ``active``. Serving processes
   follow within ``embedding_model.ACTIVE_MODEL_TTL_SECONDS``; a flush or knowledge write
   embedded by the old model meanwhile is refused and embedded again.
7. **drop** (``--drop-old``, or a later ``reembed --drop-old``; ``reembed_columns``): the ``*_old`` columns and
   their indexes.

Throughput: the run counts its texts per second of wall time against the model's own
(texts per second of its ``embed`` calls in this run, on the same texts), so the figure
shows what the database work costs on top of inference.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone
from pgvector import Vector

from memory import inference
from memory.embedding_guard import SWITCH_LOCK_KEY
from memory.embedding_model import forget_active_model
from memory.facts.reembed import facts_reembed
from memory.indexing.context import context_refresh_all
from memory.indexing.reembed_columns import HNSW_INDEX, reembed_drop_old, swap_columns
from memory.inference import registry
from memory.models import ANN_BUCKETS, EmbeddingModel
from memory.pgvector_binary import VectorArray, use_binary_vectors

logger = logging.getLogger(__name__)

PHASES = ("prepare", "messages", "knowledge", "context", "indexes", "catch-up", "switch", "done")


# Users per statement of the context phase.
CONTEXT_USERS_PER_STATEMENT = 200


class ReembedError(Exception):
    """A run cannot start or go on (another run's model is being built, a bad model path)."""


@dataclass
class RunStats:
    """What one invocation did: texts embedded per phase (``embedded``); of the fill phases
    (messages, knowledge), ``fill_texts`` in ``fill_seconds`` of wall time, of which
    ``model_seconds`` in the model's calls."""

    embedded: dict[str, int] = field(default_factory=dict)
    fill_texts: int = 0
    fill_seconds: float = 0.0
    model_seconds: float = 0.0
    switched: bool = False

    @property
    def texts_per_second(self) -> float | None:
        """The fill's throughput: texts per second of wall time."""
        return self.fill_texts / self.fill_seconds if self.fill_seconds else None

    @property
    def raw_texts_per_second(self) -> float | None:
        """The model's throughput on the same texts: texts per second of its calls."""
        return self.fill_texts / self.model_seconds if self.model_seconds else None


Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


class DocumentEmbedder:
    """The new model as the service embeds documents with it (``registry.documents_int8``:
    the int8 copy, text by text; else the full model in batches), in this process, timing
    its calls. ``embed(texts)`` returns ``(n, dim)`` float32 unit rows."""

    def __init__(self, path: Path) -> None:
        config = settings.MEMFUSE
        self.full = inference.Embedder(path, batch_size=config["EMBEDDING_BATCH_SIZE"], threads=config["TORCH_THREADS"])
        self.model = (
            inference.QueryEmbedder(self.full, keep_full_model=False) if registry.documents_int8() else self.full
        )
        self.dimension = self.full.dimension
        self.seconds = 0.0

    def embed(self, texts: list[str]):
        started = time.perf_counter()
        vectors = self.model.embed(texts)
        self.seconds += time.perf_counter() - started
        return vectors


# --- the run ------------------------------------------------------------------------------------


def reembed_run(
    *,
    model_path: Path,
    batch_size: int = 256,
    progress: Progress = _no_progress,
    stop_after_batches: int | None = None,
    drop_old: bool = False,
) -> RunStats:
    """Re-embed every message and knowledge item with the model at ``model_path`` and switch
    queries to it (module docstring). Resumes a run of the same model left unfinished.

    ``batch_size``: rows per fill statement. ``progress(phase, done, total)`` is called as
    rows are done. ``stop_after_batches``: return after that many fill batches (what a kill
    would leave behind; tests). ``drop_old``: drop the old columns after the switch.
    Raises ``ReembedError`` when another model's run is unfinished (``reembed_abort``) or
    the path holds no sentence-transformers model.
    """
    model_path = model_path.resolve()
    dimension = inference.model_dimension_from_config(model_path)
    if dimension is None:
        raise ReembedError(
            f"{model_path} holds no sentence-transformers model (modules.json and its modules' config.json)"
        )
    run = _prepare(model_path=model_path, dimension=dimension)
    progress("prepare", 1, 1)
    embedder = DocumentEmbedder(model_path)
    if embedder.dimension != dimension:
        raise ReembedError(f"{model_path} produces {embedder.dimension} dimensions, its config says {dimension}")
    stats = RunStats()
    batches = [0]

    def budget() -> bool:
        return stop_after_batches is None or batches[0] < stop_after_batches

    started = time.perf_counter()
    for kind in ("messages", "knowledge"):
        stats.embedded[kind] = _fill(
            run, kind=kind, embedder=embedder, batch_size=batch_size, progress=progress, batches=batches, budget=budget
        )
        if not budget():
            _record_throughput(run, stats, embedder, started)
            return stats
    _record_throughput(run, stats, embedder, started)
    _context(run, progress=progress)
    _indexes(run, progress=progress)
    stats.embedded["catch-up"] = _catch_up(run, embedder=embedder, batch_size=batch_size, progress=progress)
    _switch(run, embedder=embedder, batch_size=batch_size, progress=progress)
    stats.switched = True
    # The facts layer's vectors follow, with this run's model and no LLM call.
    stats.embedded["facts"] = facts_reembed(embed=embedder.embed, generation=run.id, batch_size=batch_size)
    if drop_old:
        reembed_drop_old()
    _set_phase(run, "done", 1, 1)
    progress("done", 1, 1)
    return stats


def _record_throughput(run: EmbeddingModel, stats: RunStats, embedder: DocumentEmbedder, started: float) -> None:
    stats.fill_seconds = time.perf_counter() - started
    stats.model_seconds = embedder.seconds
    stats.fill_texts = sum(stats.embedded.values())
    if stats.fill_texts:
        EmbeddingModel.objects.filter(pk=run.pk).update(
            texts_per_second=stats.texts_per_second, raw_texts_per_second=stats.raw_texts_per_second
        )


def _prepare(*, model_path: Path, dimension: int) -> EmbeddingModel:
    run = EmbeddingModel.objects.filter(state=EmbeddingModel.State.BUILDING).first()
    if run is not None and (Path(run.path) != model_path or run.dimension != dimension):
        raise ReembedError(
            f"a reembed to {run.path} ({run.dimension} dims) is unfinished: run it again with --model {run.path}, "
            "or drop it with python manage.py reembed --abort"
        )
    if run is None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT last_value FROM memory_change_seq")
            start_seq = cursor.fetchone()[0]
        run = EmbeddingModel.objects.create(
            name=inference.model_name(model_path),
            path=str(model_path),
            dimension=dimension,
            phase="prepare",
            start_seq=start_seq,
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'memory_message'::regclass "
            "AND attname = 'context_embedding_next' AND NOT attisdropped"
        )
        if cursor.fetchone()[0]:  # a resumed run: no table lock needed
            return run
        # An ADD COLUMN without a default only changes the catalogue, but it needs the
        # table's lock for an instant: behind a long query it would hold up every other.
        cursor.execute("SET lock_timeout = '5s'")
        try:
            # The message table last: its context column's presence marks the step as done.
            for table, columns in (
                ("memory_knowledge", ("embedding_next",)),
                ("memory_message", ("embedding_next", "context_embedding_next")),
            ):
                cursor.execute(
                    f"ALTER TABLE {table} "
                    + ", ".join(f"ADD COLUMN IF NOT EXISTS {column} vector({int(dimension)})" for column in columns)
                    + ", ADD COLUMN IF NOT EXISTS embedding_next_seq bigint"
                )
            cursor.execute("ALTER TABLE memory_message ALTER COLUMN context_embedding_next SET STORAGE PLAIN")
        finally:
            cursor.execute("RESET lock_timeout")
    return run


def _set_phase(run: EmbeddingModel, phase: str, done: int, total: int) -> None:
    EmbeddingModel.objects.filter(pk=run.pk).update(phase=phase, done=done, total=total, updated_at=timezone.now())


# Rows whose shadow embedding is missing or of an older text. A message is embedded once it
# is flushed; pending ones are the flush's.
_STALE = {
    "messages": "flushed_at IS NOT NULL AND embedding IS NOT NULL AND embedding_next_seq IS DISTINCT FROM seq",
    "knowledge": "embedding IS NOT NULL AND embedding_next_seq IS DISTINCT FROM seq",
}
_TABLE = {"messages": "memory_message", "knowledge": "memory_knowledge"}


def _fill(
    run: EmbeddingModel,
    *,
    kind: str,
    embedder: DocumentEmbedder,
    batch_size: int,
    progress: Progress,
    batches: list[int],
    budget,
) -> int:
    """Embed the stale rows of ``kind`` in primary-key order; returns how many."""
    table, stale = _TABLE[kind], _STALE[kind]
    text = "index_text" if kind == "messages" else "content"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} WHERE {stale}")
        total = cursor.fetchone()[0]
    _set_phase(run, kind, 0, total)
    done, after = 0, uuid.UUID(int=0)
    while budget():
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, {text}, seq FROM {table} WHERE id > %s AND {stale} ORDER BY id LIMIT %s",
                [after, batch_size],
            )
            rows = cursor.fetchall()
        if not rows:
            break
        after = rows[-1][0]
        done += _write_batch(table, rows, embedder)
        batches[0] += 1
        _set_phase(run, kind, done, total)
        progress(kind, done, total)
    return done


def _write_batch(table: str, rows: list[tuple], embedder: DocumentEmbedder) -> int:
    """Write the shadow embeddings of ``rows`` (``[(id, text, seq)]``) where the text is
    still the one embedded (same ``seq``); returns the rows written."""
    vectors = embedder.embed([row[1] for row in rows])
    with connection.cursor() as cursor:
        use_binary_vectors(cursor)
        cursor.execute(
            f"""
            UPDATE {table} AS t SET embedding_next = v.embedding, embedding_next_seq = v.seq
            FROM unnest(%(ids)s::uuid[], %(vectors)s::vector[], %(seqs)s::bigint[]) AS v(id, embedding, seq)
            WHERE t.id = v.id AND t.seq = v.seq
            """,
            {"ids": [row[0] for row in rows], "vectors": VectorArray(Vector(vector) for vector in vectors), "seqs": [row[2] for row in rows]},
        )
        return cursor.rowcount


_SHADOW = ("embedding_next", "context_embedding_next")


def _context(run: EmbeddingModel, *, progress: Progress) -> None:
    """Context embeddings of the shadow column for every user with a row that lacks one."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT user_id FROM memory_message WHERE embedding_next IS NOT NULL AND context_embedding_next IS NULL"
        )
        users = [row[0] for row in cursor.fetchall()]
    _set_phase(run, "context", 0, len(users))
    for start in range(0, len(users), CONTEXT_USERS_PER_STATEMENT):
        chunk = users[start : start + CONTEXT_USERS_PER_STATEMENT]
        with connection.cursor() as cursor:
            context_refresh_all(cursor, user_ids=chunk, columns=_SHADOW)
        done = start + len(chunk)
        _set_phase(run, "context", done, len(users))
        progress("context", done, len(users))


def _indexes(run: EmbeddingModel, *, progress: Progress) -> None:
    """The partial HNSW indexes of the shadow context column, built concurrently."""
    _set_phase(run, "indexes", 0, ANN_BUCKETS)
    for bucket in range(ANN_BUCKETS):
        name = HNSW_INDEX.format(bucket=bucket) + "_next"
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE c.relname = %s",
                [name],
            )
            row = cursor.fetchone()
            if row is not None and not row[0]:  # a build a kill interrupted
                cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            if row is None or not row[0]:
                # Options as memory.models.Message.Meta.indexes.
                cursor.execute(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON memory_message "
                    f"USING hnsw (context_embedding_next vector_ip_ops) WITH (m = 16, ef_construction = 64) "
                    f"WHERE ann_bucket = {bucket} AND NOT ann_duplicate"
                )
        _set_phase(run, "indexes", bucket + 1, ANN_BUCKETS)
        progress("indexes", bucket + 1, ANN_BUCKETS)


def _catch_up_once(
    embedder: DocumentEmbedder, *, batch_size: int, since_seq: int, limit: int | None = None
) -> tuple[int, int]:
    """One pass over what changed since the fill: stale rows embedded (at most ``limit``
    messages and as many knowledge items, when given), shadow vectors of un-embedded rows
    (edited, pending) cleared, and the context embeddings of every user touched (or with a
    deletion numbered after ``since_seq``) recomputed. Returns ``(rows embedded, stale rows
    left)``."""
    embedded, users = 0, set()
    for kind, table in _TABLE.items():
        text = "index_text" if kind == "messages" else "content"
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, {text}, seq{', user_id' if kind == 'messages' else ''} FROM {table} WHERE {_STALE[kind]} "
                f"ORDER BY id{' LIMIT %s' if limit is not None else ''}",
                [limit] if limit is not None else [],
            )
            rows = cursor.fetchall()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            embedded += _write_batch(table, [row[:3] for row in chunk], embedder)
        if kind == "messages":
            users.update(row[3] for row in rows)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE memory_message SET embedding_next = NULL, context_embedding_next = NULL, embedding_next_seq = NULL "
            "WHERE embedding IS NULL AND embedding_next_seq IS NOT NULL RETURNING user_id"
        )
        users.update(row[0] for row in cursor.fetchall())
        cursor.execute(
            "UPDATE memory_knowledge SET embedding_next = NULL, embedding_next_seq = NULL WHERE embedding IS NULL AND embedding_next_seq IS NOT NULL"
        )
        cursor.execute("SELECT DISTINCT user_id FROM memory_tombstone WHERE kind = 'message' AND seq > %s", [since_seq])
        users.update(row[0] for row in cursor.fetchall())
        if users:
            context_refresh_all(cursor, user_ids=sorted(users), columns=_SHADOW)
        left = 0
        for kind, table in _TABLE.items():
            cursor.execute(f"SELECT count(*) FROM {table} WHERE {_STALE[kind]}")
            left += cursor.fetchone()[0]
    return embedded, left


def _change_watermark() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT last_value FROM memory_change_seq")
        return cursor.fetchone()[0]


def _catch_up(run: EmbeddingModel, *, embedder: DocumentEmbedder, batch_size: int, progress: Progress) -> int:
    """Catch-up passes without locks until fewer than ``batch_size`` stale rows remain."""
    total = 0
    since = run.start_seq
    while True:
        mark = _change_watermark()
        embedded, left = _catch_up_once(embedder, batch_size=batch_size, since_seq=since)
        since = mark
        total += embedded
        EmbeddingModel.objects.filter(pk=run.pk).update(
            phase="catch-up", done=total, total=total + left, start_seq=since
        )
        progress("catch-up", total, total + left)
        if left < batch_size:
            return total


def _switch(
    run: EmbeddingModel, *, embedder: DocumentEmbedder, batch_size: int, progress: Progress, attempts: int = 5
) -> None:
    """Catch up the last rows under the locks and swap the columns in (module docstring).
    Retried when a lock is not granted within its timeout."""
    _set_phase(run, "switch", 0, 1)
    for attempt in range(1, attempts + 1):
        run.refresh_from_db()
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '5s'")
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SWITCH_LOCK_KEY])
                cursor.execute("LOCK TABLE memory_message, memory_knowledge IN EXCLUSIVE MODE")
                _, left = _catch_up_once(embedder, batch_size=batch_size, since_seq=run.start_seq)
                if left:
                    raise ReembedError(f"{left} rows still lack the new model's embedding after the catch-up")
                cursor.execute("LOCK TABLE memory_message, memory_knowledge IN ACCESS EXCLUSIVE MODE")
                swap_columns(cursor)
                EmbeddingModel.objects.filter(state=EmbeddingModel.State.ACTIVE).update(
                    state=EmbeddingModel.State.RETIRED
                )
                EmbeddingModel.objects.filter(pk=run.pk).update(
                    state=EmbeddingModel.State.ACTIVE, phase="switch", done=1, total=1, activated_at=timezone.now()
                )
            break
        except OperationalError as exc:  # lock_timeout: a long transaction held a table
            if attempt == attempts:
                raise
            logger.warning("reembed switch: %s; trying again", exc)
            time.sleep(1.0)
    forget_active_model()
    progress("switch", 1, 1)
