"""The facts layer (M1): extraction beside the flush, its failure modes, consolidation,
provenance, the budget, tenant isolation and the ``layers`` option of the REST query.

Every test that turns the layer on points ``LLM_BASE_URL`` at ``tests.llm_server.LLMServer``,
a real HTTP server answering by rules the tests predict.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from django.utils import timezone

from memory.facts import jobs, times, worker
from memory.facts.models import Fact, FactJob, FactSource, LlmCall
from memory.facts.provenance import facts_sweep
from memory.facts.reembed import facts_reembed
from memory.indexing.flush import flush_pending
from memory.services.agents import agent_create
from memory.services.messages import MessageIn, messages_add, messages_delete, messages_update
from memory.services.sessions import session_create, session_delete
from memory.services.users import user_delete
from tests.envelopes import assert_error, assert_success
from tests.llm_server import LLMServer
from tests.test_reembed import restored_schema, tiny_embedder  # noqa: F401  (fixtures)

SESSION_DAY = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)  # a Monday


@pytest.fixture
def llm_server():
    server = LLMServer()
    yield server
    server.stop()


@pytest.fixture
def llm_on(settings, llm_server):
    """The facts layer on, against the test server; no retries inside a call, no backoff."""
    settings.LLM = {
        **settings.LLM,
        "BASE_URL": llm_server.base_url,
        "MODEL": "test-model",
        "TIMEOUT_SECONDS": 2.0,
        "MAX_RETRIES": 0,
        "BACKOFF_SECONDS": 0.0,
        "BACKOFF_MAX_SECONDS": 0.0,
        "TENANT_CALLS_PER_MINUTE": 0,
        "TENANT_TOKENS_PER_MINUTE": 0,
    }
    return llm_server


def say(session, *contents: str, at: datetime = SESSION_DAY) -> list:
    return messages_add(
        session=session, messages=[MessageIn(role="user", content=c, created_at=at) for c in contents]
    )


def live_facts(user) -> list[Fact]:
    return list(
        Fact.objects.filter(
            user_id=getattr(user, "pk", user), superseded_by__isnull=True, deleted_at__isnull=True
        ).order_by("created_at")
    )


def query(api, user_id, text: str, **params) -> list[dict]:
    data = assert_success(api.post(f"/api/v1/users/{user_id}/query", {"query": text, **params}, format="json"))
    return data["results"]


def make_runnable() -> None:
    """Queued jobs runnable at once: before the test transaction's ``now()``."""
    FactJob.objects.filter(state=FactJob.State.QUEUED).update(next_attempt_at=timezone.now() - timedelta(hours=1))


# --- times ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("last Saturday", date(2023, 5, 6)),
        ("yesterday", date(2023, 5, 7)),
        ("next Friday", date(2023, 5, 12)),
        ("2 weeks ago", date(2023, 4, 24)),
        ("2023-01-02", date(2023, 1, 2)),
        ("the weekend", None),
    ],
)
def test_relative_times_resolve_against_the_session_date(words, expected):
    """Time words are resolved against the date they were said on (Monday 8 May 2023)."""
    assert times.resolve(words, on=SESSION_DAY.date()) == expected


# --- extraction -----------------------------------------------------------------------------------


def test_flush_queues_a_job_and_facts_are_written_with_sources_and_times(llm_on, alice, alice_session):
    """A flush queues one job per session; the worker writes each fact with its source
    message, the resolved date, the model and an embedding, in one call for the window."""
    rows = say(alice_session, "I went hiking with my sister last Saturday in the hills.", "ok")
    flush_pending(user_id=alice.pk)
    job = FactJob.objects.get(session=alice_session)
    assert job.state == FactJob.State.QUEUED and set(job.message_ids) == {r.pk for r in rows}
    assert worker.run_once() == 1
    [fact] = live_facts(alice)
    assert fact.valid_from == date(2023, 5, 6)
    assert fact.time_expression == "last Saturday"
    assert fact.model == "test-model" and fact.kind == "event" and fact.embedding is not None
    assert [s.message_id for s in FactSource.objects.filter(fact=fact)] == [rows[0].pk]
    assert llm_on.calls == 1
    assert FactJob.objects.get(pk=job.pk).state == FactJob.State.DONE
    assert LlmCall.objects.filter(tenant=alice.tenant, ok=True).count() == 1


