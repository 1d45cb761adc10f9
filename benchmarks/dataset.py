"""Bulk-loaded datasets of flushed messages: the query benchmark's LoCoMo users, and ``bulk_load``.

``memfuse_bench query`` needs 1,000 users with 200 flushed messages each. Adding them through
the API would embed 200,000 texts, most of them repeats; instead each distinct turn of
the LoCoMo file is embedded once with the registry's model and the rows are written straight
into this process's database with COPY: users, one agent, sessions, and messages that look
exactly like messages a flush has written (``index_text``, ``embedding``, ``flushed_at``,
``flush_count = 1``, positions from 0 per session; PostgreSQL generates ``search_vector``).
The chat benchmark's dataset (``benchmarks.chat_dataset``), the portability benchmark and the
export tests' large user (``notes_user``) are written by the same ``bulk_load``.

User ``i`` holds a contiguous slice of one conversation (conversation ``i % C``, starting at a
user-dependent offset), so it has real questions with answers in its own messages. A dataset
is keyed by a tag (user names ``bench-query-<tag>-<i>``, agent ``bench-query-<tag>``, whose
metadata records the shape it was built with) and reused while the shape matches.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from memory.indexing import ann, context, snapshots
from memory.models import Agent, Tenant, User
from memory.portability.locomo import DIA_ID_KEY, conversation_sessions
from memory.services.messages import message_index_text

DATASET_FORMAT = 2  # bump when the rows written change, so old datasets are rebuilt
SLICE_STRIDE = 7  # turns between the starts of two users holding the same conversation
EMBED_CHUNK = 256  # texts per model call while building


@dataclass(frozen=True)
class Turn:
    """One LoCoMo turn as a message: its session number and date, speaker role and text."""

    session: int
    date: datetime | None
    dia_id: str
    role: str
    content: str
    metadata: dict
    index_text: str


@dataclass(frozen=True)
class Conversation:
    """One LoCoMo sample: its turns in order and its questions ``(question, evidence dia_ids)``."""

    sample_id: str
    turns: list[Turn]
    questions: list[tuple[str, frozenset[str]]]


def load_conversations(path: Path) -> list[Conversation]:
    """The conversations of a LoCoMo file, turns as ``locomo_eval`` stores them.

    Questions of category 5 (adversarial: no answer in the conversation) are left out.
    Raises ``OSError``/``ValueError``/``KeyError`` when the file is unreadable or misshapen.
    """
    data = json.loads(path.read_text())
    conversations = []
    for index, item in enumerate(data):
        conversation = item["conversation"]
        speaker_a = conversation.get("speaker_a")
        turns = []
        for number, date, session_turns in conversation_sessions(conversation):
            for turn in session_turns:
                text = turn.get("text")
                if not isinstance(text, str) or not text.strip():
                    continue
                metadata = {"speaker": turn.get("speaker", ""), DIA_ID_KEY: turn.get("dia_id")}
                if turn.get("blip_caption"):
                    metadata["image_caption"] = turn["blip_caption"]
                turns.append(
                    Turn(
                        session=number,
                        date=date,
                        dia_id=str(turn.get("dia_id")),
                        role="user" if turn.get("speaker") == speaker_a else "assistant",
                        content=text,
                        metadata=metadata,
                        index_text=message_index_text(content=text, metadata=metadata),
                    )
                )
        known = {turn.dia_id for turn in turns}
        questions = []
        for qa in item.get("qa", []):
            if qa.get("category") == 5 or not isinstance(qa.get("question"), str):
                continue
            # Evidence naming no turn of the conversation is dropped, as locomo_eval does.
            evidence = frozenset(e.strip() for entry in qa.get("evidence", []) for e in str(entry).split(";")) & known
            if evidence:
                questions.append((qa["question"], evidence))
        if turns:
            conversations.append(Conversation(item.get("sample_id", f"conv-{index}"), turns, questions))
    return conversations


def user_slice(user_index: int, *, turn_counts: list[int], per_user: int) -> tuple[int, int]:
    """``(conversation index, first turn)`` of user ``user_index``'s contiguous slice.

    Users take the conversations in turn; the k-th user of a conversation starts
    ``k * SLICE_STRIDE`` turns later, wrapping within the turns that leave room for a whole
    slice. Raises ``ValueError`` when a conversation has fewer than ``per_user`` turns.
    """
    conversation = user_index % len(turn_counts)
    room = turn_counts[conversation] - per_user + 1
    if room < 1:
        raise ValueError(f"conversation {conversation} has {turn_counts[conversation]} turns, fewer than {per_user}")
    return conversation, (user_index // len(turn_counts)) * SLICE_STRIDE % room


def answerable_questions(conversation: Conversation, turns: list[Turn]) -> list[str]:
    """The conversation's questions whose evidence turns are all among ``turns``."""
    held = {turn.dia_id for turn in turns}
    return [question for question, evidence in conversation.questions if evidence and evidence <= held]


