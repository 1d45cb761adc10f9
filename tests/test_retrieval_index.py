"""The lexical index as histories change: in place, caught up, snapshotted, and bounded in bytes.

What matters here: a write does not make the next query rebuild anything; an index kept up
to date by adds, edits and deletes ranks exactly as one built from scratch (and as bm25s over
the same context documents); a process that has not cached a user loads their snapshot; the
cache evicts by bytes.
"""

from __future__ import annotations

import random
import tracemalloc
import uuid

import bm25s
import pytest
from django.db import connection

from memory import retrieval, selectors
from memory.indexing import snapshots
from memory.indexing.flush import flush_pending
from memory.inference import registry
from memory.retrieval import MemoryQuery, store
from memory.retrieval.bm25 import KINDS, KNOWLEDGE, MESSAGE, BM25Index, Document
from memory.retrieval.keys import DocKey
from memory.services.common import memory_version_bump
from memory.services.knowledge import knowledge_add
from memory.services.messages import MessageIn, messages_add, messages_delete, messages_update
from memory.services.sessions import session_create
from memory.services.users import user_delete


def context_documents(tokens: list[list[str]], sessions: list, *, window: int, own_weight: int) -> list[list[str]]:
    """BM25 documents of turns in conversation order, each with its neighbours' words: what
    the index scores, materialised (the independent oracle of these tests)."""
    documents = []
    for i, own in enumerate(tokens):
        document = list(own) * own_weight
        for j in range(max(0, i - window), min(len(tokens), i + window + 1)):
            if j != i and sessions[j] == sessions[i]:
                document.extend(tokens[j])
        documents.append(document)
    return documents


def test_context_documents_oracle_adds_neighbours_of_the_same_session_only():
    """The oracle itself: a turn's document holds its own words (weighted) and its neighbours' within the session."""
    tokens = [["a"], ["b"], ["c"], ["d"]]
    documents = context_documents(tokens, ["s1", "s1", "s1", "s2"], window=1, own_weight=2)
    assert documents == [["a", "a", "b"], ["b", "b", "a", "c"], ["c", "c", "b"], ["d", "d"]]


def test_index_changed_in_place_scores_as_bm25s_over_the_context_documents():
    """Random adds, edits (re-adds), deletes, compactions and snapshot round trips: every
    document's score equals bm25s's (lucene) over the live documents, built from scratch, and
    the batch lookup of rows (``rows``) agrees with the one-key lookup (``row``)."""
    rng = random.Random(7)
    words = [f"w{i}" for i in range(40)]
    sessions = [uuid.uuid4() for _ in range(4)]
    next_position = dict.fromkeys(sessions, 0)
    index = BM25Index(window=2, own_weight=2)
    live: dict[uuid.UUID, dict] = {}
    removed: list[uuid.UUID] = []

    def document(kind, session=None, doc_id=None, position=None):
        tokens = [rng.choice(words) for _ in range(rng.randint(0, 7))]
        if kind == MESSAGE and position is None:
            position = next_position[session]
            next_position[session] += 1
        counts = {token: tokens.count(token) for token in tokens}
        return {"kind": kind, "id": doc_id or uuid.uuid4(), "session": session, "position": position or 0,
                "tokens": tokens, "counts": counts}

    checked = 0
    for step in range(240):
        choice = rng.random()
        if choice < 0.65 or not live:
            doc = document(MESSAGE, rng.choice(sessions)) if rng.random() < 0.9 else document(KNOWLEDGE)
        elif choice < 0.85:
            victim = rng.choice(list(live))
            assert index.remove(victim)
            del live[victim]
            removed.append(victim)
            doc = None
        else:
            old = live[rng.choice(list(live))]
            doc = document(old["kind"], old["session"], old["id"], old["position"])
        if doc is not None:
            index.add(Document(kind=doc["kind"], id=doc["id"], lexemes=doc["counts"], created_us=0,
                               session=doc["session"], position=doc["position"]))
            live[doc["id"]] = doc
        if step % 61 == 60:
            index.compact()
        if step % 47 == 46:
            index = BM25Index.from_bytes(index.to_bytes(), window=2, own_weight=2)
        messages = sorted((d for d in live.values() if d["kind"] == MESSAGE), key=lambda d: (d["session"].bytes, d["position"]))
        knowledge = [d for d in live.values() if d["kind"] == KNOWLEDGE]
        corpus = context_documents([d["tokens"] for d in messages], [d["session"] for d in messages], window=2, own_weight=2)
        corpus += [d["tokens"] for d in knowledge]
        query = [rng.choice(words) for _ in range(3)]
        reference = bm25s.BM25(method="lucene")
        if not any(corpus) or not any(token in set(sum(corpus, [])) for token in query):
            continue
        reference.index(corpus, show_progress=False)
        expected = reference.get_scores([token for token in query if token in reference.vocab_dict])
        rows, scores = index.scores(query)
        got = {index.key(int(row)).id: score for row, score in zip(rows, scores)}
        for doc, score in zip(messages + knowledge, expected):
            assert got.get(doc["id"], 0.0) == pytest.approx(float(score), rel=1e-4, abs=1e-6)
        probes = [DocKey(KINDS[d["kind"]], d["id"]) for d in live.values()]
        probes += [DocKey(KINDS[1 - d["kind"]], d["id"]) for d in list(live.values())[:3]]  # the other kind
        probes += [DocKey("message", doc_id) for doc_id in removed if doc_id not in live] + [DocKey("message", uuid.uuid4())]
        rng.shuffle(probes)
        held = {index.key(row): row for row in range(index.n) if index.alive[row]}  # every live row, decoded
        assert index.rows(probes).tolist() == [held.get(key, -1) for key in probes]
        checked += 1
    assert checked > 150 and len(index) == len(live)


