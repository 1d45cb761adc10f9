"""The small named world of the tests: alice and bob, two users whose data must never mix.

They are users of the tenant ``acme``; ``api`` is a client with acme's tenant key. A second
tenant, ``globex``, has its own alice (``globex_alice``), agent and session, and its own
client ``globex_api``: what one tenant holds the other must never reach.

Tests run against real PostgreSQL with pgvector (``DATABASE_URL``, or the embedded default)
and the real embedding model, loaded once per test process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from memory import tenancy
from memory.models import KeyScope
from memory.services.agents import agent_create
from memory.services.api_keys import api_key_create
from memory.services.messages import MessageIn, messages_add
from memory.services.sessions import session_create
from memory.services.tenants import tenant_create
from memory.services.users import user_create


@pytest.fixture(autouse=True)
def stop_the_flush_pool_a_test_started():
    """A consumer of a test may start this process's flush pool (``FlushConsumer``); left
    running, it would flush, and release as dead, the rows of later tests."""
    yield
    from buffers import workers

    workers.stop_pool()


@pytest.fixture(autouse=True)
def undeclared_process(monkeypatch):
    """The test process serves nothing (``runtime.roles``): a tool command a test runs
    in-process (``locomo_eval``) declares itself a ``TOOL`` for that test only."""
    from runtime import roles

    monkeypatch.setattr(roles, "_role", None)


@pytest.fixture(autouse=True)
def forget_resolved_keys():
    """Each test starts with an empty key cache (the database is rolled back between tests)."""
    tenancy.clear_cache()
    yield
    tenancy.clear_cache()


def key_client(key: str | None) -> APIClient:
    """A REST client sending ``Authorization: Bearer <key>`` (no header for ``None``)."""
    client = APIClient()
    if key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def tenant(db):
    return tenant_create(name="acme")


@pytest.fixture
def tenant_key(tenant) -> str:
    return api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="acme test key")[1]


@pytest.fixture
def api(tenant_key) -> APIClient:
    """A client of tenant acme (alice and bob's), with its tenant key."""
    return key_client(tenant_key)


@pytest.fixture
def anonymous_api() -> APIClient:
    return APIClient()


@pytest.fixture
def agent(tenant):
    return agent_create(tenant_id=tenant.pk, name="assistant")


@pytest.fixture
def alice(tenant):
    return user_create(tenant_id=tenant.pk, name="alice")


@pytest.fixture
def bob(tenant):
    return user_create(tenant_id=tenant.pk, name="bob")


@pytest.fixture
def other_tenant(db):
    return tenant_create(name="globex")


@pytest.fixture
def other_tenant_key(other_tenant) -> str:
    return api_key_create(scope=KeyScope.TENANT, tenant=other_tenant, name="globex test key")[1]


@pytest.fixture
def globex_api(other_tenant_key) -> APIClient:
    """A client of the second tenant, globex."""
    return key_client(other_tenant_key)


@pytest.fixture
def globex_alice(other_tenant):
    """Globex's own user called alice (same name as acme's: names are per tenant)."""
    return user_create(tenant_id=other_tenant.pk, name="alice")


@pytest.fixture
def globex_agent(other_tenant):
    return agent_create(tenant_id=other_tenant.pk, name="assistant")


@pytest.fixture
def globex_session(globex_alice, globex_agent):
    return session_create(user=globex_alice, agent=globex_agent, name="alice-chat")


@pytest.fixture
def alice_session(alice, agent):
    return session_create(user=alice, agent=agent, name="alice-chat")


@pytest.fixture
def bob_session(bob, agent):
    return session_create(user=bob, agent=agent, name="bob-chat")


@pytest.fixture
def alice_messages(alice_session):
    return messages_add(
        session=alice_session,
        messages=[
            MessageIn(role="user", content="I adopted a golden retriever puppy named Biscuit last week."),
            MessageIn(role="assistant", content="Congratulations on Biscuit! Golden retrievers are lovely."),
            MessageIn(role="user", content="My sister lives in Lisbon and works as an architect."),
        ],
    )


@pytest.fixture
def bob_messages(bob_session):
    return messages_add(
        session=bob_session,
        messages=[
            MessageIn(role="user", content="My dog is a beagle called Pepper and she loves the beach."),
            MessageIn(role="assistant", content="Pepper sounds like a happy beagle."),
        ],
    )


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A tiny randomly initialised cross-encoder saved to a temporary directory (no download).

    One-layer BERT with a one-label classification head, seeded, with the bundled MiniLM
    model's tokenizer files. Its scores mean nothing; tests use it to prove the code path.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from memory.inference import default_model_path

    path = tmp_path_factory.mktemp("cross-encoder")
    tokenizer_source = default_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_source / name, path / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture
def reranker_path(tiny_cross_encoder, settings, monkeypatch) -> Path:
    """RERANKER_MODEL_PATH set to the tiny cross-encoder, loaded afresh for this test."""
    from memory.inference import registry

    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": str(tiny_cross_encoder), "RERANK": True}
    monkeypatch.setattr(registry, "_reranker", None)
    return tiny_cross_encoder


@pytest.fixture(scope="module")
def runserver(django_db_setup, tmp_path_factory):
    """``manage.py runserver`` (daphne's, as in the README's quick start) on the test database,
    for a module that talks to it over the network (the chat page, MCP). Per module: its
    flush workers would otherwise flush, and release as dead, the rows of later modules."""
    from benchmarks.server import ServerProcess
    from tests.subprocesses import subprocess_env

    env = subprocess_env(API_RATE_LIMIT="100000/minute")
    process = ServerProcess(log_path=tmp_path_factory.mktemp("runserver") / "server.log", env=env, kind="runserver")
    process.start()
    yield process
    process.stop()
