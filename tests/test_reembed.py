"""``reembed``: every message and knowledge item re-embedded by another model while queries
go on, resumable, then switched to atomically; ``memory.E002`` names the command.

The new model is a tiny random sentence-transformers model of 32 dimensions built here (its
embeddings mean nothing; the tests prove the path). These tests change the schema (shadow
columns, renames): ``restored_schema`` puts the served 384-dimensional columns back.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.db import connection, transaction

from memory import checks, embedding_guard, embedding_model, selectors
from memory.indexing.flush import flush_pending
from memory.indexing.reembed import DocumentEmbedder, reembed_run
from memory.indexing.reembed_columns import HNSW_INDEX, reembed_abort
from memory.inference import default_model_path, registry
from memory.models import ANN_BUCKETS, EmbeddingModel, Message
from memory.operator.stats import operator_stats
from memory.retrieval import MemoryQuery
from memory.services.knowledge import knowledge_add
from memory.services.messages import MessageIn, messages_add, messages_update
from memory.services.sessions import session_create
from memory.services.users import user_create, user_delete
from tests.subprocesses import subprocess_env

TINY_DIM = 32


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> Path:
    """A seeded one-layer BERT of hidden size 32 with mean pooling and normalisation, saved as a
    sentence-transformers model (the bundled MiniLM's tokenizer; no download)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-embedder")
    bert = root / "bert"
    bert.mkdir()
    source = default_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, bert / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=TINY_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(bert)
    transformer = st_models.Transformer(str(bert), max_seq_length=128)
    model = SentenceTransformer(
        modules=[transformer, st_models.Pooling(TINY_DIM, pooling_mode="mean"), st_models.Normalize()], device="cpu"
    )
    path = root / "tiny-32"
    model.save(str(path))
    return path


def _columns(table: str) -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped AND atttypid = 'vector'::regtype",
            [table],
        )
        return dict(cursor.fetchall())


@pytest.fixture
def restored_schema():
    """After the test: the served columns are the 384-dimensional ones of the migrations again
    (the previous model's ``*_old`` columns renamed back, or new empty ones), and this process
    embeds with the configured model."""
    yield
    reembed_abort()
    with connection.cursor() as cursor:
        for table, columns in (
            ("memory_message", ("embedding", "context_embedding")),
            ("memory_knowledge", ("embedding",)),
        ):
            present = _columns(table)
            for column in columns:
                if present.get(column) == settings.MEMFUSE["EMBEDDING_DIM"]:
                    continue
                cursor.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {column}")
                if f"{column}_old" in present:
                    cursor.execute(f"ALTER TABLE {table} RENAME COLUMN {column}_old TO {column}")
                else:
                    cursor.execute(
                        f"ALTER TABLE {table} ADD COLUMN {column} vector({settings.MEMFUSE['EMBEDDING_DIM']})"
                    )
        cursor.execute("ALTER TABLE memory_message ALTER COLUMN context_embedding SET STORAGE PLAIN")
        for bucket in range(ANN_BUCKETS):
            name = HNSW_INDEX.format(bucket=bucket)
            cursor.execute("SELECT 1 FROM pg_class WHERE relname = %s", [f"{name}_old"])
            if cursor.fetchone():
                cursor.execute(f"ALTER INDEX {name}_old RENAME TO {name}")
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {name} ON memory_message USING hnsw (context_embedding vector_ip_ops) "
                f"WITH (m = 16, ef_construction = 64) WHERE ann_bucket = {bucket} AND NOT ann_duplicate"
            )
    EmbeddingModel.objects.all().delete()
    embedding_model.forget_active_model()
    registry.use_embedding_model(default_model_path(), settings.MEMFUSE["EMBEDDING_DIM"])
    registry._active_model = None