def _add(session, texts, **metadata):
    return messages_add(session=session, messages=[MessageIn(role="user", content=t, metadata=metadata) for t in texts])


def _bm25(user, query: str, limit: int = 50):
    """The BM25 list of the user's cached index at their current version: ``[(key, score)]``."""
    user.refresh_from_db()
    entry = retrieval.user_index(user.pk)
    with entry.lock:
        found = entry.sync(user.memory_version).search(retrieval.query_tokens(query), limit=limit)
    retrieval.cache.resized(entry)
    return found


def _snapshot_bytes(user_id) -> bytes:
    with store.snapshot_parts(user_id) as parts:
        return b"".join(parts)


def _fresh_bm25(user, query: str, limit: int = 50):
    """The same list from an index built from the user's rows alone (no snapshot, no cache)."""
    index = store.new_index()
    assert store.catch_up(index, user.pk)
    return index.search(retrieval.query_tokens(query), limit=limit)


def test_a_write_does_not_make_the_next_query_rebuild_the_index(alice_session):
    """Query, add, query, edit, query: the index is loaded once and caught up after each write."""
    _add(alice_session, ["My sister lives in Lisbon.", "She works as an architect."])
    alice = alice_session.user
    alice.refresh_from_db()
    selectors.memory_query(MemoryQuery(user=alice, query="Where does my sister live?"))
    entry = retrieval.user_index(alice.pk)
    assert (entry.loads, entry.catch_ups) == (1, 0)

    [boat] = _add(alice_session, ["I bought a red kayak."])
    alice.refresh_from_db()
    found = selectors.memory_query(MemoryQuery(user=alice, query="kayak", top_k=1))
    messages_update(session=alice_session, message_ids=[boat.pk], new_messages=[MessageIn(role="user", content="I bought a canoe.")])
    alice.refresh_from_db()
    after_edit = selectors.memory_query(MemoryQuery(user=alice, query="canoe", top_k=1))

    assert found[0]["id"] == after_edit[0]["id"] == str(boat.pk)
    assert (entry.loads, entry.catch_ups) == (1, 2)


def test_an_index_kept_up_by_writes_ranks_as_one_built_from_scratch(alice, agent):
    """Adds in several sessions, edits, deletes, knowledge: after each write the cached index's
    BM25 ranking (keys and scores) equals that of an index built from the rows."""
    rng = random.Random(3)
    words = "lisbon kayak garden pottery glacier bakery trail sister architect picnic".split()
    sessions = [session_create(user=alice, agent=agent, name=f"s{i}") for i in range(3)]
    queries = ["kayak trail", "sister lisbon architect", "garden picnic pottery", "glacier"]
    added = []
    for step in range(24):
        choice = rng.random()
        if choice < 0.6 or len(added) < 4:
            texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
            added += _add(rng.choice(sessions), texts)
        elif choice < 0.75:
            victim = added.pop(rng.randrange(len(added)))
            messages_delete(session=victim.session, message_ids=[victim.pk])
        elif choice < 0.9:
            target = rng.choice(added)
            messages_update(
                session=target.session, message_ids=[target.pk],
                new_messages=[MessageIn(role="user", content=" ".join(rng.sample(words, 3)))],
            )
        else:
            knowledge_add(user=alice, contents=[" ".join(rng.sample(words, 2))])
        if step == 12:
            flush_pending(user_id=alice.pk)  # a snapshot too, and context embeddings
        for query in queries:
            cached = [(key, round(score, 9)) for key, score in _bm25(alice, query)]
            assert cached == [(key, round(score, 9)) for key, score in _fresh_bm25(alice, query)], (step, query)
    assert retrieval.user_index(alice.pk).loads == 1


