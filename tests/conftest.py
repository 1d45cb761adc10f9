"""The small named world of the tests: alice and bob, two users whose data must never mix.

Tests run against real PostgreSQL with pgvector (``DATABASE_URL``, or the embedded default)
and the real embedding model, loaded once per test process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from memory import services
from memory.services import MessageIn


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def agent(db):
    return services.agent_create(name="assistant")


@pytest.fixture
def alice(db):
    return services.user_create(name="alice")


@pytest.fixture
def bob(db):
    return services.user_create(name="bob")


@pytest.fixture
def alice_session(alice, agent):
    return services.session_create(user=alice, agent=agent, name="alice-chat")


@pytest.fixture
def bob_session(bob, agent):
    return services.session_create(user=bob, agent=agent, name="bob-chat")


@pytest.fixture
def alice_messages(alice_session):
    return services.messages_add(
        session=alice_session,
        messages=[
            MessageIn(role="user", content="I adopted a golden retriever puppy named Biscuit last week."),
            MessageIn(role="assistant", content="Congratulations on Biscuit! Golden retrievers are lovely."),
            MessageIn(role="user", content="My sister lives in Lisbon and works as an architect."),
        ],
    )


@pytest.fixture
def bob_messages(bob_session):
    return services.messages_add(
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

    from memory import registry

    path = tmp_path_factory.mktemp("cross-encoder")
    tokenizer_source = registry.default_model_path()
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
    from memory import registry

    settings.MEMFUSE = {**settings.MEMFUSE, "RERANKER_MODEL_PATH": str(tiny_cross_encoder), "RERANK": True}
    monkeypatch.setattr(registry, "_reranker", None)
    return tiny_cross_encoder