@dataclass(frozen=True)
class DatasetUser:
    """A user of the dataset: its index, id, conversation, and query texts (questions, else turns)."""

    index: int
    user_id: uuid.UUID
    session_id: uuid.UUID
    conversation: int
    queries: list[str]
    questions: int  # how many of ``queries`` are LoCoMo questions (the rest are turns)


class QueryDataset:
    """Users ``bench-query-<tag>-<i>`` with ``per_user`` messages each, built or reused."""

    def __init__(self, *, tag: str, users: int, per_user: int, path: Path) -> None:
        self.tag = tag
        self.count = users
        self.per_user = per_user
        self.path = path
        self.conversations = load_conversations(path)
        if not self.conversations:
            raise ValueError(f"{path}: no conversation with turns")
        self.turn_counts = [len(c.turns) for c in self.conversations]
        if per_user > min(self.turn_counts):
            raise ValueError(f"--messages-per-user {per_user} exceeds the shortest conversation ({min(self.turn_counts)} turns)")

    @property
    def agent_name(self) -> str:
        return f"bench-query-{self.tag}"

    @property
    def tenant_name(self) -> str:
        return f"bench-query-{self.tag}"

    def tenant(self) -> Tenant | None:
        """The tenant that owns the dataset's users and agent (``None`` before it is built)."""
        return Tenant.objects.filter(name=self.tenant_name).first()

    def user_name(self, index: int) -> str:
        return f"bench-query-{self.tag}-{index:05d}"

    def shape(self) -> dict:
        return {"format": DATASET_FORMAT, "users": self.count, "messages_per_user": self.per_user, "data": str(self.path)}

    def turns_of(self, index: int) -> tuple[Conversation, list[Turn]]:
        conversation, start = user_slice(index, turn_counts=self.turn_counts, per_user=self.per_user)
        held = self.conversations[conversation]
        return held, held.turns[start : start + self.per_user]

    def ensure(self, *, rebuild: bool = False, log=print) -> dict:
        """Build the dataset unless one of the same shape exists (``rebuild``: always build).

        Returns ``{"reused": bool, "seconds", "distinct_texts", "embed_seconds", "insert_seconds"}``
        (the last three only when built).
        """
        agent = Agent.objects.filter(tenant__name=self.tenant_name, name=self.agent_name).first()
        if agent is not None and not rebuild and agent.metadata.get("bench_dataset") == self.shape():
            if User.objects.filter(tenant=agent.tenant_id, name__startswith=self.agent_name + "-").count() == self.count:
                return {"reused": True}
        started = time.perf_counter()
        self.drop()
        log(f"building {self.count} users x {self.per_user} messages ...")
        built = self._build()
        return {"reused": False, "seconds": round(time.perf_counter() - started, 1), **built}

    def drop(self) -> int:
        """Delete the dataset's tenant with everything it holds; how many users were deleted."""
        return tenant_drop(self.tenant_name)

    def users(self) -> list[DatasetUser]:
        """The dataset's users in index order, with their query texts (the dataset must exist)."""
        ids = dict(User.objects.filter(tenant__name=self.tenant_name).values_list("name", "id"))
        first_sessions = {}
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT ON (s.user_id) s.user_id, s.id FROM memory_session s "
                "JOIN memory_user u ON u.id = s.user_id JOIN memory_tenant t ON t.id = u.tenant_id "
                "WHERE t.name = %s ORDER BY s.user_id, s.created_at, s.name",
                [self.tenant_name],
            )
            first_sessions = dict(cursor.fetchall())
        result = []
        for index in range(self.count):
            user_id = ids[self.user_name(index)]
            conversation, turns = self.turns_of(index)
            questions = answerable_questions(conversation, turns)
            queries = questions or [turn.content for turn in turns]
            result.append(
                DatasetUser(
                    index=index,
                    user_id=user_id,
                    session_id=first_sessions[user_id],
                    conversation=index % len(self.conversations),
                    queries=queries,
                    questions=len(questions),
                )
            )
        return result

    def _build(self) -> dict:
        held = [self.turns_of(index) for index in range(self.count)]
        users = [
            (self.user_name(index), {"bench_dataset": self.tag, "conversation": conversation.sample_id}, turns)
            for index, (conversation, turns) in enumerate(held)
        ]
        built = bulk_load(
            tenant_name=self.tenant_name, agent_name=self.agent_name, agent_metadata={"bench_dataset": self.shape()}, users=users
        )
        del built["user_ids"]
        return built