def test_edits_and_deletes_are_reflected_at_once_by_both_retrievers(alice_session):
    """An edited message is found by its new words only; a deleted one by nothing; flushed or not."""
    rows = _add(alice_session, ["I adopted a beagle called Pepper.", "The weather was grey.", "We baked rye bread."])
    flush_pending(user_id=alice_session.user_id)
    beagle, _, bread = rows
    alice = alice_session.user
    messages_update(
        session=alice_session, message_ids=[beagle.pk], new_messages=[MessageIn(role="user", content="I adopted a cat called Miso.")]
    )
    messages_delete(session=alice_session, message_ids=[bread.pk])
    alice.refresh_from_db()

    def ids(query, **overrides):
        config = retrieval.RetrievalConfig.from_settings(**overrides)
        return [r["id"] for r in selectors.memory_query(MemoryQuery(user=alice, query=query, top_k=5, config=config))]

    assert str(beagle.pk) not in ids("beagle Pepper", vector_weight=0.0)
    assert ids("cat Miso", vector_weight=0.0)[0] == str(beagle.pk)
    assert str(bread.pk) not in ids("rye bread") and str(bread.pk) not in ids("baking bread", bm25_weight=0.0)
    flush_pending(user_id=alice.pk)
    alice.refresh_from_db()
    assert ids("a kitten", bm25_weight=0.0)[0] == str(beagle.pk)
    assert str(bread.pk) not in ids("baking bread", bm25_weight=0.0)


def test_a_process_without_the_user_loads_their_snapshot_and_catches_up(alice_session, monkeypatch):
    """A flush writes the user's snapshot; an empty cache loads it (one snapshot read, not the
    rows) and applies what was written after it; rankings equal a build from the rows."""
    _add(alice_session, [f"trip number {i} to the glacier" for i in range(30)])
    flush_pending(user_id=alice_session.user_id)
    through, _, lag = store.snapshot_lag(alice_session.user_id)
    assert through is not None and lag == 0
    [late] = _add(alice_session, ["a late trip to the glacier lake"])
    loaded = []
    from_parts = BM25Index.from_parts

    def counted(cls, parts, **kw):
        index = from_parts(parts, **kw)
        loaded.append(index is not None)
        return index

    monkeypatch.setattr(BM25Index, "from_parts", classmethod(counted))
    retrieval.reset_user_cache()

    cached = _bm25(alice_session.user, "glacier lake trip")

    assert loaded == [True] and retrieval.user_index(alice_session.user_id).index.seq > through
    assert cached == _fresh_bm25(alice_session.user, "glacier lake trip")
    assert cached[0][0].id == late.pk


def test_a_flush_without_the_user_cached_rewrites_the_snapshot_after_a_tenth_of_its_documents(
    alice_session, settings
):
    """In a process that has not cached the user (a flush worker's usual case), a flush rewrites
    the snapshot only once a tenth of the snapshot's documents changed, not every
    SNAPSHOT_MIN_CHANGES: each rewrite loads and saves the whole index."""
    settings.MEMFUSE = {**settings.MEMFUSE, "SNAPSHOT_MIN_CHANGES": 5}
    user_id = alice_session.user_id
    _add(alice_session, [f"walk number {i} along the canal" for i in range(100)])
    flush_pending(user_id=user_id)
    through, documents, _ = store.snapshot_lag(user_id)
    retrieval.reset_user_cache()

    _add(alice_session, [f"swim number {i} in the lake" for i in range(8)])
    flush_pending(user_id=user_id)
    kept, _, lag = store.snapshot_lag(user_id)
    _add(alice_session, [f"ride number {i} by the river" for i in range(4)])
    flush_pending(user_id=user_id)

    assert documents == 100 and (kept, lag) == (through, 8)
    assert store.snapshot_lag(user_id)[2] == 0  # past a tenth: written again


