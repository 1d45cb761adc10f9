"""The small named world of the tests: alice and bob, two users whose data must never mix.

Tests run against real PostgreSQL with pgvector (``DATABASE_URL``, or the embedded default)
and the real embedding model, loaded once per test process.
"""

from __future__ import annotations

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
