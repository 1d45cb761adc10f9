"""The process-wide model registry: one load under concurrency, when a process preloads, the real model, checks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from django.conf import settings

import manage
from memory import checks, inference, startup
from memory.inference import builders, model_registry, registry
from runtime import roles
from tests.subprocesses import subprocess_env


class CountingDeterministicEmbedder:
    """A stand-in model: slow to construct (0.2 s), counts constructions, hash-based unit vectors."""

    constructed = 0
    _count_lock = threading.Lock()

    def __init__(self, path, *, batch_size: int, threads: int) -> None:
        time.sleep(0.2)  # wide window for a second thread to race the first load
        with CountingDeterministicEmbedder._count_lock:
            CountingDeterministicEmbedder.constructed += 1
        self.path = path
        self.dimension = 8
        self.stats = inference.ModelStats(load_seconds=0.2)

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = [
            np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8).astype(np.float32) + 1 for t in texts
        ]
        vectors = np.array(rows, dtype=np.float32).reshape(len(texts), self.dimension)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry whose model class is ``CountingDeterministicEmbedder``; restored afterwards."""
    monkeypatch.setattr(registry, "_embedder", None)
    monkeypatch.setattr(registry, "_batcher", None)
    monkeypatch.setattr(registry, "_query_embedder", None)
    monkeypatch.setattr(registry, "_query_batcher", None)
    monkeypatch.setattr(registry, "_recent", None)  # the stand-in's vectors stay in this test
    monkeypatch.setattr(registry, "_background_batcher", None)
    monkeypatch.setattr(registry, "_local_document_embedder", None)
    monkeypatch.setattr(builders, "Embedder", CountingDeterministicEmbedder)
    monkeypatch.setattr(CountingDeterministicEmbedder, "constructed", 0)
    return registry


def test_concurrent_first_use_loads_the_model_once(fresh_registry):
    """16 threads asking for the model at once all get one instance, constructed exactly once."""
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    got: list = [None] * threads_count
    errors: list[BaseException] = []

    def first_use(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            got[index] = fresh_registry.get_embedder()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert all(isinstance(e, CountingDeterministicEmbedder) for e in got)
    assert len({id(e) for e in got}) == 1
    assert CountingDeterministicEmbedder.constructed == 1
    assert fresh_registry.loaded_embedder() is got[0]


def test_embed_goes_through_the_loaded_model(fresh_registry):
    """registry.embed uses the registry's model: deterministic output of the stand-in."""
    first = fresh_registry.embed(["a", "b"])
    again = fresh_registry.embed(["a"])

    assert first.shape == (2, 8)
    np.testing.assert_array_equal(first[0], again[0])
    assert CountingDeterministicEmbedder.constructed == 1


def test_stats_before_any_load_report_no_model(fresh_registry):
    """Before first use, stats name no model and loaded_embedder() does not load one."""
    assert fresh_registry.loaded_embedder() is None
    assert fresh_registry.stats() == {
        "embedding": None, "query_embedding": None, "background_embedding": None, "reranker": None, "recent_embeddings": None
    }
    assert CountingDeterministicEmbedder.constructed == 0


# --- which processes preload -------------------------------------------------------------------


@pytest.fixture
def preload_enabled(monkeypatch):
    monkeypatch.setitem(settings.MEMFUSE, "PRELOAD_MODELS", True)
    monkeypatch.delenv("RUN_MAIN", raising=False)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["manage.py", "migrate"], None),
        (["manage.py", "check"], None),
        (["manage.py", "shell"], None),
        (["manage.py"], None),
        (["manage.py", "runserver", "--noreload"], roles.WEB),
        (["manage.py", "runserver"], None),  # the autoreloader's parent only watches files
        (["manage.py", "runworker", "memfuse-flush"], roles.WORKER),
        (["manage.py", "locomo_eval"], None),  # a tool declares itself (roles.TOOL)
    ],
)
def test_manage_py_declares_only_its_serving_commands(preload_enabled, argv, expected):
    """manage.py declares a role for runserver and runworker only; migrate, check, shell do not."""
    assert manage.serving_role(argv) == expected


def test_runserver_child_serves(preload_enabled, monkeypatch):
    """runserver with the autoreloader serves only in its child (RUN_MAIN=true)."""
    monkeypatch.setenv("RUN_MAIN", "true")

    assert manage.serving_role(["manage.py", "runserver"]) == roles.WEB


def test_an_undeclared_process_preloads_nothing(fresh_registry, preload_enabled):
    """A process whose entry point declared no role (tests, migrate) loads no model at start."""
    startup.load_models()

    assert CountingDeterministicEmbedder.constructed == 0
    assert fresh_registry.stats() == {
        "embedding": None, "query_embedding": None, "background_embedding": None, "reranker": None, "recent_embeddings": None
    }


def test_an_unknown_role_is_refused():
    """declare() names the roles it knows rather than serving something undefined."""
    with pytest.raises(ValueError, match="web, worker, tool"):
        roles.declare("everything")
    assert roles.role() is None