def test_a_snapshot_is_stored_in_bounded_parts_and_read_back_whole(alice_session, monkeypatch):
    """A snapshot larger than a part is split into parts no larger than SNAPSHOT_PART_BYTES
    (so no row or bound parameter is larger); it loads back byte for byte and ranks as a
    build from the rows; a later, smaller snapshot leaves none of the earlier parts."""
    monkeypatch.setattr(snapshots, "SNAPSHOT_PART_BYTES", 1000)
    rows = _add(alice_session, [f"hike number {i} up the ridge with {i % 7} friends" for i in range(40)])
    user_id = alice_session.user_id
    index = store.load(user_id)
    data = index.to_bytes()

    assert snapshots.snapshot_save(index, user_id)

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), max(octet_length(data)) FROM memory_indexsnapshotpart WHERE user_id = %s", [user_id])
        parts, largest = cursor.fetchone()
    assert parts == -(-len(data) // 1000) and parts > 2 and largest <= 1000
    assert _snapshot_bytes(user_id) == data
    assert store.load(user_id).search(retrieval.query_tokens("ridge hike"), limit=50) == _fresh_bm25(alice_session.user, "ridge hike")

    messages_delete(session=alice_session, message_ids=[row.pk for row in rows[5:]])
    smaller = store.load(user_id)
    assert snapshots.snapshot_save(smaller, user_id)
    assert _snapshot_bytes(user_id) == smaller.to_bytes() and len(smaller.to_bytes()) < len(data)


@pytest.mark.django_db(transaction=True)
def test_a_snapshot_write_waits_for_a_delete_of_its_user_and_then_writes_nothing(alice_session, monkeypatch):
    """A snapshot write takes the user row first (the lock order): while a delete of the user
    holds it, the write waits instead of locking the snapshot the delete is about to remove,
    and once the delete commits it writes nothing."""
    import threading

    from tests.locks import a_backend_waits_for_a_lock

    user = alice_session.user
    _add(alice_session, ["We hiked the ridge at dawn."])
    assert snapshots.snapshot_save(store.load(user.pk), user.pk)
    _add(alice_session, ["Then we swam in the lake."])
    newer = store.load(user.pk)
    holds, may_go, results = threading.Event(), threading.Event(), {}
    real_bump = memory_version_bump

    def pausing(user_id):
        bucket = real_bump(user_id)
        holds.set()  # the delete holds the user row FOR UPDATE
        may_go.wait(20)
        return bucket

    monkeypatch.setattr("memory.services.users.memory_version_bump", pausing)

    def run(name, work):
        try:
            results[name] = work()
        except BaseException as exc:
            results[name] = exc
        finally:
            connection.close()

    deleter = threading.Thread(target=run, args=("delete", lambda: user_delete(user=user)))
    deleter.start()
    assert holds.wait(10)
    writer = threading.Thread(target=run, args=("snapshot", lambda: snapshots.snapshot_save(newer, user.pk)))
    writer.start()
    waited = a_backend_waits_for_a_lock()
    may_go.set()
    deleter.join(30)
    writer.join(30)

    assert waited and results == {"delete": None, "snapshot": False}
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_indexsnapshot WHERE user_id = %s", [user.pk])
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db(transaction=True)
def test_one_process_at_a_time_rewrites_a_users_snapshot(alice_session):
    """While another transaction is the writer of the user's snapshot (its advisory lock), a
    flush that finds the snapshot lagging leaves it to that writer, loading and writing
    nothing; once the writer is done, it rewrites it."""
    import threading

    from django.db import transaction

    user_id = alice_session.user_id
    _add(alice_session, [f"We walked to the harbour, day {i}." for i in range(10)])
    holds, may_end = threading.Event(), threading.Event()

    def writer():
        try:
            with transaction.atomic():
                assert snapshots.snapshot_writer_lock(user_id)
                holds.set()
                may_end.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert holds.wait(10)
    try:
        meanwhile = snapshots.refresh_snapshot(user_id)
    finally:
        may_end.set()
        thread.join(10)

    assert meanwhile is False and store.snapshot_lag(user_id)[0] is None
    assert snapshots.refresh_snapshot(user_id) is True


def test_a_snapshot_follows_a_tenth_of_the_users_documents_and_a_hundredth_when_current(alice_session, settings):
    """A process that has not cached the user rewrites their snapshot only once a tenth of
    their documents (the snapshot's count) are not in it, so that a growing history is not
    written again every ``SNAPSHOT_MIN_CHANGES``; at the end of a backlog or an import
    (``current``), once a hundredth are (or ``SNAPSHOT_MIN_CHANGES``, if more)."""
    settings.MEMFUSE = {**settings.MEMFUSE, "SNAPSHOT_MIN_CHANGES": 8}
    user_id = alice_session.user_id
    _add(alice_session, [f"Note {i} about the garden." for i in range(200)])
    assert snapshots.refresh_snapshot(user_id)
    _add(alice_session, [f"Later note {i} about the roses." for i in range(15)])
    retrieval.reset_user_cache()

    assert snapshots.refresh_snapshot(user_id) is False
    assert snapshots.refresh_snapshot(user_id, current=True) is True


def test_a_snapshot_read_in_parts_of_any_size_is_the_same_index():
    """``to_parts`` cuts ``to_bytes``' output into parts of the size asked (the last one
    shorter); ``from_parts`` reads it back from any cuts and scores as the index it came from.
    A stream cut short is an error; an empty one, or one of another kind, is no snapshot."""
    rng = random.Random(3)
    sessions = [uuid.uuid4() for _ in range(3)]
    index = BM25Index(window=2, own_weight=2)
    for number in range(300):
        lexemes = {f"w{rng.randrange(60)}": rng.randint(1, 3) for _ in range(5)}
        index.add(Document(kind=MESSAGE, id=uuid.uuid4(), lexemes=lexemes, created_us=number,
                           session=sessions[number % 3], position=number // 3))  # fmt: skip
    data = index.to_bytes()
    for size in (1, 7, 4096, len(data) + 1):
        parts = list(index.to_parts(size))
        assert b"".join(parts) == data
        assert {len(part) for part in parts[:-1]} <= {size} and 0 < len(parts[-1]) <= size
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    pieces = [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)])]

    loaded = BM25Index.from_parts(iter(pieces), window=2, own_weight=2)

    assert loaded.to_bytes() == data
    query = ["w1", "w2", "w3"]
    assert loaded.search(query, limit=300) == index.search(query, limit=300) != []
    with pytest.raises(ValueError, match="ended"):
        BM25Index.from_parts(pieces[:-1], window=2, own_weight=2)
    assert BM25Index.from_parts([], window=2, own_weight=2) is None
    assert BM25Index.from_parts([b"\x89PNG\r\n", data], window=2, own_weight=2) is None