def _world(tenant, agent, *, sessions: int = 3, turns: int = 6):
    """alice (``sessions`` sessions of ``turns`` flushed turns, two knowledge items) and bob
    (one session): every row embedded by the configured model."""
    alice = user_create(tenant_id=tenant.pk, name="alice")
    bob = user_create(tenant_id=tenant.pk, name="bob")
    for user, count in ((alice, sessions), (bob, 1)):
        for s in range(count):
            session = session_create(user=user, agent=agent, name=f"s{s}")
            messages_add(
                session=session,
                messages=[
                    MessageIn(
                        role="user" if t % 2 == 0 else "assistant",
                        content=f"{user.name} session {s} turn {t}: about the beach and dogs {t}",
                    )
                    for t in range(turns)
                ],
            )
        flush_pending(user_id=user.pk)
    knowledge_add(user=alice, contents=["Alice's dog is a beagle called Pepper.", "Alice lives by the sea."])
    return alice, bob


def _dimensions(table: str, column: str) -> set[int | None]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT vector_dims({column}) FROM {table}")
        return {row[0] for row in cursor.fetchall()}


def _vector_hits(user, query: str) -> list[dict]:
    results = selectors.memory_query(MemoryQuery(user=user, query=query, top_k=5))
    assert results, "the query found nothing"
    return [r for r in results if "vector" in r["metadata"]["retrievers"]]


@pytest.mark.django_db(transaction=True)
def test_reembed_answers_queries_throughout_and_switches_with_nothing_lost(
    tenant, agent, tiny_embedder, restored_schema
):
    """Queries are answered during the run (old model) and after the switch (new model); rows
    flushed, edited and added during the run and a pending add all end with 32-dim vectors."""
    alice, bob = _world(tenant, agent)
    pending_session = session_create(user=bob, agent=agent, name="pending")
    messages_add(
        session=pending_session, messages=[MessageIn(role="user", content="a pending note about kayaks")]
    )

    stats = reembed_run(model_path=tiny_embedder, batch_size=4, stop_after_batches=2)
    assert stats.embedded["messages"] == 8 and not stats.switched
    run = EmbeddingModel.objects.get(state="building")
    assert (run.phase, run.done, run.dimension) == ("messages", 8, TINY_DIM)
    shown = operator_stats()["models"]["reembed"]  # what the dashboard shows
    assert (shown["name"], shown["phase"], shown["done"], shown["total"]) == ("tiny-32", "messages", 8, 24)

    # During the run: the old model answers; writes go on.
    assert _vector_hits(alice, "beach dogs")
    session = session_create(user=alice, agent=agent, name="during")
    messages_add(session=session, messages=[MessageIn(role="user", content="written during the reembed")])
    flush_pending(user_id=alice.pk)
    # The run fills in id order (random UUIDs), so the lowest id of the rows it saw is filled
    # already and its shadow vector goes stale; the row written during the run may sort first.
    edited = Message.objects.filter(user=alice).exclude(session=session).order_by("id").first()
    messages_update(
        session=edited.session,
        message_ids=[edited.pk],
        new_messages=[MessageIn(role="user", content="an edited turn about kites")],
    )
    flush_pending(user_id=alice.pk)
    assert _dimensions("memory_message", "embedding") == {384, None}

    stats = reembed_run(model_path=tiny_embedder, batch_size=4)

    assert stats.switched
    active = EmbeddingModel.objects.get(state="active")
    assert (active.name, active.dimension, active.path) == ("tiny-32", TINY_DIM, str(tiny_embedder.resolve()))
    assert _columns("memory_message") == {
        "embedding": TINY_DIM,
        "context_embedding": TINY_DIM,
        "embedding_old": 384,
        "context_embedding_old": 384,
    }
    assert _columns("memory_knowledge") == {"embedding": TINY_DIM, "embedding_old": 384}
    flushed = Message.objects.filter(flushed_at__isnull=False)
    assert flushed.count() == 6 * 3 + 6 + 1
    assert not flushed.filter(embedding__isnull=True).exists()
    assert not flushed.filter(context_embedding__isnull=True).exists()
    assert _dimensions("memory_knowledge", "embedding") == {TINY_DIM}
    # The edit and the message written during the run carry the new model's embedding of their text.
    document = DocumentEmbedder(tiny_embedder)
    for message in (Message.objects.get(pk=edited.pk), Message.objects.get(content="written during the reembed")):
        expected = document.embed([message.index_text])[0]
        assert float(np.dot(np.asarray(message.embedding), expected)) == pytest.approx(1.0, abs=1e-4)

    # After the switch: this process follows the new model; the pending add is flushed by it.
    hits = _vector_hits(alice, "beach dogs")
    assert hits and registry.document_model()["dimension"] == TINY_DIM
    assert flush_pending(user_id=bob.pk) == 1
    assert not Message.objects.filter(embedding__isnull=True).exists()
    assert _dimensions("memory_message", "embedding") == {TINY_DIM}
    knowledge_add(user=bob, contents=["Bob knits."])
    assert _dimensions("memory_knowledge", "embedding") == {TINY_DIM}
    assert selectors.memory_query(MemoryQuery(user=bob, query="kayaks", top_k=3))[0]["content"] == "a pending note about kayaks"