def embed_texts(texts: list[str]) -> np.ndarray:
    """``(len(texts), dim)`` embeddings as a flush writes them (``registry.local_document_embedder``)."""
    from memory.inference import registry

    # The model itself, in this thread: the registry's batcher thread runs at a lowered
    # priority (it yields to requests), which a build that waits for it does not want.
    embedder = registry.local_document_embedder()
    if not texts:
        return embedder.embed([])
    if not registry.documents_int8():
        import torch

        # Batched inference at its best (this process's model may have been loaded with the
        # serving processes' QUERY_TORCH_THREADS).
        torch.set_num_threads(settings.MEMFUSE["TORCH_THREADS"])
    return np.concatenate([embedder.embed(texts[i : i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)])


def bulk_load(*, tenant_name: str, agent_name: str, agent_metadata: dict, users: list[tuple[str, dict, list[Turn]]], log=None) -> dict:
    """Write ``users`` (``(name, metadata, turns)``) of tenant ``tenant_name`` (created if
    missing) with a new agent ``agent_name``, as the service would hold them once flushed:
    messages with their embeddings (each distinct text embedded once), positions from 0 per
    session (a turn's ``session`` number), context embeddings, index snapshots, and the HNSW
    indexes for users past ``ANN_MIN_MESSAGES``.

    COPY in one transaction, then what flushes derive. The HNSW indexes users join are rebuilt
    in one pass each (CREATE INDEX, much faster than row-by-row inserts). Returns
    ``{"distinct_texts", "embed_seconds", "insert_seconds", "derive_seconds", "user_ids"}``.
    """
    log = log or (lambda message: None)
    texts = sorted({turn.index_text for _, _, turns in users for turn in turns})
    started = time.perf_counter()
    vectors = embed_texts(texts)
    embed_seconds = time.perf_counter() - started

    started = time.perf_counter()
    now = timezone.now()
    user_rows, sessions, messages = _rows(users, {text: key for key, text in enumerate(texts)})
    log(f"writing {len(user_rows)} users, {len(messages)} messages")
    _copy(
        tenant_name=tenant_name, agent_name=agent_name, agent_metadata=agent_metadata, now=now,
        user_rows=user_rows, sessions=sessions, messages=messages, vectors=vectors,
    )  # fmt: skip
    insert_seconds = time.perf_counter() - started
    started = time.perf_counter()
    user_ids = [user_id for user_id, _, _ in user_rows]
    large = [user_id for user_id, (_, _, turns) in zip(user_ids, users) if len(turns) >= settings.MEMFUSE["ANN_MIN_MESSAGES"]]
    _derive(user_ids, large, log=log)
    return {
        "distinct_texts": len(texts),
        "embed_seconds": round(embed_seconds, 1),
        "insert_seconds": round(insert_seconds, 1),
        "derive_seconds": round(time.perf_counter() - started, 1),
        "user_ids": user_ids,
    }


def _rows(users: list[tuple[str, dict, list[Turn]]], text_key: dict[str, int]) -> tuple[list, list, list]:
    """``(user rows, session rows, message rows)`` with new ids; a message row carries its
    text's key into the embeddings (``text_key``) and its time (the turn's date, else
    2000-01-01, plus its position in seconds)."""
    user_rows, sessions, messages = [], [], []
    for name, metadata, turns in users:
        user_id = uuid.uuid4()
        user_rows.append((user_id, name, json.dumps(metadata)))
        session_ids: dict[int, uuid.UUID] = {}
        positions: dict[int, int] = {}
        for turn in turns:
            if turn.session not in session_ids:
                session_ids[turn.session] = uuid.uuid4()
                positions[turn.session] = 0
            position = positions[turn.session]
            positions[turn.session] += 1
            base = turn.date or datetime(2000, 1, 1, tzinfo=UTC)
            messages.append(
                (
                    uuid.uuid4(), session_ids[turn.session], user_id, position, turn.role, turn.content,
                    json.dumps(turn.metadata), turn.index_text, base + timedelta(seconds=position),
                    text_key[turn.index_text],
                )
            )
        # next_position: where an add to the session would continue.
        sessions.extend((session_ids[n], f"session_{n}", user_id, positions[n]) for n in session_ids)
    return user_rows, sessions, messages


def _copy(*, tenant_name, agent_name, agent_metadata, now, user_rows, sessions, messages, vectors) -> None:
    """The agent, users, sessions and messages (with their embeddings) in one transaction, by COPY."""
    agent_id = uuid.uuid4()
    with transaction.atomic(), connection.cursor() as cursor:
        tenant = Tenant.objects.filter(name=tenant_name).first() or Tenant.objects.create(name=tenant_name)
        cursor.execute(
            "INSERT INTO memory_agent (id, tenant_id, name, description, metadata, created_at, updated_at) "
            "VALUES (%s, %s, %s, '', %s, %s, %s)",
            [agent_id, tenant.pk, agent_name, json.dumps(agent_metadata), now, now],
        )
        raw = cursor.cursor  # psycopg's cursor: COPY
        columns = "id, name, description, metadata, created_at, updated_at"
        with raw.copy(f"COPY memory_user ({columns}, memory_version, tenant_id) FROM STDIN") as copy:
            for user_id, name, metadata in user_rows:
                copy.write_row((user_id, name, "", metadata, now, now, 1, tenant.pk))
        with raw.copy(f"COPY memory_session ({columns}, agent_id, user_id, next_position) FROM STDIN") as copy:
            for session_id, name, user_id, next_position in sessions:
                copy.write_row((session_id, name, "", "{}", now, now, agent_id, user_id, next_position))
        # Embeddings once per distinct text, then joined in: every vector as text over the
        # socket would be most of the build.
        cursor.execute("CREATE TEMP TABLE bench_embedding (key integer PRIMARY KEY, embedding vector) ON COMMIT DROP")
        with raw.copy("COPY bench_embedding (key, embedding) FROM STDIN") as copy:
            for key, vector_row in enumerate(vectors):
                copy.write_row((key, "[" + ",".join(f"{x:.9g}" for x in vector_row) + "]"))
        cursor.execute(
            "CREATE TEMP TABLE bench_message (id uuid, session_id uuid, user_id uuid, position integer, role text, "
            "content text, metadata jsonb, index_text text, created_at timestamptz, key integer) ON COMMIT DROP"
        )
        with raw.copy("COPY bench_message FROM STDIN") as copy:
            for row in messages:
                copy.write_row(row)
        # In each user's order (session, position): change numbers as adds would give them.
        cursor.execute(
            """
            INSERT INTO memory_message (id, session_id, user_id, position, role, content, metadata, index_text,
                                        embedding, flushed_at, flush_count, created_at, updated_at)
            SELECT m.id, m.session_id, m.user_id, m.position, m.role, m.content, m.metadata, m.index_text,
                   e.embedding, %(now)s, 1, m.created_at, %(now)s
            FROM bench_message m JOIN bench_embedding e USING (key)
            ORDER BY m.user_id, m.created_at, m.position
            """,
            {"now": now},
        )


def _derive(user_ids: list[uuid.UUID], large: list[uuid.UUID], *, log) -> None:
    """What flushes derive: context embeddings, index snapshots, and HNSW buckets for ``large``."""
    from memory.retrieval import store

    log("context embeddings")
    with connection.cursor() as cursor:
        context.context_refresh_all(cursor, user_ids=user_ids)
        cursor.execute("ANALYZE memory_message")
    log("index snapshots")
    for user_id in user_ids:
        snapshots.snapshot_save(store.load(user_id), user_id)
    if large:
        log(f"HNSW index with {len(large)} more users")
        ann_rebuild(large)


def ann_rebuild(user_ids: list[uuid.UUID]) -> None:
    """Give ``user_ids`` HNSW buckets (the least shared, as ``ann.ann_enable`` does), place
    their rows as ``ann.ann_place`` does (copies of a context embedding as copies), and
    rebuild those buckets' indexes in one pass each (CREATE INDEX, the model's definition),
    instead of inserting every row one by one."""
    from memory.models import ANN_BUCKETS, Message

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT b FROM generate_series(0, %s - 1) b ORDER BY (SELECT count(*) FROM memory_user WHERE ann_bucket = b), b",
            [ANN_BUCKETS],
        )
        order = [row[0] for row in cursor.fetchall()]
        buckets = {user_id: order[i % len(order)] for i, user_id in enumerate(user_ids)}
        for user_id, bucket in buckets.items():
            cursor.execute("UPDATE memory_user SET ann_bucket = %s WHERE id = %s", [bucket, user_id])
        cursor.execute("SET maintenance_work_mem = '2GB'")
        for bucket in sorted(set(buckets.values())):
            index = next(i for i in Message._meta.indexes if i.name == f"memory_message_context_hnsw_{bucket}")
            cursor.execute(f'DROP INDEX IF EXISTS "{index.name}"')
            for user_id in [user_id for user_id, b in buckets.items() if b == bucket]:
                ann.ann_place(cursor, user_id=user_id, bucket=bucket)
            with connection.schema_editor() as editor:
                editor.add_index(Message, index)
        cursor.execute("RESET maintenance_work_mem")
        cursor.execute("ANALYZE memory_message")