def test_a_load_holds_little_beyond_the_index_it_builds(alice_session, monkeypatch):
    """A snapshot is streamed from the database a part at a time into the index's arrays: at
    its peak, a load holds less than the snapshot's size beyond the index it returns (the
    arithmetic of the rows' context lengths, not the snapshot again as parts and as their join). Measured by ``tracemalloc``, which sees Python's and numpy's
    allocations (libpq's, which single-row mode holds to one row, it does not)."""
    monkeypatch.setattr(snapshots, "SNAPSHOT_PART_BYTES", 2000)
    _add(alice_session, [f"day {i}: a walk to the {('harbour', 'market', 'old mill')[i % 3]} with Rosa" for i in range(1200)])
    user_id = alice_session.user_id
    assert snapshots.snapshot_save(store.load(user_id), user_id)
    size = len(store.load(user_id).to_bytes())  # also warms what a first load allocates once
    tracemalloc.start()
    try:
        index = store.load(user_id)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == 1200 and size > 10 * 2000
    assert peak - held < size, (peak - held, size)


def test_deletions_a_snapshot_absorbed_make_an_older_cache_reload(alice_session):
    """A snapshot prunes the tombstones it holds; a cache that had not seen those deletions
    reloads instead of keeping the deleted messages."""
    rows = _add(alice_session, [f"pottery class {i}" for i in range(5)])
    alice = alice_session.user
    _bm25(alice, "pottery")  # cached at this version
    entry = retrieval.user_index(alice.pk)
    messages_delete(session=alice_session, message_ids=[rows[0].pk])
    index = store.load(alice.pk)
    snapshots.snapshot_save(index, alice.pk)  # another process's flush, say
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_tombstone WHERE user_id = %s", [alice.pk])
        assert cursor.fetchone()[0] == 0

    found = {key.id for key, _ in _bm25(alice, "pottery")}

    assert rows[0].pk not in found and found == {row.pk for row in rows[1:]}
    assert entry.loads == 2