@pytest.mark.parametrize(
    "role, mode, layer, expected",
    [
        (None, "auto", "channels.layers.InMemoryChannelLayer", False),
        (roles.WEB, "auto", "channels.layers.InMemoryChannelLayer", True),
        (roles.WEB, "auto", "channels_redis.core.RedisChannelLayer", False),
        (roles.WEB, "on", "channels_redis.core.RedisChannelLayer", True),
        (roles.WORKER, "auto", "channels_redis.core.RedisChannelLayer", True),
        (roles.WORKER, "off", "channels_redis.core.RedisChannelLayer", False),
        (roles.TOOL, "on", "channels.layers.InMemoryChannelLayer", False),
    ],
)
def test_flush_workers_run_where_the_role_and_flush_in_process_say(monkeypatch, role, mode, layer, expected):
    """runworker flushes; a web server with the in-memory layer (or FLUSH_IN_PROCESS=on); tools never."""
    monkeypatch.setattr(roles, "_role", role)
    monkeypatch.setitem(settings.BUFFERS, "IN_PROCESS", mode)
    monkeypatch.setitem(settings.CHANNEL_LAYERS["default"], "BACKEND", layer)

    assert roles.runs_flush_workers() is expected


@pytest.mark.parametrize("documents_int8, own_model", [(False, 1), (True, 0)])
def test_servers_preload_a_query_process_and_runworker_none(fresh_registry, preload_enabled, monkeypatch, documents_int8, own_model):
    """A server spawns the query process and, as it flushes, the background one, and waits
    for both; runworker, which only flushes, loads no query model. Either loads the full
    model itself only when documents are embedded by it (DOCUMENT_EMBEDDING_INT8 off): else
    every model is in an inference process."""
    spawned, waited = [], []

    class RecordingProcessEmbedder:
        def __init__(self, path, **options):
            spawned.append(options.get("role", "background"))

        def wait_ready(self):
            waited.append(True)

    monkeypatch.setattr(builders, "ProcessEmbedder", RecordingProcessEmbedder)  # what is spawned
    monkeypatch.setattr(model_registry, "ProcessEmbedder", RecordingProcessEmbedder)  # what is waited for
    monkeypatch.setitem(settings.MEMFUSE, "QUERY_EMBEDDING", "process")
    monkeypatch.setitem(settings.MEMFUSE, "DOCUMENT_EMBEDDING_INT8", documents_int8)

    roles.declare(roles.WORKER)
    startup.load_models()
    assert CountingDeterministicEmbedder.constructed == own_model and spawned == ["background"] and len(waited) == 1

    roles.declare(roles.WEB)  # the background process is the one the worker started
    startup.load_models()
    assert spawned == ["background", "query"] and len(waited) == 3
    assert CountingDeterministicEmbedder.constructed == own_model


def test_preload_can_be_switched_off(fresh_registry, monkeypatch):
    """PRELOAD_MODELS=False: not even a server preloads."""
    monkeypatch.setitem(settings.MEMFUSE, "PRELOAD_MODELS", False)

    roles.declare(roles.WEB)
    startup.load_models()

    assert CountingDeterministicEmbedder.constructed == 0 and fresh_registry.stats()["query_embedding"] is None


def test_reset_forgets_every_model_and_stops_its_processes(fresh_registry, monkeypatch):
    """reset() empties every slot and closes the child processes it held; the next use builds anew."""
    closed = []

    class ClosingProcessEmbedder:
        dimension = 8

        def __init__(self, path, **options):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(builders, "ProcessEmbedder", ClosingProcessEmbedder)  # what is spawned
    monkeypatch.setattr(model_registry, "ProcessEmbedder", ClosingProcessEmbedder)  # what is closed
    monkeypatch.setitem(settings.MEMFUSE, "QUERY_EMBEDDING", "process")
    first = fresh_registry.get_embedder()
    query = fresh_registry.get_query_embedder()

    fresh_registry.reset()

    assert closed == [True] and fresh_registry.loaded_embedder() is None
    assert all(getattr(fresh_registry, slot) is None for slot in model_registry.SLOTS)
    assert fresh_registry.get_embedder() is not first and fresh_registry.get_query_embedder() is not query


# --- the real model ----------------------------------------------------------------------------


def test_real_model_embeds_unit_norm_float32_rows():
    """The real model gives (n, 384) float32 rows of unit length; similar texts are closer."""
    vectors = registry.embed(["a", "b"])
    dog, puppy, tax = registry.embed(["a dog barks", "a puppy yaps", "income tax return"])

    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), [1.0, 1.0], atol=1e-5)
    assert float(dog @ puppy) > float(dog @ tax)


def test_direct_transformer_call_gives_sentence_transformers_embeddings():
    """Embedder calls the transformer itself (no encode); rows equal encode's, in input order."""
    embedder = registry.get_embedder()
    texts = ["a", "A much longer sentence about a hike along the glacier with my sister.", "two words", ""]

    assert embedder.transformer is not None  # all-MiniLM-L6-v2 is transformer + mean pooling + normalise
    expected = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(embedder.embed(texts), expected, atol=1e-5)