def tenant_drop(name: str) -> int:
    """Delete tenant ``name`` with its users, agents, sessions and messages, in one
    transaction; returns how many users were deleted (0 when there is no such tenant).

    Users and agents go before the tenant so that the cascades run in that order.
    """
    users = User.objects.filter(tenant__name=name)
    count = users.count()
    with transaction.atomic():
        users.delete()
        Agent.objects.filter(tenant__name=name).delete()
        Tenant.objects.filter(name=name).delete()
    return count


def note_turns(count: int, *, distinct: int, per_session: int = 500) -> list[Turn]:
    """``count`` short user notes (``distinct`` different texts, cycled), ``per_session`` to a
    session: a large user's history whose content does not matter, only its size."""
    texts = [f"note {i}: the weather in city {i % 37} was {['sunny', 'rainy', 'windy'][i % 3]}" for i in range(distinct)]
    return [
        Turn(
            session=i // per_session,
            date=None,
            dia_id=f"D{i}",
            role="user",
            content=texts[i % distinct],
            metadata={},
            index_text=texts[i % distinct],
        )
        for i in range(count)
    ]


def notes_user(*, tenant_name: str, agent_name: str, user_name: str, messages: int, distinct: int) -> User:
    """A user ``user_name`` of ``messages`` flushed notes (``note_turns``), bulk-loaded into
    tenant ``tenant_name`` (created if missing) with a new agent ``agent_name``."""
    loaded = bulk_load(
        tenant_name=tenant_name,
        agent_name=agent_name,
        agent_metadata={},
        users=[(user_name, {}, note_turns(messages, distinct=distinct))],
    )
    return User.objects.get(pk=loaded["user_ids"][0])


def tenant_delete(tenant: Tenant) -> None:
    """Delete ``tenant`` and everything in it while a server may be flushing its users: each
    user first through ``user_delete``, which takes the user's lock before the rows',
    the order a running flush takes them in (a cascade from the tenant does not)."""
    from memory.services.users import user_delete

    for user in User.objects.filter(tenant=tenant):
        user_delete(user=user)
    tenant.delete()
