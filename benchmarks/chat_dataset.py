"""The chat benchmark's database: users of every history length, bulk-loaded, in one tenant.

- ``history``: one user per size of the curve (200 ... 100,000 messages), whose turns are the
  LoCoMo file's conversations in order, again and again (each pass in sessions of its own,
  dated a year later), so context windows are those of real conversations;
- ``cold``: users of ``cold_size`` (10,000) messages the same way (the cold-user phase at that size);
- ``distinct``: one user whose every text is distinct (two LoCoMo turns joined, embedded for
  it), for the approximate search's recall on texts that do not repeat;
- ``many``: ``many_users`` users of ``user_size`` (200) messages, contiguous slices of the conversations
  (``benchmarks.dataset.user_slice``): the many-users phase and the cold phase
  at 200 messages.

Everything is written as the service holds flushed messages (``benchmarks.dataset.bulk_load``).
The tenant's agent metadata records the shape; a dataset of the same shape is reused, after
what earlier runs added to it is deleted (``trim``), so that each user holds its size again.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.dataset import (
    Conversation,
    Turn,
    answerable_questions,
    bulk_load,
    load_conversations,
    tenant_drop,
    user_slice,
)
from memory.models import Agent, Tenant

FORMAT = 1  # bump when what is written changes


@dataclass(frozen=True)
class ChatUser:
    """A user of the dataset: group, size, id, first session, and query texts."""

    group: str
    size: int
    user_id: uuid.UUID
    session_id: uuid.UUID
    queries: list[str]


def vacuum() -> None:
    """``VACUUM (ANALYZE)`` the tables a build wrote: the context embeddings' pass rewrites
    every message row, and the phases would otherwise run beside autovacuum's pass over
    millions of dead rows (or, before it, on a heap without its visibility map: no
    index-only scan)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) memory_message, memory_session, memory_user, memory_indexsnapshot, memory_indexsnapshotpart")


def cycled_turns(conversations: list[Conversation], count: int) -> list[Turn]:
    """``count`` turns: every conversation's turns in order, repeated; each pass and each
    conversation in sessions of their own (session numbers stay distinct), later passes dated
    a year after the one before."""
    turns: list[Turn] = []
    cycle = 0
    while len(turns) < count:
        for number, conversation in enumerate(conversations):
            for turn in conversation.turns:
                if len(turns) == count:
                    return turns
                date = (turn.date or datetime(2000, 1, 1, tzinfo=UTC)) + timedelta(days=400 * cycle)
                turns.append(replace(turn, session=(cycle * 100 + number) * 1000 + turn.session, date=date))
        cycle += 1
    return turns


def distinct_turns(conversations: list[Conversation], count: int, *, seed: int = 0) -> list[Turn]:
    """``count`` turns whose texts are all distinct: each joins a turn (in conversation order)
    with a random other turn's text, so nothing repeats as it does in ``cycled_turns``."""
    rng = random.Random(seed)
    base = cycled_turns(conversations, count)
    pool = [turn.content for conversation in conversations for turn in conversation.turns]
    seen, turns = set(), []
    for turn in base:
        while True:
            content = f"{turn.content} {rng.choice(pool)}"
            if content not in seen:
                break
        seen.add(content)
        index_text = f"{turn.metadata.get('speaker')}: {content}" if turn.metadata.get("speaker") else content
        turns.append(replace(turn, content=content, index_text=index_text))
    return turns