@pytest.fixture
def query_mode(monkeypatch, settings):
    """Set QUERY_EMBEDDING (and QUERY_EMBEDDING_INT8) with an empty query slot of the registry;
    a query process started here is closed and the process's own embedder restored afterwards."""
    monkeypatch.setattr(registry, "_query_embedder", None)
    monkeypatch.setattr(registry, "_query_batcher", None)
    monkeypatch.setattr(registry, "_recent", None)

    def set_mode(mode: str, *, int8: bool = True):
        settings.MEMFUSE = {**settings.MEMFUSE, "QUERY_EMBEDDING": mode, "QUERY_EMBEDDING_INT8": int8}
        return registry

    yield set_mode
    if isinstance(registry._query_embedder, inference.ProcessEmbedder):
        registry._query_embedder.close()


@pytest.fixture(scope="module")
def int8_query_embedder():
    """An in-process int8 ``QueryEmbedder`` of the registry's model (the "thread" mode's)."""
    return inference.QueryEmbedder(registry.get_embedder())


@pytest.mark.integration
def test_queries_are_embedded_in_a_child_process_by_the_traced_int8_model(query_mode, int8_query_embedder):
    """Default QUERY_EMBEDDING="process": embed_query runs in another process at normal
    priority, gives the in-process int8 query model's embeddings (near the full model's, not
    equal), and counts apart from the full model."""
    registry = query_mode("process")
    texts = ["When did Caroline go to the LGBTQ support group?", "What did Melanie paint recently?"]
    full = registry.embed(texts)
    before = registry.stats()["embedding"]["texts"]

    queries = registry.embed_query(texts)

    stats = registry.stats()["query_embedding"]
    assert stats["mode"] == "process" and stats["pid"] not in (None, os.getpid())
    assert stats["int8"] is True and stats["torchscript"] is True and stats["texts"] == 2
    assert os.getpriority(os.PRIO_PROCESS, stats["pid"]) == 0
    assert os.sched_getscheduler(stats["pid"]) == os.SCHED_OTHER
    assert registry.stats()["embedding"]["texts"] == before  # not the full model
    np.testing.assert_allclose(queries, int8_query_embedder.embed(texts), atol=1e-5)
    cosines = (full * queries).sum(axis=1)
    assert np.all(cosines > 0.95) and np.all(cosines < 0.9999)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), [1.0, 1.0], atol=1e-5)


@pytest.mark.integration
def test_a_killed_query_process_answers_503_once_and_is_replaced(query_mode, api, alice):
    """SIGKILL of the query process: the query under way answers 503 with Retry-After, in the
    error shape; the next query starts a new process and is answered."""
    registry = query_mode("process")
    registry.embed_query(["warm"])
    first_pid = registry.stats()["query_embedding"]["pid"]
    os.kill(first_pid, signal.SIGKILL)
    time.sleep(0.2)

    lost = api.post(f"/api/v1/users/{alice.pk}/query", {"query": "anything"}, format="json")
    again = api.post(f"/api/v1/users/{alice.pk}/query", {"query": "anything"}, format="json")

    assert lost.status_code == 503 and lost["Retry-After"]
    assert lost.json()["status"] == "error" and "embedding" in lost.json()["message"]
    assert again.status_code == 200
    assert registry.stats()["query_embedding"]["pid"] not in (None, first_pid)


def test_a_text_embedded_a_moment_ago_for_the_same_user_is_not_embedded_again(fresh_registry, query_mode, settings, monkeypatch):
    """The query model's one-text calls are remembered by user and text (RECENT_EMBEDDINGS):
    the same text again for the same user gets the same rows without a model call, and the
    flush's lookup finds it; another user's call, an unscoped one, and a call after a failure
    reach the model; with RECENT_EMBEDDINGS 0 every call does."""
    registry = query_mode("thread", int8=False)
    model = registry.get_embedder()
    calls: list[list[str]] = []
    real_embed = model.embed
    failing = {"broken"}

    def counted(texts):
        calls.append(list(texts))
        if failing & set(texts):
            raise RuntimeError("model failed")
        return real_embed(texts)

    monkeypatch.setattr(model, "embed", counted)
    said = "I adopted a grey kitten named Ash."

    first = registry.submit_query([said], scope="alice").result()
    again = registry.submit_query([said], priority=registry.BACKGROUND, scope="alice").result()
    registry.submit_query([said], scope="bob").result()
    registry.submit_query([said]).result()
    with pytest.raises(RuntimeError):
        registry.submit_query(["broken"], scope="alice").result()
    failing.clear()
    recovered = registry.submit_query(["broken"], scope="alice").result()

    assert calls == [[said], [said], [said], ["broken"], ["broken"]]
    np.testing.assert_array_equal(first, again)
    assert set(registry.recent_query_embeddings([said, "never asked"], scope="alice")) == {said}
    assert set(registry.recent_query_embeddings([said], scope="carol")) == set()
    np.testing.assert_array_equal(recovered, real_embed(["broken"]))

    settings.MEMFUSE = {**settings.MEMFUSE, "RECENT_EMBEDDINGS": 0}
    registry._recent = None  # made again with the setting
    registry.submit_query(["twice"], scope="alice").result()
    registry.submit_query(["twice"], scope="alice").result()
    assert calls[-2:] == [["twice"], ["twice"]]
    assert registry.recent_query_embeddings(["twice"], scope="alice") == {}


