"""The floor of a chat turn: the CPU this design cannot avoid, measured alone.

A turn of the many-users phase (``benchmarks.chat``) is a query, an add of a round (the
user's message, then the assistant's) and, later, the flush of those messages. Whatever the
web process does around them, two costs are the design's own:

- **the model**: the turn's one-text embeddings: the query's, and the assistant's message
  (the user's message is the query's text, whose embedding the service keeps:
  ``RECENT_EMBEDDINGS``). Measured as the CPU of this process's query-embedding process
  (``QUERY_EMBEDDING="process"``; this process's own CPU with ``"thread"``) over one-text
  calls made one after another, times two;
- **PostgreSQL**: the turn's statements. Measured as the CPU of this process's backend
  (``pg_backend_pid()``, read from ``/proc`` through ``psutil``: only when the database runs
  on this host) while this process runs turns itself, one after another, through the same
  selectors and services as the server (``selectors.memory_query``, ``services.messages_add``),
  then one flush per user of what its turns added: the statements of the turns, without
  the concurrency, the pool or the HTTP around them. Each user's index is loaded by one
  query first, not measured (the floor is a cached user's turn).

``floor_ms_per_turn`` is the sum of the two; the phase's ratio is the CPU it measured per turn
(every process group) over that floor.
"""

from __future__ import annotations

import psutil
from django.conf import settings
from django.db import connection

EMBEDDINGS_PER_TURN = 2  # the query's text and the assistant's message (module docstring)


def _process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of ``pid``, or of this process with ``None``."""
    times = psutil.Process(pid).cpu_times() if pid is not None else psutil.Process().cpu_times()
    return times.user + times.system


def model_floor_ms(texts: list[str]) -> dict:
    """The query model's CPU per one-text embedding over ``texts`` (embedded one by one):
    ``{"per_embedding_ms", "embeddings", "per_turn_ms"}`` (``per_turn_ms``: times
    ``EMBEDDINGS_PER_TURN``)."""
    from memory.inference import registry

    embedder = registry.get_query_embedder()
    pid = getattr(embedder, "pid", None) if settings.MEMFUSE["QUERY_EMBEDDING"] == "process" else None
    embedder.embed([texts[0]])  # started and warm
    before = _process_cpu(pid)
    for text in texts:
        embedder.embed([text])
    per_embedding = 1000 * (_process_cpu(pid) - before) / len(texts)
    return {
        "per_embedding_ms": round(per_embedding, 3),
        "embeddings": len(texts),
        "per_turn_ms": round(per_embedding * EMBEDDINGS_PER_TURN, 3),
    }


def postgres_floor_ms(users: list, rounds: list[tuple[str, str]], *, turns_per_user: int, top_k: int) -> dict | None:
    """PostgreSQL's CPU per turn for ``users`` (``ChatUser``), ``turns_per_user`` turns each,
    with the texts of ``rounds`` (``(user text, assistant text)``, unique ones), then one flush
    per user: ``{"per_turn_ms", "turns", "statements_per_turn"}``. ``None`` when the database
    is not on this host (its backend's CPU cannot be read here)."""
    from django.test.utils import CaptureQueriesContext

    from memory import selectors
    from memory.api.serializers import MessagesAdd, validated
    from memory.indexing.flush import flush_pending
    from memory.models import Session, User
    from memory.retrieval import MemoryQuery, RetrievalConfig
    from memory.services.messages import messages_add

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    try:
        _process_cpu(backend)
    except psutil.Error:
        return None
    config = RetrievalConfig.from_settings()
    sessions = {user.user_id: Session.objects.select_related("user").get(pk=user.session_id) for user in users}
    for user in users:  # each user's index loaded, not measured
        first = MemoryQuery(user=sessions[user.user_id].user, query=rounds[0][0], top_k=top_k, config=config)
        selectors.memory_query(first)
    texts = iter(rounds[1:])
    turns = 0
    before = _process_cpu(backend)
    with CaptureQueriesContext(connection) as captured:
        for user in users:
            for _ in range(turns_per_user):
                user_text, assistant_text = next(texts)
                # The user row as the server reads it before every query (its memory version).
                row = User.objects.only("id", "tenant_id", "memory_version", "ann_bucket").get(pk=user.user_id)
                selectors.memory_query(MemoryQuery(user=row, query=user_text, top_k=top_k, config=config))
                body = {
                    "messages": [
                        {"role": "user", "content": user_text},
                        {"role": "assistant", "content": assistant_text},
                    ]
                }
                messages_add(session=sessions[user.user_id], messages=validated(MessagesAdd, body)["messages"])
                turns += 1
        for user in users:
            flush_pending(user_id=user.user_id)
    used = _process_cpu(backend) - before
    return {
        "per_turn_ms": round(1000 * used / turns, 3),
        "turns": turns,
        "statements_per_turn": round(len(captured) / turns, 1),
    }


def turn_floor(bench, many: list, *, users: int = 10, turns_per_user: int = 5, embeddings: int = 100) -> dict:
    """The floor of a turn (module docstring) for ``bench`` (a ``ChatBench``) on ``users`` of
    ``many``: ``{"inference": model, "postgres_local": database or None, "total_ms", ...}``,
    per turn in CPU ms. Runs in this process, after the phase's server is stopped."""
    chosen = bench.rng.sample(many, min(users, len(many)))
    rounds = [
        (bench._unique(user_text), assistant_text)
        for user_text, assistant_text in bench._rounds(1 + len(chosen) * turns_per_user)
    ]
    model = model_floor_ms([bench._unique(text) for text, _ in bench._rounds(embeddings)])
    database = postgres_floor_ms(chosen, rounds, turns_per_user=turns_per_user, top_k=bench.options["top_k"])
    connection.close()  # this thread's connection
    total = model["per_turn_ms"] + (database["per_turn_ms"] if database else 0.0)
    return {
        "inference": model["per_turn_ms"],
        "postgres_local": database["per_turn_ms"] if database else None,
        "total_ms": round(total, 2),
        "model": model,
        "postgres": database,
    }