class ChatDataset:
    """Users ``bench-chat-<tag>-<group>-<i>`` in tenant ``bench-chat-<tag>``, built or reused."""

    def __init__(
        self, *, tag: str, sizes: list[int], cold_users: int, cold_size: int, many_users: int, user_size: int,
        distinct_size: int, path: Path,
    ) -> None:
        self.tag = tag
        self.sizes = sizes
        self.cold_users = cold_users
        self.cold_size = cold_size
        self.many_users = many_users
        self.user_size = user_size
        self.distinct_size = distinct_size
        self.path = path
        self.conversations = load_conversations(path)
        if not self.conversations:
            raise ValueError(f"{path}: no conversation with turns")
        self.questions = [question for c in self.conversations for question, _ in c.questions]

    @property
    def tenant_name(self) -> str:
        return f"bench-chat-{self.tag}"

    def shape(self) -> dict:
        return {
            "format": FORMAT, "sizes": self.sizes, "cold_users": self.cold_users, "cold_size": self.cold_size,
            "many_users": self.many_users, "user_size": self.user_size, "distinct_size": self.distinct_size,
            "data": str(self.path),
        }

    def tenant(self) -> Tenant | None:
        return Tenant.objects.filter(name=self.tenant_name).first()

    def ensure(self, *, rebuild: bool = False, log=print) -> dict:
        """Build the dataset unless one of this shape exists; ``{"reused", "seconds", ...}``."""
        agent = Agent.objects.filter(tenant__name=self.tenant_name, name=f"{self.tenant_name}-many").first()
        if agent is not None and not rebuild and agent.metadata.get("bench_dataset") == self.shape():
            return {"reused": True, "trimmed_messages": self.trim(log=log)}
        started = time.perf_counter()
        self.drop()
        groups = [
            ("history", [(size, cycled_turns(self.conversations, size)) for size in self.sizes]),
            ("cold", [(self.cold_size, cycled_turns(self.conversations[i % len(self.conversations) :] + self.conversations,
                                                    self.cold_size)) for i in range(self.cold_users)]),
            ("distinct", [(self.distinct_size, distinct_turns(self.conversations, self.distinct_size))] if self.distinct_size else []),
        ]
        built = {}
        for group, users in groups:
            if not users:
                continue
            log(f"building {group}: {len(users)} users, {sum(size for size, _ in users)} messages ...")
            rows = [(f"{self.tenant_name}-{group}-{i}", {"group": group, "size": size}, turns) for i, (size, turns) in enumerate(users)]
            result = bulk_load(tenant_name=self.tenant_name, agent_name=f"{self.tenant_name}-{group}", agent_metadata={}, users=rows, log=log)
            built[group] = {key: value for key, value in result.items() if key != "user_ids"}
        counts = [len(c.turns) for c in self.conversations]
        many = []
        for i in range(self.many_users):
            conversation, start = user_slice(i, turn_counts=counts, per_user=self.user_size)
            turns = self.conversations[conversation].turns[start : start + self.user_size]
            many.append((f"{self.tenant_name}-many-{i}", {"group": "many", "size": self.user_size}, turns))
        log(f"building many: {len(many)} users x {self.user_size} messages ...")
        # The agent of the many users is written last and carries the shape: a build stopped
        # half-way is not taken for a whole one.
        result = bulk_load(
            tenant_name=self.tenant_name, agent_name=f"{self.tenant_name}-many", agent_metadata={"bench_dataset": self.shape()},
            users=many, log=log,
        )
        built["many"] = {key: value for key, value in result.items() if key != "user_ids"}
        log("vacuum")
        vacuum()
        return {"reused": False, "seconds": round(time.perf_counter() - started, 1), "groups": built}

    def trim(self, *, log=print) -> int:
        """Delete what the benchmark's own adds left in the users (each user's newest messages
        beyond its ``size``, by change number: a bulk load numbers its rows before any add),
        through ``messages_delete`` as a client's delete would. Returns how many."""
        from django.db import connection

        from memory.models import Session
        from memory.services.messages import messages_delete

        with connection.cursor() as cursor:
            cursor.execute(
                """
                WITH extra AS (
                    SELECT u.id AS user_id, (u.metadata->>'size')::int AS size
                    FROM memory_user u JOIN memory_tenant t ON t.id = u.tenant_id
                    WHERE t.name = %s
                      AND (SELECT coalesce(sum(s.next_position), 0) FROM memory_session s WHERE s.user_id = u.id)
                          > (u.metadata->>'size')::int
                )
                SELECT m.session_id, array_agg(m.id) FROM extra e CROSS JOIN LATERAL (
                    SELECT id, session_id FROM memory_message WHERE user_id = e.user_id ORDER BY seq DESC
                    LIMIT greatest((SELECT count(*) FROM memory_message WHERE user_id = e.user_id) - e.size, 0)
                ) m GROUP BY m.session_id
                """,
                [self.tenant_name],
            )
            doomed = cursor.fetchall()
        deleted = 0
        for session_id, message_ids in doomed:
            messages_delete(session=Session.objects.get(pk=session_id), message_ids=message_ids)
            deleted += len(message_ids)
        if deleted:
            log(f"dataset: deleted {deleted} messages that earlier runs added")
        return deleted

    def drop(self) -> int:
        """Delete the dataset's tenant with everything it holds; how many users were deleted."""
        return tenant_drop(self.tenant_name)

    def users(self) -> dict[str, list[ChatUser]]:
        """The dataset's users by group, in build order, with query texts: the questions of
        the conversations they hold (every question for the cycled users)."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT ON (u.id) u.id, u.name, u.metadata->>'group', (u.metadata->>'size')::int, "
                "s.id FROM memory_user u JOIN memory_tenant t ON t.id = u.tenant_id "
                "JOIN memory_session s ON s.user_id = u.id WHERE t.name = %s ORDER BY u.id, s.created_at, s.name",
                [self.tenant_name],
            )
            rows = cursor.fetchall()
        counts = [len(c.turns) for c in self.conversations]
        groups: dict[str, list[tuple[int, ChatUser]]] = {}
        for user_id, name, group, size, session_id in rows:
            index = int(name.rsplit("-", 1)[1])
            if group == "many":
                held_conversation, start = user_slice(index, turn_counts=counts, per_user=self.user_size)
                held = self.conversations[held_conversation]
                turns = held.turns[start : start + self.user_size]
                queries = answerable_questions(held, turns) or [t.content for t in turns]
            else:
                queries = self.questions
            groups.setdefault(group, []).append((index, ChatUser(group, size, user_id, session_id, queries)))
        return {group: [user for _, user in sorted(members, key=lambda item: item[0])] for group, members in groups.items()}