@pytest.mark.django_db(transaction=True)
def test_a_killed_reembed_resumes_without_redoing_finished_batches(tenant, agent, tiny_embedder, restored_schema):
    """A `manage.py reembed` SIGKILLed in the middle of its fill leaves its finished batches;
    the next run embeds only the rest."""
    alice, _ = _world(tenant, agent, sessions=4, turns=5)
    total = Message.objects.filter(flushed_at__isnull=False).count()
    ids = list(Message.objects.order_by("id").values_list("id", flat=True))
    blocked = ids[10]  # in the sixth batch of 2: the run waits on its row lock there
    reembed_run(model_path=tiny_embedder, stop_after_batches=0)  # the shadow columns (a table lock)

    command = [sys.executable, "manage.py", "reembed", "--model", str(tiny_embedder), "--batch-size", "2"]
    with transaction.atomic():
        Message.objects.select_for_update().get(pk=blocked)
        process = subprocess.Popen(
            command, cwd=settings.BASE_DIR, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                row = EmbeddingModel.objects.filter(state="building").values("phase", "done").first()
                if row and row["phase"] == "messages" and row["done"] >= 10:
                    break
                time.sleep(0.1)
            assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.5)  # it now waits on the lock
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            # Its server backend, waiting on our lock, would not notice the dead client
            # before its UPDATE committed: end it as the dropped connection would.
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                )
        finally:
            if process.poll() is None:
                process.kill()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM memory_message WHERE embedding_next_seq = seq")
        filled = cursor.fetchone()[0]
    assert filled == 10

    stats = reembed_run(model_path=tiny_embedder, batch_size=2)

    assert stats.switched
    assert stats.embedded["messages"] == total - filled
    assert stats.embedded["knowledge"] == 2
    assert _dimensions("memory_message", "embedding") == {TINY_DIM}
    assert _vector_hits(alice, "beach dogs")


@pytest.mark.django_db
def test_e002_names_the_reembed_command_when_the_stored_model_is_not_the_configured_one(tiny_embedder, monkeypatch):
    """With vectors recorded as the tiny model's and MiniLM configured, E002 says what to set
    and which reembed to run; configured the tiny model over MiniLM's columns, it names that."""
    minilm = default_model_path()
    EmbeddingModel.objects.create(name="tiny-32", path=str(tiny_embedder), dimension=TINY_DIM, state="active")

    errors = [e for e in checks.check_pgvector(databases=["default"]) if e.id == "memory.E002"]

    assert len(errors) == 1
    assert "tiny-32" in errors[0].msg
    assert f"EMBEDDING_MODEL_PATH={tiny_embedder}" in errors[0].hint
    assert f"python manage.py reembed --model {minilm}" in errors[0].hint

    EmbeddingModel.objects.all().delete()
    monkeypatch.setitem(settings.MEMFUSE, "EMBEDDING_MODEL_PATH", str(tiny_embedder))
    monkeypatch.setitem(settings.MEMFUSE, "EMBEDDING_DIM", TINY_DIM)

    errors = checks.check_pgvector(databases=["default"])

    assert [e.id for e in errors] == ["memory.E002"]
    assert "dimension 384" in errors[0].msg
    assert f"python manage.py reembed --model {tiny_embedder}" in errors[0].hint