def test_the_window_shows_earlier_turns_as_context(llm_on, alice, alice_session):
    """The turns before the flushed ones are in the prompt as context, not extracted again."""
    say(alice_session, "My favourite food is a spicy ramen bowl.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "I started learning the cello two weeks ago.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    prompt = [r for r in llm_on.requests if "extract" in r["messages"][0]["content"]][-1]["messages"][1]["content"]
    assert "Context (earlier turns):" in prompt and "spicy ramen" in prompt.split("Turns to extract from:")[0]
    assert "cello" in prompt.split("Turns to extract from:")[1]


def test_nothing_is_queued_while_the_layer_is_off(alice, alice_session):
    """Without LLM_BASE_URL a flush queues no job and a query reads no fact."""
    say(alice_session, "I went hiking with my sister last Saturday in the hills.")
    flush_pending(user_id=alice.pk)
    assert not FactJob.objects.exists()


def test_an_endpoint_without_structured_outputs_is_asked_for_a_json_object(llm_on, alice, alice_session):
    """A 400 for response_format json_schema is retried with json_object, and validated."""
    llm_on.mode = "no_json_schema"
    say(alice_session, "I went hiking with my sister last Saturday in the hills.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    assert len(live_facts(alice)) == 1
    assert llm_on.requests[-1]["response_format"] == {"type": "json_object"}


# --- failure modes: M0 never waits ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hang", "5xx", "429", "malformed", "down"])
def test_m0_is_served_while_the_llm_fails_and_m1_catches_up(llm_on, settings, api, alice, alice_session, mode):
    """With the LLM hanging, failing, rate limiting, answering garbage or down, the flush
    and the query answer as usual; the job is retried with backoff (at least Retry-After),
    and once the endpoint answers again its facts are written."""
    settings.LLM = {**settings.LLM, "TIMEOUT_SECONDS": 0.5}
    llm_on.retry_after = 30
    if mode == "down":
        llm_on.stop()
    else:
        llm_on.mode = mode
    rows = say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    started = time.monotonic()
    assert flush_pending(user_id=alice.pk) == 1
    assert time.monotonic() - started < 30  # the hanging call would hold it 60 s
    results = query(api, alice.pk, "cat called Miso")
    assert results[0]["id"] == str(rows[0].pk) and results[0]["layer"] == "m0"
    worker.run_once()
    job = FactJob.objects.get(session=alice_session)
    assert job.state == FactJob.State.QUEUED and job.attempts == 1 and job.last_error
    assert not live_facts(alice)
    if mode == "429":
        assert job.next_attempt_at >= timezone.now() + timedelta(seconds=25)
    assert query(api, alice.pk, "cat called Miso")[0]["id"] == str(rows[0].pk)
    if mode == "down":
        return
    llm_on.mode = "ok"
    llm_on.release()
    make_runnable()
    worker.run_once()
    assert [f.text for f in live_facts(alice)] == ["I adopted a grey cat called Miso yesterday afternoon."]


def test_a_job_is_dead_after_its_attempts_and_a_rerun_queues_it(llm_on, settings, alice, alice_session):
    """Past FACTS_MAX_ATTEMPTS failures the job is dead with its error; re-run queues it again."""
    settings.LLM = {**settings.LLM, "MAX_ATTEMPTS": 2}
    llm_on.mode = "5xx"
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    make_runnable()
    worker.run_once()
    job = FactJob.objects.get(session=alice_session)
    assert job.state == FactJob.State.DEAD and "500" in job.last_error
    llm_on.mode = "ok"
    assert jobs.facts_rerun(job_ids=[job.pk]) == 1
    worker.run_once()
    assert len(live_facts(alice)) == 1


# --- consolidation --------------------------------------------------------------------------------


def test_an_update_keeps_the_previous_version_and_both_sources(llm_on, alice, alice_session):
    """A fact that changes an existing one supersedes it; the old row stays, with the history."""
    first = say(alice_session, "My favourite colour is blue like the sea.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    second = say(alice_session, "My favourite colour is green like the sea now.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    [current] = live_facts(alice)
    assert "green" in current.text and current.version == 2
    old = Fact.objects.get(superseded_by=current)
    assert "blue" in old.text and old.version == 1
    assert set(FactSource.objects.filter(fact=current).values_list("message_id", flat=True)) == {
        first[0].pk,
        second[0].pk,
    }
    from memory.facts.selectors import fact_history

    assert [v["version"] for v in fact_history(user_id=alice.pk, fact_id=current.pk)] == [1, 2]


def test_a_contradiction_deletes_the_existing_fact(llm_on, alice, alice_session):
    """DELETE marks the contradicted fact deleted; it is no longer current."""
    say(alice_session, "Alice plays tennis every weekend at the club.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "Alice no longer plays tennis at the club.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    assert live_facts(alice) == []
    assert Fact.objects.filter(user=alice, deleted_at__isnull=False).count() == 1


def test_a_repeated_fact_is_not_added_twice(llm_on, alice, alice_session):
    """NONE: the same fact said again adds its message as a source, not a second fact."""
    say(alice_session, "I work as a nurse at the city hospital.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "I work as a nurse at the city hospital.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    [fact] = live_facts(alice)
    assert fact.sources.count() == 2


# --- provenance -----------------------------------------------------------------------------------


def test_deleting_the_source_message_removes_the_fact(llm_on, api, alice, alice_session):
    """A fact whose only source is deleted is never returned again, and the sweep deletes it."""
    rows = say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    assert any(r["layer"] == "m1" for r in query(api, alice.pk, "grey cat Miso"))
    messages_delete(session=alice_session, message_ids=[rows[0].pk])
    assert not [r for r in query(api, alice.pk, "grey cat Miso") if r["layer"] == "m1"]
    assert facts_sweep() == 1
    assert not Fact.objects.filter(user=alice).exists()


def test_a_batched_sweep_looks_at_a_batch_of_facts_and_goes_round(llm_on, alice, alice_session):
    """A sweep with ``batch`` looks at that many facts a run, going on where the last stopped
    and wrapping round: facts whose sources are gone are all deleted within a pass, the live
    one never."""
    rows = say(
        alice_session,
        "I adopted a grey cat called Miso yesterday afternoon.",
        "I work as a nurse at the city hospital downtown.",
        "My sister Anna lives in Lisbon with her two kids.",
    )
    flush_pending(user_id=alice.pk)
    worker.run_once()
    assert len(live_facts(alice)) == 3
    messages_delete(session=alice_session, message_ids=[rows[0].pk, rows[2].pk])
    deleted = [facts_sweep(batch=1) for _ in range(4)]  # a pass of three runs, and the next one
    assert all(count <= 1 for count in deleted) and sum(deleted) == 2
    assert [f.text for f in Fact.objects.filter(user=alice)] == ["I work as a nurse at the city hospital downtown."]
    assert facts_sweep(batch=2) == 0 and facts_sweep(batch=2) == 0


def test_editing_the_source_message_replaces_its_facts(llm_on, api, alice, alice_session):
    """An edited message's old facts stop being returned; its new text is extracted again."""
    rows = say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    messages_update(
        session=alice_session,
        message_ids=[rows[0].pk],
        new_messages=[MessageIn(role="user", content="I adopted a black dog called Rex last Saturday.")],
    )
    assert not [r for r in query(api, alice.pk, "grey cat Miso") if r["layer"] == "m1"]
    flush_pending(user_id=alice.pk)
    worker.run_once()
    facts_sweep()
    assert [f.text for f in live_facts(alice)] == ["I adopted a black dog called Rex last Saturday."]


def test_deleting_a_user_removes_their_facts(llm_on, alice, alice_session):
    """A user's deletion takes their facts, sources and jobs with it."""
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    user_delete(user=alice)
    assert not Fact.objects.exists() and not FactSource.objects.exists() and not FactJob.objects.exists()


def test_deleting_a_session_removes_its_facts(llm_on, alice, alice_session):
    """A session's deletion removes the facts of its messages (read at once, swept later)."""
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    session_delete(session=alice_session)
    facts_sweep()
    assert not Fact.objects.exists()


# --- budget and isolation -------------------------------------------------------------------------


def test_a_tenant_past_its_budget_waits_and_others_go_on(llm_on, settings, alice, alice_session, globex_session):
    """Past LLM_TENANT_CALLS_PER_MINUTE a tenant's jobs are not claimed; another tenant's are."""
    settings.LLM = {**settings.LLM, "TENANT_CALLS_PER_MINUTE": 1}
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "I started learning the cello two weeks ago.")
    flush_pending(user_id=alice.pk)
    say(globex_session, "I started learning the violin two weeks ago.")
    flush_pending(user_id=globex_session.user_id)
    assert worker.run_once() == 1
    assert FactJob.objects.get(session=alice_session, state=FactJob.State.QUEUED)
    assert FactJob.objects.get(session=globex_session).state == FactJob.State.DONE
    LlmCall.objects.update(at=timezone.now() - timedelta(minutes=2))  # the minute slides on
    assert worker.run_once() == 1


def test_a_tenant_past_its_token_budget_waits(llm_on, settings, alice, alice_session):
    """Past LLM_TENANT_TOKENS_PER_MINUTE the tenant's next job waits."""
    settings.LLM = {**settings.LLM, "TENANT_TOKENS_PER_MINUTE": 10}
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "I started learning the cello two weeks ago.")
    flush_pending(user_id=alice.pk)
    assert worker.run_once() == 0


def test_facts_never_cross_users(llm_on, api, alice, bob, alice_session, bob_session):
    """Bob's facts are extracted from his messages only, compared with his facts only
    (no consolidation call for his first fact) and never returned to alice."""
    say(alice_session, "I work as a nurse at the city hospital.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    calls = llm_on.calls
    say(bob_session, "I work as a nurse at the city hospital.")
    flush_pending(user_id=bob.pk)
    worker.run_once()
    assert llm_on.calls == calls + 1  # extraction only: alice's identical fact was not compared
    assert len(live_facts(bob)) == 1 and len(live_facts(alice)) == 1
    alice_fact = str(live_facts(alice)[0].pk)
    assert alice_fact not in {r["id"] for r in query(api, bob.pk, "nurse city hospital")}
    bob_sources = FactSource.objects.filter(fact__user=bob).values_list("message_id", flat=True)
    assert set(bob_sources) <= set(bob.messages.values_list("pk", flat=True))


# --- layers ---------------------------------------------------------------------------------------


def test_the_query_returns_both_layers_by_default_when_on(llm_on, api, alice, alice_session):
    """With the layer on, results carry their layer and facts their source message ids."""
    rows = say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    results = query(api, alice.pk, "grey cat Miso")
    assert {r["layer"] for r in results} == {"m0", "m1"}
    fact = next(r for r in results if r["layer"] == "m1")
    assert fact["type"] == "fact" and fact["metadata"]["source_message_ids"] == [str(rows[0].pk)]
    assert fact["metadata"]["valid_from"] == "2023-05-07"
    assert {r["layer"] for r in query(api, alice.pk, "grey cat Miso", layers=["m0"])} == {"m0"}
    assert {r["layer"] for r in query(api, alice.pk, "grey cat Miso", layers=["m1"])} == {"m1"}


def test_facts_are_bounded_by_agent_and_time_as_messages_are(llm_on, api, alice, alice_session):
    """``agent_id``, ``since`` and ``until`` keep only the facts with a source said in that
    agent's sessions and window, as they keep M0's messages."""
    coach = agent_create(tenant_id=alice.tenant_id, name="coach")
    later = session_create(user=alice, agent=coach, name="alice-coaching")
    week_later = SESSION_DAY + timedelta(days=7)
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    say(later, "My grey cat Miso now sleeps on the piano every night.", at=week_later)
    flush_pending(user_id=alice.pk)
    make_runnable()
    while worker.run_once():
        pass

    def facts(**bounds) -> set[str]:
        return {r["content"] for r in query(api, alice.pk, "grey cat Miso", layers=["m1"], top_k=10, **bounds)}

    first, second = "I adopted a grey cat called Miso yesterday afternoon.", "My grey cat Miso now sleeps on the piano every night."
    assert facts() == {first, second}
    assert facts(since=(SESSION_DAY + timedelta(days=1)).isoformat()) == {second}
    assert facts(until=(SESSION_DAY + timedelta(days=1)).isoformat()) == {first}
    assert facts(agent_id=str(coach.pk)) == {second}
    assert facts(agent_id=str(coach.pk), until=(SESSION_DAY + timedelta(days=1)).isoformat()) == set()


def test_layers_are_validated(llm_on, api, alice):
    """An unknown layer, or an empty list, is a 400 naming layers."""
    assert_error(
        api.post(f"/api/v1/users/{alice.pk}/query", {"query": "x", "layers": ["m2"]}, format="json"), 400, "layers[0]"
    )
    assert_error(
        api.post(f"/api/v1/users/{alice.pk}/query", {"query": "x", "layers": []}, format="json"), 400, "layers"
    )


def test_with_the_layer_off_results_are_unchanged_and_m1_is_refused(api, alice, alice_session, alice_messages):
    """Off: no "layer" key on results, and asking for m1 is a 400 naming layers."""
    results = query(api, alice.pk, "golden retriever")
    assert results and all("layer" not in r for r in results)
    assert_error(
        api.post(f"/api/v1/users/{alice.pk}/query", {"query": "x", "layers": ["m1"]}, format="json"), 400, "layers"
    )


def test_a_job_whose_messages_are_gone_is_harmless(llm_on, alice, alice_session):
    """A job whose messages are gone completes with no call and no fact."""
    FactJob.objects.create(tenant=alice.tenant, user=alice, session=alice_session, message_ids=[uuid.uuid4()])
    make_runnable()  # created in the test's transaction: after its now()
    assert worker.run_once() == 1
    assert llm_on.calls == 0 and FactJob.objects.get().state == FactJob.State.DONE


# --- system checks --------------------------------------------------------------------------------


def test_system_checks_name_a_misconfigured_llm(settings):
    """LLM_BASE_URL without LLM_MODEL is E012; a non-positive concurrency is E013; off, nothing."""
    from memory.checks import check_llm

    assert check_llm() == []
    settings.LLM = {**settings.LLM, "BASE_URL": "http://127.0.0.1:1/v1", "MODEL": ""}
    assert [e.id for e in check_llm()] == ["memory.E012"]
    settings.LLM = {**settings.LLM, "MODEL": "m", "CONCURRENCY": 0}
    assert [e.id for e in check_llm()] == ["memory.E013"]


# --- admin ----------------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, db):
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("operator", "op@example.com", "pw")
    client.login(username="operator", password="pw")
    return client


def test_dead_letters_show_in_the_admin_and_rerun_queues_them(llm_on, settings, staff_client, alice, alice_session):
    """A dead job is listed with its error; the admin's re-run action queues it again; the
    fact pages render (and show no vector)."""
    settings.LLM = {**settings.LLM, "MAX_ATTEMPTS": 1}
    llm_on.mode = "malformed"
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    job = FactJob.objects.get()
    page = staff_client.get("/admin/memory/factjob/?state=dead").content.decode()
    assert "does not match the extract schema" in page
    staff_client.post("/admin/memory/factjob/", {"action": "rerun", "_selected_action": [job.pk]})
    assert FactJob.objects.filter(state=FactJob.State.QUEUED).count() == 1
    llm_on.mode = "ok"
    worker.run_once()
    fact = live_facts(alice)[0]
    assert staff_client.get("/admin/memory/fact/").status_code == 200
    detail = staff_client.get(f"/admin/memory/fact/{fact.pk}/change/")
    assert detail.status_code == 200


# --- figures --------------------------------------------------------------------------------------


def test_metrics_show_calls_tokens_failures_and_the_backlog_per_tenant(
    llm_on, settings, alice, alice_session, globex_session
):
    """/metrics gives per-tenant calls, failures, tokens and the M1 backlog."""
    from tests.conftest import key_client
    from tests.test_metrics import SCRAPE_TOKEN, scrape

    settings.MEMFUSE = {**settings.MEMFUSE, "METRICS_TOKEN": SCRAPE_TOKEN}
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    llm_on.mode = "5xx"
    say(globex_session, "I started learning the violin two weeks ago.")
    flush_pending(user_id=globex_session.user_id)
    worker.run_once()
    samples = scrape(key_client(SCRAPE_TOKEN))
    assert samples[("memfuse_llm_calls_last_hour", (("tenant", "acme"),))] == 1
    assert samples[("memfuse_llm_failures_last_hour", (("tenant", "globex"),))] == 1
    assert samples[("memfuse_llm_prompt_tokens_last_hour", (("tenant", "acme"),))] == llm_on.prompt_tokens
    assert samples[("memfuse_facts_backlog_jobs", (("tenant", "globex"),))] == 1
    assert samples[("memfuse_facts_backlog_jobs", (("tenant", "acme"),))] == 0


# --- reembed --------------------------------------------------------------------------------------


@pytest.fixture
def restored_fact_column():
    """After the test: memory_fact.embedding is the migrations' vector(384) again."""
    yield
    from django.conf import settings as django_settings
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE memory_fact ALTER COLUMN embedding TYPE vector({django_settings.MEMFUSE['EMBEDDING_DIM']}) USING NULL"
        )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("restored_schema", "restored_fact_column")
def test_reembed_covers_facts_without_calling_the_llm(llm_on, alice, alice_session, request):
    """After a switch to a 32-dimensional model, every fact has a 32-dimensional vector of the
    new generation, and no LLM call was made."""
    from memory.indexing.reembed import reembed_run
    from tests.test_reembed import TINY_DIM

    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    calls = llm_on.calls
    stats = reembed_run(model_path=request.getfixturevalue("tiny_embedder"), batch_size=8)
    assert stats.switched and stats.embedded["facts"] == 1
    fact = Fact.objects.get()
    assert len(fact.embedding) == TINY_DIM and fact.embedding_generation is not None
    assert llm_on.calls == calls
    assert facts_reembed() == 0  # nothing left of the old model


# --- export and import ----------------------------------------------------------------------------


def test_export_and_import_carry_facts_with_their_sources(llm_on, tenant, alice, alice_session):
    """An export holds each fact (versions too) with its source message ids; importing it
    as another user writes the facts bound to the imported messages, embedded again, with
    their history, and no LLM call; a second import writes nothing new."""
    import io
    import json

    from memory.portability import export, importer

    say(alice_session, "My favourite colour is blue like the sea.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    say(alice_session, "My favourite colour is green like the sea now.")
    flush_pending(user_id=alice.pk)
    worker.run_once()
    data = b"".join(export.user_export(user=alice))
    records = [json.loads(line) for line in data.decode().splitlines()]
    exported = [r for r in records if r["type"] == "fact"]
    assert [r["version"] for r in exported] == [1, 2]
    messages = {r["id"] for r in records if r["type"] == "message"}
    assert all(set(r["sources"]) <= messages for r in exported)
    calls = llm_on.calls
    user_delete(user=alice)

    report = importer.memory_import(source=importer.jsonl_source(io.BytesIO(data)), tenant_id=tenant.pk)
    assert report.created["facts"] == 2
    [current] = live_facts(report.user_id)
    assert "green" in current.text and current.version == 2 and current.embedding is not None
    assert Fact.objects.get(superseded_by=current).version == 1
    assert {str(s) for s in current.sources.values_list("message_id", flat=True)} == set(exported[1]["sources"])
    assert llm_on.calls == calls
    again = importer.memory_import(source=importer.jsonl_source(io.BytesIO(data)), tenant_id=tenant.pk)
    assert again.created["facts"] == 0 and again.existing["facts"] == 2


def test_an_invalid_fact_record_is_a_400_naming_its_field(llm_on, tenant):
    """A fact record with a kind outside the schema names lines[n].kind."""
    import io
    import json

    from memory.errors import InvalidInput
    from memory.portability import FORMAT, VERSION, importer

    user_id = str(uuid.uuid4())
    lines = [
        {"type": "header", "format": FORMAT, "version": VERSION},
        {"type": "user", "id": user_id, "name": "carol", "metadata": {}, "created_at": "2023-05-08T00:00:00+00:00"},
        {"type": "fact", "id": str(uuid.uuid4()), "text": "x", "kind": "gossip", "sources": [str(uuid.uuid4())],
         "metadata": {}, "created_at": "2023-05-08T00:00:00+00:00"},
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with pytest.raises(InvalidInput) as raised:
        importer.memory_import(source=importer.jsonl_source(io.BytesIO(data)), tenant_id=tenant.pk)
    assert raised.value.errors[0]["field"] == "lines[3].kind"


def test_locomo_eval_layers_reports_m0_only_without_an_llm(settings):
    """locomo_eval --layers m0,m1 with no LLM says so and searches M0 only; an unknown layer is refused."""
    from django.core.management.base import CommandError

    from memory.evaluation import eval_layers

    said = []
    assert eval_layers("m0,m1", write=said.append) == ["m0"]
    assert "reporting M0 only" in said[0]
    settings.LLM = {**settings.LLM, "BASE_URL": "http://127.0.0.1:1/v1", "MODEL": "m"}
    assert eval_layers("m0,m1", write=said.append) == ["m0", "m1"]
    with pytest.raises(CommandError, match="--layers"):
        eval_layers("m2", write=said.append)


def test_a_run_whose_claim_was_taken_over_writes_nothing(llm_on, alice, alice_session):
    """A run that outlived its lease, whose job another worker claimed since, writes no fact."""
    say(alice_session, "I adopted a grey cat called Miso yesterday afternoon.")
    flush_pending(user_id=alice.pk)
    job = jobs.facts_claim()
    FactJob.objects.filter(pk=job.pk).update(attempts=job.attempts + 1)  # claimed again elsewhere
    assert jobs.facts_run_job(job) == 0
    assert not Fact.objects.exists()
