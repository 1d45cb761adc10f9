"""The vector retriever's data: context embeddings written at flush, edit and delete, and the
approximate (HNSW) search of users with long histories."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from django.db import connection

from memory import selectors
from memory.indexing import ann, context
from memory.indexing.flush import flush_pending
from memory.models import Message
from memory.pgvector_binary import use_binary_vectors
from memory.retrieval import MemoryQuery, vector
from memory.services.messages import MessageIn, messages_add, messages_delete, messages_update
from memory.services.sessions import session_create, session_delete
from tests.test_retrieval import flushed_user, smoothed_cosines, unit


def _contexts(session) -> tuple[list, np.ndarray, np.ndarray]:
    """``(ids, embeddings, context embeddings)`` of the session's messages in order."""
    rows = list(Message.objects.filter(session=session).order_by("position"))
    return ([row.pk for row in rows], np.array([np.asarray(row.embedding) for row in rows]),
            np.array([np.asarray(row.context_embedding) for row in rows]))


def _expected_contexts(embeddings: np.ndarray, *, window: int = 2, own: int = 2) -> np.ndarray:
    expected = []
    for i in range(len(embeddings)):
        around = [embeddings[j] for j in range(max(0, i - window), min(len(embeddings), i + window + 1)) if j != i]
        expected.append((own * embeddings[i] + sum(around, np.zeros_like(embeddings[i]))) / (own + len(around)))
    return np.array(expected)


def test_flush_writes_each_turns_context_embedding(alice_session):
    """After a flush, each turn's context embedding is the weighted mean of its own and its
    neighbours' embeddings (VECTOR_CONTEXT_TURNS either side, its own VECTOR_OWN_WEIGHT times)."""
    messages_add(session=alice_session, messages=[MessageIn(role="user", content=f"Turn {i} about hiking.") for i in range(6)])
    flush_pending(user_id=alice_session.user_id)
    messages_add(session=alice_session, messages=[MessageIn(role="user", content="A late turn about kayaks.")])
    flush_pending(user_id=alice_session.user_id)  # the earlier turns' windows now reach it

    _, embeddings, contexts = _contexts(alice_session)

    assert contexts == pytest.approx(_expected_contexts(embeddings), abs=1e-6)


def test_edits_and_deletes_rewrite_the_neighbours_context_embeddings(alice_session):
    """An edited turn leaves its neighbours' contexts (until its flush puts its new text in);
    a deleted one leaves them for good, and their windows move on to the next turns."""
    rows = messages_add(session=alice_session, messages=[MessageIn(role="user", content=f"Note {i} on gardens.") for i in range(7)])
    flush_pending(user_id=alice_session.user_id)
    messages_update(session=alice_session, message_ids=[rows[3].pk], new_messages=[MessageIn(role="user", content="Edited.")])
    messages_delete(session=alice_session, message_ids=[rows[5].pk])

    ids, embeddings, _ = zip(*[(r.pk, r.embedding, r.context_embedding) for r in Message.objects.filter(session=alice_session).order_by("position")])
    by_id = {r.pk: r for r in Message.objects.filter(session=alice_session)}
    assert by_id[rows[3].pk].embedding is None and by_id[rows[3].pk].context_embedding is None
    # Turn 4's window: turns 2, 3 (pending: not counted) before, 6 after (5 is gone).
    e = {i: np.asarray(by_id[rows[i].pk].embedding) for i in (0, 1, 2, 4, 6)}
    assert np.asarray(by_id[rows[4].pk].context_embedding) == pytest.approx((2 * e[4] + e[2] + e[6]) / 4, abs=1e-6)

    flush_pending(user_id=alice_session.user_id)
    _, embeddings, contexts = _contexts(alice_session)
    assert contexts == pytest.approx(_expected_contexts(embeddings), abs=1e-6)