def test_a_finished_recent_call_is_held_as_its_own_rows():
    """A recent call under way is the caller's future; once done, the memo holds a copy of its
    rows only (not the future, nor the batch array the rows are a view of), and hands out a
    done future of them; a failed call is forgotten."""
    from concurrent.futures import Future

    from memory.inference.recent import RecentEmbeddings

    recent = RecentEmbeddings(maxsize=8, per_scope=8)
    batch = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    under_way, failing = Future(), Future()
    recent.put("alice", "hello", under_way)
    recent.put("alice", "broken", failing)
    assert recent.get("alice", "hello") is under_way

    under_way.set_result(batch[1:2])
    failing.set_exception(RuntimeError("model failed"))
    held = recent._scopes["alice"][recent._key("hello")]
    later = recent.get("alice", "hello")

    assert isinstance(held, np.ndarray) and held.base is None
    assert later is not under_way and later.done()
    np.testing.assert_array_equal(later.result(), batch[1:2])
    assert recent.get("alice", "broken") is None and recent.get("bob", "hello") is None


def test_recent_calls_check_warns_when_a_user_cannot_hold_a_querys_pending_messages(monkeypatch):
    """System check memory.W001 fires when a user's recent calls hold fewer than
    PENDING_EMBED_MAX embeddings, not when they hold enough or none at all."""
    monkeypatch.setitem(settings.MEMFUSE, "PENDING_EMBED_MAX", 16)
    monkeypatch.setitem(settings.MEMFUSE, "RECENT_EMBEDDINGS_PER_USER", 8)
    assert [w.id for w in checks.check_recent_embeddings()] == ["memory.W001"]

    monkeypatch.setitem(settings.MEMFUSE, "RECENT_EMBEDDINGS_PER_USER", 0)
    assert checks.check_recent_embeddings() == []
    monkeypatch.setitem(settings.MEMFUSE, "RECENT_EMBEDDINGS_PER_USER", 64)
    assert checks.check_recent_embeddings() == []


def test_recent_calls_are_bounded_per_user_and_in_all():
    """A user's flood of texts keeps at most ``per_scope`` of theirs, the newest, and leaves
    the others' alone; past the bound in all, the least recently used user's go first;
    ``forget`` drops a user's (known by their id as text or UUID)."""
    from concurrent.futures import Future

    from memory.inference.recent import RecentEmbeddings

    def done() -> Future:
        future = Future()
        future.set_result(np.ones((1, 4), dtype=np.float32))
        return future

    alice = uuid.uuid4()
    recent = RecentEmbeddings(maxsize=4, per_scope=2)
    for text in "abc":
        recent.put(alice, text, done())
    recent.put("bob", "x", done())
    assert [text for text in "abc" if recent.get(alice, text) is not None] == ["b", "c"]  # alice used last
    recent.put("carol", "y", done())
    recent.put("carol", "z", done())  # five entries: bob, the least recently used, goes

    assert recent.get("bob", "x") is None and recent.get(str(alice), "c") is not None
    recent.forget(alice)
    assert recent.get(alice, "c") is None
    assert recent.stats() == {"entries": 2, "under_way": 0, "users": 1, "max_entries": 4, "max_per_user": 2}