def test_the_cache_evicts_by_bytes(alice_session, bob_session):
    """Entries count their bytes; the least recently used go first; one larger than the
    whole cache serves its query uncached."""
    _add(alice_session, [f"alice note {i} about lisbon" for i in range(5)])
    _add(bob_session, [f"bob note {i} about his beagle pepper and the beach" for i in range(60)])
    alice, bob = alice_session.user, bob_session.user
    _bm25(alice, "lisbon")
    _bm25(bob, "beagle")
    alice_bytes, bob_bytes = (retrieval.user_index(u.pk).nbytes for u in (alice, bob))
    assert bob_bytes > 2 * alice_bytes

    retrieval.reset_user_cache(max_bytes=bob_bytes + alice_bytes // 2)
    _bm25(alice, "lisbon")
    _bm25(bob, "beagle")  # bob's bytes push alice out
    stats = retrieval.cache_stats()
    assert retrieval.cached_user_index(alice.pk) is None and stats["evictions"] == 1
    assert stats["bytes"] <= stats["max_bytes"] and stats["size"] == 1

    retrieval.reset_user_cache(max_bytes=bob_bytes // 2)
    assert _bm25(bob, "beagle")  # served, though it does not fit
    assert retrieval.cached_user_index(bob.pk) is None
    retrieval.reset_user_cache()


def test_a_query_after_a_large_add_embeds_at_most_the_bound_and_finds_the_newest(alice_session, monkeypatch, settings):
    """After an add of 300 messages, a query embeds at most PENDING_EMBED_MAX of them (the
    newest), still finds the newest by meaning, and the oldest by its words (BM25)."""
    settings.MEMFUSE = {**settings.MEMFUSE, "PENDING_EMBED_MAX": 8}
    monkeypatch.setattr("memory.services.messages._start_embeddings", lambda *args: None)  # all on demand, counted
    submitted = []
    submit_query = registry.submit_query

    def counting(texts, **kwargs):
        submitted.extend(texts)
        return submit_query(texts, **kwargs)

    monkeypatch.setattr(registry, "submit_query", counting)
    filler = [f"Status line {i}: the build finished without errors." for i in range(298)]
    rows = _add(alice_session, ["My grandmother's recipe uses saffron."] + filler + ["I just adopted a tortoise named Atlas."])
    alice = alice_session.user
    alice.refresh_from_db()

    vector_only = retrieval.RetrievalConfig.from_settings(bm25_weight=0.0, prf_docs=0)
    newest = selectors.memory_query(MemoryQuery(user=alice, query="Which reptile did I get as a pet?", top_k=3, config=vector_only))
    oldest = selectors.memory_query(MemoryQuery(user=alice, query="saffron recipe", top_k=1))

    assert newest[0]["id"] == str(rows[-1].pk)
    assert oldest[0]["id"] == str(rows[0].pk)
    assert len(set(submitted)) <= 2 + 8  # the two queries, and the bound (asked by both, embedded once)


def test_adds_without_queries_keep_at_most_the_bound_of_pending_embeddings(alice_session, settings, monkeypatch):
    """Each add starts embedding its newest messages for the next query; a user who only adds
    keeps no more than RECENT_EMBEDDINGS_PER_USER of them, the newest among them, and at most
    PENDING_EMBED_MAX of them queued for the model."""
    settings.MEMFUSE = {**settings.MEMFUSE, "PENDING_EMBED_MAX": 4, "RECENT_EMBEDDINGS_PER_USER": 6}
    monkeypatch.setattr(registry, "_recent", None)  # made again with the setting
    added = []
    for i in range(5):
        added += _add(alice_session, [f"line {i}-{j}" for j in range(3)])
        assert registry.read_ahead_queued(user_id=alice_session.user_id) <= 4

    texts = [row.index_text for row in added]
    held = registry.recent_query_embeddings(texts, scope=alice_session.user_id, wait_seconds=10)

    # The newest are held; which older ones are depends on what the model had taken already
    # (a call under way cannot be cancelled) when a later add passed the read-ahead's bound.
    assert set(texts[-4:]) <= set(held) and len(held) <= 6
    assert registry.stats()["recent_embeddings"]["entries"] <= 6