def _plan(user_id, query: np.ndarray, *, ann_bucket: int | None) -> str:
    """The plan of the vector search's statement for ``user_id``, run as ``candidates`` runs it."""
    from django.db import transaction

    sql, params, local_settings = vector.search_statement(user_id=user_id, embedding=query, limit=10, ann_bucket=ann_bucket)
    with transaction.atomic(), connection.cursor() as cursor:
        for setting in local_settings:
            cursor.execute(setting)
        use_binary_vectors(cursor)
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.django_db
def test_a_long_history_moves_to_the_hnsw_index_and_keeps_its_ranking(agent, settings):
    """Past ANN_MIN_MESSAGES a flush gives the user an HNSW bucket (one no other user has) and
    puts their context embeddings in its index; the search then goes through that index, and
    its top 10 are the exact top 10 (distinct random vectors, as users' texts are)."""
    from memory.models import EMBEDDING_DIM, User

    settings.MEMFUSE = {**settings.MEMFUSE, "ANN_MIN_MESSAGES": 300}
    rng = np.random.default_rng(11)
    vectors = unit(rng.normal(size=(400, EMBEDDING_DIM)))
    user, ids = flushed_user(agent, "long", vectors)
    small, _ = flushed_user(agent, "short", unit(rng.normal(size=(50, EMBEDDING_DIM))))
    messages_add(session=user.sessions.get(), messages=[MessageIn(role="user", content="one more turn")])
    flush_pending(user_id=user.pk)  # the flush that notices the history's length
    flush_pending(user_id=small.pk)
    user.refresh_from_db()
    assert user.ann_bucket is not None and User.objects.get(pk=small.pk).ann_bucket is None
    assert set(Message.objects.filter(user=user).values_list("ann_bucket", flat=True)) == {user.ann_bucket}
    assert not Message.objects.filter(user=small, ann_bucket__isnull=False).exists()

    recalls = []
    for query in unit(rng.normal(size=(10, EMBEDDING_DIM))):
        exact = smoothed_cosines(vectors, query)
        served, _, _ = vector.candidates(user_id=user.pk, embedding=query, limit=10, ann_bucket=user.ann_bucket)
        expected = {ids[i] for i in np.argsort(-exact)[:10]}
        recalls.append(len(expected & {key.id for key, _ in served}) / 10)
    assert np.mean(recalls) >= 0.98
    assert f"memory_message_context_hnsw_{user.ann_bucket} " in _plan(user.pk, query, ann_bucket=user.ann_bucket)
    assert "memory_message_context_hnsw" not in _plan(small.pk, query, ann_bucket=None)