@pytest.mark.integration
def test_the_query_process_embeds_concurrent_calls_on_one_model(query_mode, settings, int8_query_embedder):
    """QUERY_EMBEDDING_CONCURRENCY 2: one child process, two calls at once (each on its own
    pipe and thread), each text's embedding exactly the one-at-a-time int8 model's; a killed
    child fails the call under way, and the next call starts a new one."""
    settings.MEMFUSE = {**settings.MEMFUSE, "QUERY_EMBEDDING_CONCURRENCY": 2}
    registry = query_mode("process")
    texts = [f"Turn {i}: we talked about the trail by the lake and the weather on Sunday." for i in range(24)]
    embedder = registry.get_query_embedder()
    embedder.wait_ready()
    results: dict[int, np.ndarray] = {}

    def embed_every_other(start: int) -> None:
        for i in range(start, len(texts), 2):
            results[i] = embedder.embed([texts[i]])[0]

    threads = [threading.Thread(target=embed_every_other, args=(start,)) for start in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert embedder.concurrency == 2 and registry.stats()["query_embedding"]["concurrency"] == 2
    np.testing.assert_allclose(np.array([results[i] for i in range(len(texts))]), int8_query_embedder.embed(texts), atol=1e-6)
    first_pid = embedder.pid
    os.kill(first_pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(inference.EmbeddingProcessError):
        embedder.embed(["anything"])
    assert embedder.embed(["anything"]).shape == (1, 384) and embedder.pid not in (None, first_pid)


def test_thread_mode_embeds_queries_with_an_int8_copy_in_this_process(query_mode):
    """QUERY_EMBEDDING="thread": the int8 QueryEmbedder of this process's model, sharing its
    token embedding table; with QUERY_EMBEDDING_INT8 off, the model itself."""
    registry = query_mode("thread")
    texts = ["When did Caroline go to the LGBTQ support group?"]
    full = registry.embed(texts)

    queries = registry.embed_query(texts)

    assert isinstance(registry.get_query_embedder(), inference.QueryEmbedder)
    assert registry.stats()["query_embedding"]["mode"] == "thread"
    assert 0.95 < float(full[0] @ queries[0]) < 0.9999
    np.testing.assert_array_equal(registry.embed(texts), full)  # the full model is left as it was
    token_embeddings = registry.get_query_embedder().quantized.embeddings.word_embeddings
    assert token_embeddings is registry.get_embedder().transformer.embeddings.word_embeddings  # shared
    query_mode("thread", int8=False)
    registry._query_embedder = None
    assert registry.get_query_embedder() is registry.get_embedder()


def test_query_embedder_runs_a_trace_equal_to_the_int8_model_with_and_without_padding(int8_query_embedder):
    """The query embedder calls a TorchScript trace of its int8 model; one query, and a batch
    whose shorter texts are padded, embed as the eager int8 model embeds them."""
    query_embedder = int8_query_embedder
    texts = ["hi", "When did Caroline go to the LGBTQ support group after her talk at the school?", "What did Melanie paint?"]

    assert query_embedder.traced and isinstance(query_embedder.transformer, inference.TracedEncoder)
    padded = query_embedder.embedder._mean_pooled(texts, query_embedder.quantized)
    traced = query_embedder.embedder._mean_pooled(texts, query_embedder.transformer)
    np.testing.assert_allclose(traced, padded, atol=1e-5)  # the padding path was traced
    for text in texts:
        alone = query_embedder.embedder._mean_pooled([text], query_embedder.quantized)
        np.testing.assert_allclose(query_embedder.embed([text]), alone, atol=1e-5)


def test_a_query_embeds_the_same_whatever_queries_share_its_batch(int8_query_embedder):
    """int8 activations are scaled per batch; queries are embedded one by one, so a query's
    embedding (and results) do not depend on the other queries of its model call."""
    query_embedder = int8_query_embedder
    texts = ["hi", "When did Caroline go to the LGBTQ support group after her talk at the school?"]

    together = query_embedder.embed(texts)

    np.testing.assert_array_equal(together[0], query_embedder.embed(texts[:1])[0])
    np.testing.assert_array_equal(together[1], query_embedder.embed(texts[1:])[0])
    padded = query_embedder.embedder._mean_pooled(texts, query_embedder.quantized)[0]
    assert float(padded @ together[0]) < 0.9999  # what a shared batch would have given


def test_traced_encoder_refuses_a_trace_that_differs_from_its_model():
    """A model whose output depends on something the trace fixes as a constant (here a Python
    counter) is refused at build time rather than served wrong."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    class Drifting(torch.nn.Module):
        calls = 0

        def forward(self, input_ids, attention_mask, token_type_ids):
            self.calls += 1  # a Python number: the trace keeps the value it saw
            return BaseModelOutput(last_hidden_state=input_ids.unsqueeze(-1).float() * self.calls)

    with pytest.raises(ValueError, match="differs"):
        inference.TracedEncoder(Drifting(), registry.get_embedder().model.tokenizer)


def test_real_model_embeds_nothing_for_no_texts():
    """Embedding an empty list returns a (0, 384) float32 array without calling the model."""
    registry.get_embedder()
    before = registry.stats()["embedding"]

    empty = registry.embed([])

    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert registry.stats()["embedding"]["calls"] == before["calls"]


def test_stats_count_calls_and_texts():
    """stats() counts model calls and texts embedded, and names the loaded model."""
    registry.embed(["warm up"])
    before = registry.stats()["embedding"]

    registry.embed(["one", "two", "three"])
    registry.embed(["four"])

    after = registry.stats()["embedding"]
    assert after["calls"] - before["calls"] == 2
    assert after["texts"] - before["texts"] == 4
    assert after["dimension"] == 384
    assert after["path"] == str(inference.default_model_path())
    assert after["inference_seconds"] >= before["inference_seconds"]
    assert registry.stats()["reranker"] is None


# --- system checks -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_pgvector_check_passes_on_this_database():
    """memory's database check finds pgvector and a matching dimension: no errors."""
    assert checks.check_pgvector(databases=["default"]) == []


def test_pgvector_check_skipped_without_databases():
    """Without --database the check does not touch the database."""
    assert checks.check_pgvector(databases=None) == []


def test_pgvector_check_reports_a_dimension_mismatch(db, monkeypatch):
    """An EMBEDDING_DIM that differs from the model's dimension is error memory.E002."""
    monkeypatch.setitem(settings.MEMFUSE, "EMBEDDING_DIM", 768)

    errors = checks.check_pgvector(databases=["default"])

    assert [e.id for e in errors] == ["memory.E002"]


@pytest.mark.django_db
def test_manage_py_check_does_not_load_the_model():
    """`manage.py check --database default` passes without loading the embedding model (a subprocess, ~3 s)."""
    env = subprocess_env(PYTHONUNBUFFERED="1")

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--database", "default"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output
    assert "embedding model loaded" not in output


# --- background (flush) inference ---------------------------------------------------------------


def test_background_mode_thread_uses_the_process_model(fresh_registry, settings):
    """BACKGROUND_EMBEDDING="thread": flush inference runs on this process's model."""
    settings.MEMFUSE = {**settings.MEMFUSE, "BACKGROUND_EMBEDDING": "thread", "DOCUMENT_EMBEDDING_INT8": False}
    vectors = fresh_registry.embed(["a", "b"], priority=fresh_registry.BACKGROUND)
    assert CountingDeterministicEmbedder.constructed == 1
    assert np.allclose(vectors, fresh_registry.get_embedder().embed(["a", "b"]))
    assert fresh_registry.stats()["background_embedding"] == {"mode": "thread"}


@pytest.fixture
def background_process(monkeypatch, settings):
    """The default background mode ("process") with a fresh child, closed afterwards."""
    settings.MEMFUSE = {**settings.MEMFUSE, "BACKGROUND_EMBEDDING": "process"}
    monkeypatch.setattr(registry, "_background_batcher", None)
    yield registry
    batcher = registry._background_batcher
    if batcher is not None:
        batcher.embedder.close()


@pytest.mark.integration
def test_background_inference_runs_in_a_child_process_with_the_same_model(background_process):
    """Flush inference happens in another process and gives the query model's vectors (the
    documents' model, DOCUMENT_EMBEDDING_INT8)."""
    texts = ["I adopted a puppy named Biscuit.", "My sister lives in Lisbon."]
    vectors = background_process.embed(texts, priority=registry.BACKGROUND)
    stats = background_process.stats()["background_embedding"]
    assert stats["mode"] == "process" and stats["pid"] not in (None, os.getpid())
    assert stats["calls"] == 1 and stats["texts"] == 2
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, registry.embed_documents(texts), atol=1e-5)
    # Below requests: niced, and in Linux's idle scheduling class.
    assert os.getpriority(os.PRIO_PROCESS, stats["pid"]) == settings.MEMFUSE["EMBEDDING_NICE"] == 19
    assert os.sched_getscheduler(stats["pid"]) == os.SCHED_IDLE


@pytest.mark.integration
def test_starting_the_background_process_waits_for_its_model(background_process):
    """start_background_embedder (a serving process's start) returns once the child has loaded
    its model, before any flush: a model that cannot load fails there, not at the first flush."""
    background_process.start_background_embedder()

    stats = background_process.stats()["background_embedding"]
    assert stats["pid"] not in (None, os.getpid()) and stats["load_seconds"] > 0 and stats["calls"] == 0


@pytest.mark.integration
def test_a_killed_background_process_fails_one_call_and_is_replaced(background_process):
    """SIGKILL of the child: the call under way raises EmbeddingProcessError, the next starts a new child."""
    background_process.embed(["warm"], priority=registry.BACKGROUND)
    first_pid = background_process.stats()["background_embedding"]["pid"]
    os.kill(first_pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(inference.EmbeddingProcessError):
        background_process.embed(["lost"], priority=registry.BACKGROUND)
    vectors = background_process.embed(["again"], priority=registry.BACKGROUND)
    assert vectors.shape == (1, 384)
    assert background_process.stats()["background_embedding"]["pid"] not in (None, first_pid)


# --- the reranker ------------------------------------------------------------------------------


def _write_config(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "make_path, problem",
    [
        (lambda tmp: tmp / "missing", "is not a directory"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no readable config.json"),
        (lambda tmp: _write_config(tmp / "three", num_labels=3), "3 labels"),
        (lambda tmp: _write_config(tmp / "no-weights", num_labels=1), "could not be loaded"),
    ],
    ids=["missing", "no-config", "three-labels", "no-weights"],
)
def test_bad_reranker_path_is_a_clear_load_error(tmp_path, make_path, problem):
    """A path without a one-label cross-encoder raises RerankerLoadError naming the path and the problem."""
    path = make_path(tmp_path)

    with pytest.raises(inference.RerankerLoadError, match=problem) as raised:
        inference.Reranker(path, batch_size=8, threads=1, max_length=64)

    assert str(path) in str(raised.value)


def test_reranker_check_names_a_bad_path(monkeypatch, tmp_path):
    """System check memory.E004 fires for a configured path without a model, not for none or a good one."""
    monkeypatch.setitem(settings.MEMFUSE, "RERANKER_MODEL_PATH", "")
    assert checks.check_reranker() == []

    monkeypatch.setitem(settings.MEMFUSE, "RERANKER_MODEL_PATH", str(tmp_path / "missing"))
    errors = checks.check_reranker()
    assert [e.id for e in errors] == ["memory.E004"]
    assert "missing" in errors[0].msg


def test_reranker_check_accepts_a_cross_encoder(reranker_path):
    """The tiny cross-encoder passes the check, which reads no weights (nothing gets loaded)."""
    assert checks.check_reranker() == []
    assert registry.stats()["reranker"] is None


def test_serving_process_with_a_bad_reranker_path_fails_at_start(monkeypatch, tmp_path):
    """A serving process loads the reranker at start: a bad path stops it there, not at its first query."""
    monkeypatch.setitem(settings.MEMFUSE, "RERANKER_MODEL_PATH", str(tmp_path / "missing"))
    monkeypatch.setitem(settings.MEMFUSE, "PRELOAD_MODELS", True)
    monkeypatch.setattr(registry, "_reranker", None)

    roles.declare(roles.WEB)
    with pytest.raises(inference.RerankerLoadError, match="not a directory"):
        startup.load_models()


def test_reranker_loads_once_scores_and_reports_stats(reranker_path):
    """The configured cross-encoder is loaded into the registry once; stats count its calls and pairs."""
    first = registry.get_reranker()
    scores = registry.rerank_scores("garden", ["I planted basil.", "My dog is a beagle.", "Tomatoes grow."])

    assert registry.get_reranker() is first
    assert scores.shape == (3,) and scores.dtype == np.float32
    stats = registry.stats()["reranker"]
    assert stats["path"] == str(reranker_path)
    assert (stats["calls"], stats["texts"]) == (1, 3)


def test_no_reranker_configured_means_none_and_scoring_is_an_error(monkeypatch):
    """Without RERANKER_MODEL_PATH there is no reranker; asking it to score says what is missing."""
    monkeypatch.setitem(settings.MEMFUSE, "RERANKER_MODEL_PATH", "")

    assert registry.get_reranker() is None
    with pytest.raises(inference.RerankerLoadError, match="RERANKER_MODEL_PATH"):
        registry.rerank_scores("q", ["text"])


@pytest.mark.django_db
def test_manage_py_check_fails_on_a_bad_reranker_path(tmp_path):
    """`manage.py check` with RERANKER_MODEL_PATH naming no model exits non-zero with memory.E004 (~3 s)."""
    env = subprocess_env(RERANKER_MODEL_PATH=str(tmp_path / "missing"))

    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode != 0
    assert "memory.E004" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["BACKGROUND_EMBEDDING", "QUERY_EMBEDDING"])
def test_embedding_mode_check_names_a_bad_mode(monkeypatch, name):
    """System check memory.E003 names an inference mode that is neither process nor thread."""
    assert checks.check_background_embedding(None) == []
    monkeypatch.setitem(settings.MEMFUSE, name, "gpu")

    errors = checks.check_background_embedding(None)

    assert [e.id for e in errors] == ["memory.E003"] and name in errors[0].msg and "'gpu'" in errors[0].msg


@pytest.mark.parametrize(
    "name, value",
    [("FUSION", "borda"), ("RRF_K", 0), ("VECTOR_PRF_WEIGHT", -1.0), ("RERANK_TOP_N", 0), ("VECTOR_CONTEXT_TURNS", -1),
     ("VECTOR_OWN_WEIGHT", 0)],
)
def test_retrieval_settings_check_names_a_bad_value(monkeypatch, name, value):
    """System check memory.E005 names a retrieval setting no query could run with."""
    assert checks.check_retrieval_settings() == []
    monkeypatch.setitem(settings.MEMFUSE, name, value)

    errors = checks.check_retrieval_settings()

    assert [e.id for e in errors] == ["memory.E005"] and name in errors[0].msg


@pytest.mark.parametrize("name", ["API_RATE_LIMIT", "API_TENANT_RATE_LIMIT"])
@pytest.mark.parametrize("value", ["100", "100/minutes", "0/second", "ten/minute", "100/Minute"])
def test_rate_limit_check_names_a_rate_no_request_could_be_counted_with(monkeypatch, name, value):
    """System check memory.E006: API_RATE_LIMIT and API_TENANT_RATE_LIMIT must read as <n>/<second|minute|hour|day>."""
    assert checks.check_rate_limit() == []
    monkeypatch.setitem(settings.MEMFUSE, name, value)

    errors = checks.check_rate_limit()

    assert [e.id for e in errors] == ["memory.E006"] and errors[0].msg.startswith(f"{name} is ")


def test_a_promoted_background_request_runs_before_the_queued_background_work():
    """A background request a caller now waits for, promoted, is embedded before the
    background requests queued ahead of it, once; the others still all come back."""
    from memory.inference import BACKGROUND, EmbeddingBatcher

    order, release = [], threading.Event()

    class Recording:
        dimension = 2

        def embed(self, texts):
            release.wait(5)
            order.extend(texts)
            return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = EmbeddingBatcher(Recording(), max_texts=1)
    blocker = batcher.submit(["first"], priority=BACKGROUND)  # holds the model thread
    time.sleep(0.1)
    queued = [batcher.submit([f"background {i}"], priority=BACKGROUND) for i in range(3)]
    wanted = batcher.submit(["wanted"], priority=BACKGROUND)
    batcher.promote(wanted, ["wanted"])
    release.set()

    for future in [blocker, *queued, wanted]:
        future.result(timeout=5)
    assert order == ["first", "wanted", "background 0", "background 1", "background 2"]


def test_a_promoted_read_ahead_is_never_cancelled_and_a_cancelled_one_is_asked_again():
    """Past a bound the oldest bounded request is cancelled; promoting it then says so (the
    caller asks again), while a promoted request leaves its bounds and is never cancelled."""
    from memory.inference import BACKGROUND, EmbeddingBatcher

    release = threading.Event()

    class Gated:
        dimension = 2

        def embed(self, texts):
            release.wait(5)
            return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = EmbeddingBatcher(Gated(), max_texts=1)
    blocker = batcher.submit(["first"])  # holds the model thread
    bound = [("alice", 1)]
    oldest = batcher.submit(["oldest"], priority=BACKGROUND, bounds=bound)
    wanted = batcher.submit(["wanted"], priority=BACKGROUND, bounds=bound)
    promoted = batcher.promote(wanted, ["wanted"])
    newest = batcher.submit(["newest"], priority=BACKGROUND, bounds=bound)
    release.set()

    assert oldest.cancelled() and not batcher.promote(oldest, ["oldest"])
    assert promoted and wanted.result(timeout=5) is not None
    assert newest.result(timeout=5) is not None and blocker.result(timeout=5) is not None
    assert batcher.queued("alice") == 0


def test_a_flood_of_adds_keeps_at_most_the_read_ahead_bound_queued(
    alice_session, bob_session, globex_session, settings, monkeypatch, django_capture_on_commit_callbacks
):
    """While the query model is busy, a flood of adds leaves at most PENDING_EMBED_MAX
    read-ahead requests of a user and READ_AHEAD_MAX of a tenant queued; the others are
    cancelled and never embedded; a query that wants a cancelled one embeds it on demand."""
    from memory.inference import EmbeddingBatcher
    from memory.models import Message
    from memory.retrieval import cache, vector
    from memory.services.messages import MessageIn, messages_add

    settings.MEMFUSE = {**settings.MEMFUSE, "PENDING_EMBED_MAX": 4, "READ_AHEAD_MAX": 6}
    embedded, release = [], threading.Event()

    class Gated:
        dimension = 4

        def embed(self, texts):
            release.wait(10)
            embedded.extend(texts)
            return np.full((len(texts), 4), 0.5, dtype=np.float32)

    batcher = EmbeddingBatcher(Gated(), max_texts=1)
    monkeypatch.setattr(registry, "_query_batcher", batcher)
    monkeypatch.setattr(registry, "_recent", None)
    cache.reset_user_cache()
    blocker = batcher.submit(["blocker"])
    while not blocker.running():
        time.sleep(0.01)

    speakers = {alice_session.pk: "alice", bob_session.pk: "bob", globex_session.pk: "globex"}
    last_add = {}
    for i in range(20):
        for session in (alice_session, bob_session, globex_session):
            turns = [MessageIn(role="user", content=f"{speakers[session.pk]} says line {i}.{j}") for j in range(3)]
            with django_capture_on_commit_callbacks(execute=True):
                last_add[session.pk] = messages_add(session=session, messages=turns)
    alice = alice_session.user
    with batcher._queue.mutex:
        entries = list(batcher._queue.queue)
    live = [entry[3] for entry in entries if not entry[3].cancelled()]
    queued = (
        registry.read_ahead_queued(user_id=alice.pk),
        registry.read_ahead_queued(tenant_id=alice.tenant_id),
        registry.read_ahead_queued(tenant_id=globex_session.user.tenant_id),
    )
    release.set()
    for future in live:
        future.result(timeout=10)

    assert queued == (3, 6, 4) and len(live) == 6 + 4
    assert len(entries) <= 6 + 4 + 64  # cancelled entries are purged as they pile up
    kept = [f"{speaker} says line 19.{j}" for speaker in ("alice", "bob", "globex") for j in range(3)]
    assert sorted(embedded) == sorted(["blocker", *kept, "globex says line 18.2"])
    assert registry.read_ahead_queued(tenant_id=alice.tenant_id) == 0

    # Alice's newest four: the oldest of them fell off her tenant's bound, and is embedded
    # on demand when a query wants it; the others are not embedded again.
    newest = list(last_add[alice_session.pk])
    older = Message.objects.get(session=alice_session, position=newest[0].position - 1)
    vectors = vector.pending_embeddings(user_id=alice.pk, texts=[row.index_text for row in [older, *newest]])
    assert vectors.shape == (4, 4) and embedded[len(kept) + 2 :] == ["alice says line 18.2"]


def test_the_session_an_add_looks_up_carries_its_tenant_for_the_read_ahead(alice_session, django_assert_num_queries):
    """The REST add's one session lookup (selectors.session_ref) also gives the user's tenant,
    under which the add's read-ahead is bounded: no second read on the add path."""
    from memory import selectors
    from memory.tenancy import Principal

    tenant_id = alice_session.user.tenant_id
    principal = Principal(key_id="acme", scope="tenant", tenant_id=tenant_id)

    with django_assert_num_queries(1):
        session = selectors.session_ref(principal=principal, session_id=alice_session.pk)
        assert (session.user_id, session.user.tenant_id) == (alice_session.user_id, tenant_id)