def test_reembed_command_refuses_a_path_without_a_model(tmp_path):
    """`reembed --model` of a directory without a model is an error naming --model; nothing starts."""
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="--model"):
        call_command("reembed", "--model", str(tmp_path / "missing"))


@pytest.mark.django_db
def test_a_flush_write_embedded_by_a_replaced_model_is_refused(alice_session):
    """A flush's write of vectors from another model than the active one raises ModelChanged
    and writes nothing (the flush then embeds its rows again with the active model)."""
    from memory.indexing import flush

    messages_add(session=alice_session, messages=[MessageIn(role="user", content="hello there")])
    token = uuid.uuid4()
    claimed = flush._claim(user_id=alice_session.user_id, session_id=None, token=token, limit=10)
    ids = [row[0] for row in claimed]

    with pytest.raises(embedding_guard.ModelChanged):
        flush._write(
            user_id=alice_session.user_id, token=token, ids=ids, vectors=np.zeros((1, 384)), generation=12345
        )

    assert Message.objects.get(pk=ids[0]).flushed_at is None
    assert flush._write(user_id=alice_session.user_id, token=token, ids=ids, vectors=np.ones((1, 384)) / np.sqrt(384))


@pytest.mark.django_db
def test_embed_guarded_embeds_and_writes_again_with_the_active_model_after_a_switch(alice):
    """A write whose guard finds another active model than the one its vectors came from
    writes nothing; ``embed_guarded`` follows the active model, calls ``on_change``, embeds
    again and writes with the active model's generation."""
    embedded, generations, changes = [], [], []

    def embed() -> str:
        embedded.append(len(embedded))
        return f"vectors {len(embedded)}"

    def write(vectors: str, generation: int | None) -> str:
        generations.append(generation)
        with transaction.atomic(), connection.cursor() as cursor:
            embedding_guard.guard_write(cursor, generation=generation)
            cursor.execute("UPDATE memory_user SET description = %s WHERE id = %s", [vectors, alice.pk])
        return vectors

    written = embedding_guard.embed_guarded(embed, write, generation=12345, on_change=lambda: changes.append(1))

    assert written == "vectors 2" and embedded == [0, 1] and changes == [1]
    assert generations == [12345, embedding_model.active_model(max_age=0.0).id]
    alice.refresh_from_db()
    assert alice.description == "vectors 2"


@pytest.mark.django_db(transaction=True)
def test_an_import_after_a_switch_ignores_the_old_models_embeddings(tenant, agent, tiny_embedder, restored_schema):
    """A file exported with the previous model's embeddings, imported by a process that has
    not followed the switch yet: its messages are queued and flushed by the new model."""
    import io

    from memory.portability import export, importer

    alice, _ = _world(tenant, agent, sessions=1, turns=4)
    exported = io.BytesIO(b"".join(export.user_export(user=alice, embeddings=True)))
    user_delete(user=alice)
    assert reembed_run(model_path=tiny_embedder, batch_size=8).switched
    # A process that last looked before the switch (this process's reembed_run followed it).
    registry.use_embedding_model(default_model_path(), settings.MEMFUSE["EMBEDDING_DIM"])
    registry._active_model = None
    embedding_model.forget_active_model()

    report = importer.memory_import(source=importer.jsonl_source(exported), tenant_id=tenant.pk)

    assert not report.embeddings_used and report.pending_messages == 4
    assert flush_pending(user_id=report.user_id) == 4
    assert _dimensions("memory_message", "embedding") == {TINY_DIM}
    assert _dimensions("memory_knowledge", "embedding") == {TINY_DIM}