def _echo_user(agent, settings, *, distinct: int = 12, times: int = 40) -> tuple:
    """A user in an HNSW bucket whose one session repeats ``distinct`` random turns ``times``
    times, so each context embedding has about ``times`` exact copies, plus a second session
    of the same turns (``times // 4`` passes) written as a flush writes them: ``(user, first
    session, second session)``."""
    from django.utils import timezone

    from memory.models import EMBEDDING_DIM

    settings.MEMFUSE = {**settings.MEMFUSE, "ANN_MIN_MESSAGES": distinct * times - 10}
    turns = unit(np.random.default_rng(3).normal(size=(distinct, EMBEDDING_DIM)))
    user, _ = flushed_user(agent, "echo", np.tile(turns, (times, 1)))
    first = user.sessions.get()
    messages_add(session=first, messages=[MessageIn(role="user", content="one more turn")])
    flush_pending(user_id=user.pk)  # the flush that moves the user to the index
    user.refresh_from_db()
    second = session_create(user=user, agent=agent, name="echo-again")
    now = timezone.now()
    rows = Message.objects.bulk_create(
        Message(session=second, user=user, position=i, role="user", content=f"again {i}", index_text=f"again {i}",
                embedding=embedding, flushed_at=now, flush_count=1, created_at=now)
        for i, embedding in enumerate(np.tile(turns, (times // 4, 1)))
    )
    with connection.cursor() as cursor:
        context.context_refresh(cursor, seeds=[(second.pk, row.position) for row in rows], bucket=user.ann_bucket)
    return user, first, second


def _rows_in_the_index(user) -> dict:
    """``{context digest: [ann_duplicate of each row]}`` of the user's rows in their bucket."""
    groups: dict = {}
    for digest, duplicate in Message.objects.filter(user=user, ann_bucket__isnull=False).values_list("context_digest", "ann_duplicate"):
        groups.setdefault(digest, []).append(duplicate)
    return groups


def _top_k_are_the_exact_top_k(user, queries: np.ndarray, k: int = 10, sessions: list | None = None) -> bool:
    """Whether the approximate search's top ``k`` (of ``sessions``, when given) all score at
    least the exact ``k``-th best (ties count: copies score alike) for every query."""
    rows = Message.objects.filter(user=user, context_embedding__isnull=False)
    if sessions is not None:
        rows = rows.filter(session__in=sessions)
    rows = rows.values_list("id", "context_embedding")
    ids = [row_id for row_id, _ in rows]
    contexts = np.array([np.asarray(context) for _, context in rows])
    for query in queries:
        exact = dict(zip(ids, (contexts @ query).tolist()))
        threshold = sorted(exact.values(), reverse=True)[k - 1] - 1e-5
        served, _, _ = vector.candidates(user_id=user.pk, embedding=query, limit=2 * k, ann_bucket=user.ann_bucket, sessions=sessions)
        top = [key.id for key, _ in served if key.kind == "message"][:k]
        if len(top) < k or any(exact[row_id] < threshold for row_id in top):
            return False
    return True


@pytest.mark.django_db
def test_copies_of_a_context_embedding_are_one_row_in_the_hnsw_index(agent, settings):
    """A history that repeats itself puts each context embedding into the HNSW index once,
    whether the user moved there (``ann_place``) or a flush wrote the copies
    (``context_refresh``); the search still returns the copies, through that one row, also
    those inside a query's filter whose row in the index is outside it."""
    from memory.models import EMBEDDING_DIM

    user, _, second = _echo_user(agent, settings)

    groups = _rows_in_the_index(user)
    assert sum(len(flags) for flags in groups.values()) == Message.objects.filter(user=user).count()
    assert all(flags.count(False) == 1 for flags in groups.values())
    # 12 turns' windows inside a session, and the session ends' partial windows, at most
    assert len(groups) <= 12 + 2 * 4 + 4
    assert Message.objects.filter(session=second, ann_duplicate=True).count() >= 100 - 4
    queries = unit(np.random.default_rng(4).normal(size=(5, EMBEDDING_DIM)))
    assert _top_k_are_the_exact_top_k(user, queries)
    assert _top_k_are_the_exact_top_k(user, queries, sessions=[second.pk])


@pytest.mark.django_db
def test_a_move_to_the_hnsw_index_in_batches_puts_each_context_embedding_in_once(agent):
    """The move takes the user's rows in batches; a copy of a row an earlier batch put in the
    index goes in as a copy."""
    from memory.models import EMBEDDING_DIM

    turns = unit(np.random.default_rng(8).normal(size=(6, EMBEDDING_DIM)))
    user, _ = flushed_user(agent, "batches", np.tile(turns, (20, 1)))

    assert ann.ann_enable(user_id=user.pk, batch=7) is not None

    groups = _rows_in_the_index(user)
    assert sum(len(flags) for flags in groups.values()) == 120
    assert all(flags.count(False) == 1 for flags in groups.values())
    assert len(groups) <= 6 + 2 * 4


@pytest.mark.django_db
def test_when_the_row_in_the_index_leaves_a_copy_takes_its_place(agent, settings):
    """The row of a context embedding in the HNSW index, deleted, edited or gone with its
    session, hands its place to a copy (a trigger, whichever path removed it), so the copies
    are still found."""
    from memory.models import EMBEDDING_DIM

    user, first, second = _echo_user(agent, settings)
    queries = unit(np.random.default_rng(6).normal(size=(5, EMBEDDING_DIM)))
    in_index = Message.objects.filter(session=first, ann_duplicate=False, ann_bucket__isnull=False)
    deleted, edited = in_index.order_by("position").values_list("pk", flat=True)[4:6]
    digests = dict(Message.objects.filter(pk__in=[deleted, edited]).values_list("pk", "context_digest"))

    messages_delete(session=first, message_ids=[deleted])
    messages_update(session=first, message_ids=[edited], new_messages=[MessageIn(role="user", content="changed")])

    groups = _rows_in_the_index(user)
    assert groups[digests[deleted]].count(False) == 1 and groups[digests[edited]].count(False) == 1
    assert not Message.objects.filter(pk=edited, ann_bucket__isnull=False).exists()
    assert _top_k_are_the_exact_top_k(user, queries)

    session_delete(session=first)

    groups = _rows_in_the_index(user)
    assert groups and set(Message.objects.filter(user=user).values_list("session", flat=True)) == {second.pk}
    assert all(flags.count(False) == 1 for flags in groups.values())
    assert _top_k_are_the_exact_top_k(user, queries)


@pytest.mark.django_db(transaction=True)
def test_the_move_to_the_hnsw_index_takes_turns_with_a_flush_of_the_user(agent):
    """While a flush's write of the user holds their context-write lock, the move to the HNSW
    index puts none of their rows in it (the two lock the user's rows in different orders, and
    would deadlock); once the flush commits, the move puts every row in the index."""
    import threading

    from django.db import transaction

    from memory.models import EMBEDDING_DIM

    vectors = unit(np.random.default_rng(5).normal(size=(30, EMBEDDING_DIM)))
    user, ids = flushed_user(agent, "mover", vectors)
    flush_holds, flush_may_end = threading.Event(), threading.Event()
    moved = []

    def flush_write():
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                context.lock_context_writes(cursor, user_id=user.pk)
                flush_holds.set()
                flush_may_end.wait(10)
        finally:
            connection.close()

    def move():
        try:
            moved.append(ann.ann_enable(user_id=user.pk, batch=10))
        finally:
            connection.close()

    flusher, mover = threading.Thread(target=flush_write), threading.Thread(target=move)
    flusher.start()
    assert flush_holds.wait(10)
    mover.start()
    mover.join(0.5)
    in_index_meanwhile = Message.objects.filter(user=user, ann_bucket__isnull=False).count()
    flush_may_end.set()
    flusher.join(10)
    mover.join(10)

    assert in_index_meanwhile == 0
    assert moved and moved[0] is not None
    assert set(Message.objects.filter(pk__in=ids).values_list("ann_bucket", flat=True)) == {moved[0]}


@pytest.mark.django_db
def test_a_move_to_the_hnsw_index_puts_the_rest_where_an_earlier_move_put_rows(agent):
    """Rows a concurrent or interrupted move already put in a bucket decide the bucket of the
    next move of the user, even when another bucket is less shared: all the user's rows end in
    the bucket the user searches, never split over two indexes."""
    from memory.models import EMBEDDING_DIM, User

    vectors = unit(np.random.default_rng(9).normal(size=(30, EMBEDDING_DIM)))
    user, ids = flushed_user(agent, "half-moved", vectors)
    neighbour, _ = flushed_user(agent, "neighbour", vectors[:3])
    User.objects.filter(pk=neighbour.pk).update(ann_bucket=7)  # bucket 7 is the most shared
    with connection.cursor() as cursor:
        assert ann.ann_place(cursor, user_id=user.pk, bucket=7, limit=10) == 10

    assert ann.ann_enable(user_id=user.pk, batch=5) == 7

    assert set(Message.objects.filter(pk__in=ids).values_list("ann_bucket", flat=True)) == {7}


@pytest.mark.django_db(transaction=True)
def test_a_flush_that_waited_for_the_move_to_the_hnsw_index_writes_into_its_bucket(agent):
    """A flush's write that waited for the move of the user to the HNSW index (their
    context-write lock) reads the bucket the move set: the turns it writes, and their
    neighbours' new context embeddings, go into that index, none is left out of it."""
    import threading

    from django.db import transaction

    from memory.indexing import flush
    from memory.models import EMBEDDING_DIM
    from tests.locks import a_backend_waits_for_a_lock

    vectors = unit(np.random.default_rng(10).normal(size=(20, EMBEDDING_DIM)))
    user, _ = flushed_user(agent, "moving", vectors)
    session = user.sessions.get()
    messages_add(session=session, messages=[MessageIn(role="user", content=f"new {i}") for i in range(3)])
    token = uuid.uuid4()
    claimed = flush._claim(user_id=user.pk, session_id=None, token=token, limit=10)
    move_holds, move_may_commit = threading.Event(), threading.Event()

    def move():  # ann_enable's last transaction, held open until the flush waits for it
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT FROM memory_user WHERE id = %s FOR KEY SHARE", [user.pk])
                context.lock_context_writes(cursor, user_id=user.pk)
                cursor.execute("UPDATE memory_user SET ann_bucket = 5 WHERE id = %s", [user.pk])
                ann.ann_place(cursor, user_id=user.pk, bucket=5)
                move_holds.set()
                move_may_commit.wait(10)
        finally:
            connection.close()

    def write():
        try:
            flush._write(user_id=user.pk, token=token, ids=[row[0] for row in claimed], vectors=vectors[:3])
        finally:
            connection.close()

    mover, writer = threading.Thread(target=move), threading.Thread(target=write)
    mover.start()
    assert move_holds.wait(10)
    writer.start()
    assert a_backend_waits_for_a_lock()
    move_may_commit.set()
    mover.join(10)
    writer.join(10)

    rows = Message.objects.filter(user=user)
    assert rows.filter(flushed_at__isnull=True).count() == 0
    assert set(rows.values_list("ann_bucket", flat=True)) == {5}


@pytest.mark.django_db
def test_the_repair_migration_puts_a_users_stray_rows_back_into_their_bucket(agent):
    """Migration 0012 repairs what racing moves left: rows of a moved user in another bucket or
    in none go into the user's (copies marked again, one row in the index per context), and
    the search finds the exact top k again; a user not moved yet whose rows are in two buckets
    has them taken out of every index, and the next move puts them all in one."""
    import importlib

    from memory.models import EMBEDDING_DIM, User

    repair = importlib.import_module("memory.migrations.0012_ann_bucket_repair")
    turns = unit(np.random.default_rng(11).normal(size=(8, EMBEDDING_DIM)))
    moved, moved_ids = flushed_user(agent, "split-moved", np.tile(turns, (5, 1)))
    bucket = ann.ann_enable(user_id=moved.pk)
    Message.objects.filter(pk__in=moved_ids[:12]).update(ann_bucket=(bucket + 1) % 32)
    Message.objects.filter(pk__in=moved_ids[12:15]).update(ann_bucket=None, context_digest=None, ann_duplicate=False)
    unmoved, unmoved_ids = flushed_user(agent, "split-unmoved", turns)
    with connection.cursor() as cursor:
        ann.ann_place(cursor, user_id=unmoved.pk, bucket=3, limit=4)
        ann.ann_place(cursor, user_id=unmoved.pk, bucket=4)
    moved.refresh_from_db()
    assert not _top_k_are_the_exact_top_k(moved, turns[:3])

    with connection.cursor() as cursor:
        cursor.execute(repair.REPAIR_MOVED_USERS)
        cursor.execute(repair.RESET_SPLIT_MOVES)

    assert set(Message.objects.filter(pk__in=moved_ids).values_list("ann_bucket", flat=True)) == {bucket}
    assert all(flags.count(False) == 1 for flags in _rows_in_the_index(moved).values())
    assert _top_k_are_the_exact_top_k(moved, turns[:3])
    assert set(Message.objects.filter(pk__in=unmoved_ids).values_list("ann_bucket", flat=True)) == {None}
    placed = ann.ann_enable(user_id=unmoved.pk)
    assert User.objects.get(pk=unmoved.pk).ann_bucket == placed
    assert set(Message.objects.filter(pk__in=unmoved_ids).values_list("ann_bucket", flat=True)) == {placed}


def test_a_query_of_an_ann_user_finds_a_pending_message_too(alice_session, settings):
    """Read your writes holds on the approximate path: a message added after the user moved
    to the HNSW index is found before its flush, and after it."""
    settings.MEMFUSE = {**settings.MEMFUSE, "ANN_MIN_MESSAGES": 20}
    messages_add(session=alice_session, messages=[MessageIn(role="user", content=f"Log {i}: tea at noon.") for i in range(25)])
    flush_pending(user_id=alice_session.user_id)
    [boat] = messages_add(session=alice_session, messages=[MessageIn(role="user", content="I bought a red kayak for the lake.")])
    alice = alice_session.user
    alice.refresh_from_db()
    assert alice.ann_bucket is not None

    before = selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=1))
    flush_pending(user_id=alice.pk)
    alice.refresh_from_db()
    after = selectors.memory_query(MemoryQuery(user=alice, query="What boat did I buy?", top_k=1))

    assert before[0]["id"] == after[0]["id"] == str(boat.pk)
    assert Message.objects.get(pk=boat.pk).ann_bucket == alice.ann_bucket


def test_a_flush_writes_the_embedding_a_query_made_for_a_pending_turn(alice_session, monkeypatch):
    """Read your writes embedded the pending turn with the query model, which gives what the
    flush's model gives (``registry.queries_embed_documents``): the flush writes that
    embedding as it is, and embeds only the turn that no query asked for."""
    from memory import retrieval
    from memory.inference import registry

    assert registry.queries_embed_documents()
    monkeypatch.setattr("memory.services.messages._start_embeddings", lambda rows: None)  # only what a query embedded
    [asked] = messages_add(session=alice_session, messages=[MessageIn(role="user", content="I adopted a grey kitten named Ash.")])
    user = alice_session.user
    user.refresh_from_db()
    retrieval.hybrid_search(MemoryQuery(user=user, query="Which pet did I adopt?", top_k=3))
    [later] = messages_add(session=alice_session, messages=[MessageIn(role="user", content="Ash sleeps on the piano.")])
    embedded: list[str] = []
    real_embed = registry.embed
    monkeypatch.setattr(registry, "embed", lambda texts, **options: embedded.extend(texts) or real_embed(texts, **options))

    assert flush_pending(user_id=user.pk) == 2

    asked.refresh_from_db()
    later.refresh_from_db()
    assert embedded == [later.index_text]
    query_model = registry.submit_query([asked.index_text]).result()[0]
    assert np.asarray(asked.embedding) == pytest.approx(query_model, abs=1e-6)
    assert np.asarray(later.embedding) == pytest.approx(registry.submit_query([later.index_text]).result()[0], abs=1e-6)


def test_a_flush_writes_the_turns_query_embedding_for_the_message_with_its_words(alice_session, monkeypatch):
    """The chat pattern: a turn's query is the user's new message, and the round added next
    holds those words. The flush writes the query model's embedding of them (a recent call,
    ``registry.recent_query_embeddings``) and embeds only the assistant's message."""
    from memory import retrieval
    from memory.inference import registry

    said = "We finally booked the cabin in the mountains for July."
    monkeypatch.setattr("memory.services.messages._start_embeddings", lambda rows: None)  # the query's embedding alone
    user = alice_session.user
    user.refresh_from_db()
    retrieval.hybrid_search(MemoryQuery(user=user, query=said, top_k=3))
    added = messages_add(
        session=alice_session,
        messages=[MessageIn(role="user", content=said), MessageIn(role="assistant", content="That sounds lovely, enjoy July!")],
    )
    embedded: list[str] = []
    real_embed = registry.embed
    monkeypatch.setattr(registry, "embed", lambda texts, **options: embedded.extend(texts) or real_embed(texts, **options))

    assert flush_pending(user_id=user.pk) == 2

    assert embedded == ["That sounds lovely, enjoy July!"]
    user_message = Message.objects.get(pk=added[0].pk)
    assert np.asarray(user_message.embedding) == pytest.approx(registry.submit_query([said]).result()[0], abs=1e-6)


def test_an_add_starts_embedding_its_newest_messages_and_the_flush_writes_those(alice_session, monkeypatch, settings):
    """An add starts the query model on its newest PENDING_EMBED_MAX messages while it writes
    them (read your writes for the query that follows); their flush writes those embeddings
    and embeds only the older ones."""
    from memory.inference import registry

    settings.MEMFUSE = {**settings.MEMFUSE, "PENDING_EMBED_MAX": 2}
    texts = ["The ferry leaves at seven.", "We packed sandwiches.", "Dad forgot the tickets.", "We took the next boat."]
    rows = messages_add(session=alice_session, messages=[MessageIn(role="user", content=text) for text in texts])
    embedded: list[str] = []
    real_embed = registry.embed
    monkeypatch.setattr(registry, "embed", lambda batch, **options: embedded.extend(batch) or real_embed(batch, **options))

    assert flush_pending(user_id=alice_session.user_id) == 4

    assert sorted(embedded) == sorted(texts[:2])
    newest = Message.objects.get(pk=rows[-1].pk)
    assert np.asarray(newest.embedding) == pytest.approx(registry.submit_query([texts[-1]]).result()[0], abs=1e-6)
