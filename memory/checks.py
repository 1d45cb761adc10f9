"""System checks for what can be wrong at start: pgvector missing, embedding dimension mismatch,
a reranker path that holds no cross-encoder."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import connection
from django.db.utils import DatabaseError

from memory.inference import registry
from memory.inference.encoders import default_model_path, model_dimension_from_config
from memory.inference.modes import reranker_path
from memory.inference.reranker import reranker_path_problem


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


@register(Tags.database)
def check_pgvector(app_configs=None, databases=None, **kwargs) -> list[Error]:
    """memory.E001/E002/E010/E011: the ``vector`` extension is available (0.8 or later); the stored
    embeddings are the configured model's (E002 names what to set, or the ``reembed`` command
    to run; the active ``EmbeddingModel`` row says which model they come from, else the
    column's dimension is compared); E011: the database could not be inspected.

    Runs with ``manage.py check --database default`` and before ``migrate``/``runserver``.
    """
    # One database inspection feeds every check here; kept together so it runs once.
    if not databases or "default" not in databases:
        return []
    errors: list[Error] = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_available_extensions WHERE name = 'vector'")
            if cursor.fetchone() is None:
                return [
                    Error(
                        "The PostgreSQL server has no pgvector extension.",
                        hint="Install pgvector 0.8 into the server (.ci/install-pgvector.sh does it on Debian), or unset DATABASE_URL "
                        "to use the embedded PostgreSQL, which ships it.",
                        id="memory.E001",
                    )
                ]
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            installed = cursor.fetchone()
            if installed is not None and _version_tuple(installed[0]) < (0, 8):
                errors.append(
                    Error(
                        f"pgvector {installed[0]} is installed; the vector search needs 0.8 or later "
                        "(hnsw.iterative_scan).",
                        hint="Install pgvector 0.8 into the server, then run ALTER EXTENSION vector UPDATE "
                        "(or python manage.py migrate, which tries it).",
                        id="memory.E010",
                    )
                )
            # atttypmod of a vector column is its dimension; -1 would mean 'any'.
            cursor.execute(
                "SELECT atttypmod FROM pg_attribute "
                "WHERE attrelid = to_regclass('memory_message') AND attname = 'embedding'"
            )
            row = cursor.fetchone()
            active = None
            cursor.execute("SELECT to_regclass('memory_embeddingmodel') IS NOT NULL")
            if cursor.fetchone()[0]:
                cursor.execute("SELECT name, path, dimension FROM memory_embeddingmodel WHERE state = 'active'")
                active = cursor.fetchone()
    except DatabaseError as exc:
        return [Error(f"Could not inspect the database for pgvector: {exc}", id="memory.E011")]

    configured_path = default_model_path()
    model_dim = model_dimension_from_config(configured_path)
    if model_dim is None and (loaded := registry.loaded_embedder()) is not None:
        model_dim = loaded.dimension  # a model whose config files do not say it
    configured = settings.MEMFUSE["EMBEDDING_DIM"]
    reembed = f"python manage.py reembed --model {configured_path}"
    if model_dim is not None and model_dim != configured:
        errors.append(
            Error(
                f"The embedding model produces {model_dim}-dimensional vectors but EMBEDDING_DIM "
                f"is {configured}.",
                hint=f"Set EMBEDDING_DIM={model_dim}.",
                id="memory.E002",
            )
        )
    if active is not None and Path(active[1]).resolve() != configured_path.resolve():
        name, path, dimension = active
        errors.append(
            Error(
                f"The stored embeddings come from the model {name} ({path}, {dimension} dimensions) but "
                f"EMBEDDING_MODEL_PATH gives {configured_path} ({model_dim} dimensions).",
                hint=f"Set EMBEDDING_MODEL_PATH={path} and EMBEDDING_DIM={dimension} to serve the stored "
                f"embeddings, or re-embed them with the configured model: {reembed}",
                id="memory.E002",
            )
        )
    elif active is None and row is not None and model_dim is not None and row[0] not in (-1, model_dim):
        errors.append(
            Error(
                f"Stored embeddings have dimension {row[0]} but the embedding model ({configured_path}) "
                f"produces {model_dim}.",
                hint=f"Re-embed them with the configured model: {reembed} (or set EMBEDDING_MODEL_PATH back "
                "to the model they come from).",
                id="memory.E002",
            )
        )
    return errors


@register()
def check_background_embedding(app_configs, **kwargs):
    """memory.E003: BACKGROUND_EMBEDDING and QUERY_EMBEDDING must name a known mode."""
    defaults = {
        "BACKGROUND_EMBEDDING": "'process': flush inference in a niced child process",
        "QUERY_EMBEDDING": "'process': query inference in a child process",
    }
    return [
        Error(
            f"{name} is {settings.MEMFUSE[name]!r}; it must be 'process' or 'thread'.",
            hint=f"Unset it for the default ({default}).",
            id="memory.E003",
        )
        for name, default in defaults.items()
        if settings.MEMFUSE[name] not in ("process", "thread")
    ]


@register()
def check_reranker(app_configs=None, **kwargs) -> list[Error]:
    """memory.E004: a configured ``RERANKER_MODEL_PATH`` holds a one-label cross-encoder.

    Reads only the model's ``config.json`` (no weights), so ``manage.py check`` stays cheap.
    """
    path = reranker_path()
    problem = reranker_path_problem(path) if path is not None else None
    if problem is None:
        return []
    return [
        Error(
            problem,
            hint="Point RERANKER_MODEL_PATH at a local cross-encoder directory (a sentence-transformers "
            "CrossEncoder or a transformers sequence-classification model with num_labels=1), or unset it.",
            id="memory.E004",
        )
    ]


@register()
def check_retrieval_settings(app_configs=None, **kwargs) -> list[Error]:
    """memory.E005: retrieval settings a query cannot run with (unknown fusion, negative knobs)."""
    config = settings.MEMFUSE
    problems = []
    if config["FUSION"] not in ("rrf", "convex"):
        problems.append(f"FUSION is {config['FUSION']!r}; expected 'rrf' or 'convex'.")
    for name in ("RRF_K", "BM25_CANDIDATES", "VECTOR_CANDIDATES", "RERANK_TOP_N", "VECTOR_OWN_WEIGHT"):
        if config[name] < 1:
            problems.append(f"{name} is {config[name]}; it must be at least 1.")
    for name in ("BM25_WEIGHT", "VECTOR_WEIGHT", "VECTOR_PRF_DOCS", "VECTOR_PRF_WEIGHT", "VECTOR_CONTEXT_TURNS"):
        if config[name] < 0:
            problems.append(f"{name} is {config[name]}; it must not be negative.")
    return [Error(problem, id="memory.E005") for problem in problems]


RATE_LIMIT = re.compile(r"[1-9][0-9]*/(second|minute|hour|day)")


@register()
def check_rate_limit(app_configs=None, **kwargs) -> list[Error]:
    """memory.E006: ``API_RATE_LIMIT`` and ``API_TENANT_RATE_LIMIT`` are
    ``"<n>/<second|minute|hour|day>"`` (else every request would fail to read them)."""
    errors = []
    for name, example in (("API_RATE_LIMIT", "6000/minute"), ("API_TENANT_RATE_LIMIT", "30000/minute")):
        rate = settings.MEMFUSE[name]
        if not (isinstance(rate, str) and RATE_LIMIT.fullmatch(rate)):
            errors.append(Error(f"{name} is {rate!r}; expected '<n>/<second|minute|hour|day>', e.g. '{example}'.", id="memory.E006"))
    return errors


@register()
def check_llm(app_configs=None, **kwargs) -> list[Error]:
    """memory.E012/E013: the facts layer's LLM settings (``settings.LLM``, docs/facts.md)
    hold together: E012, ``LLM_BASE_URL`` is set without ``LLM_MODEL``, or is not an http(s)
    URL; E013, a bound that must be positive is not (``LLM_TIMEOUT_SECONDS``,
    ``LLM_CONCURRENCY``, ``FACTS_WINDOW_TURNS``, ``FACTS_MAX_ATTEMPTS``) or one that must not be
    negative is (``LLM_MAX_RETRIES``, the per-tenant budgets, ``FACTS_CONTEXT_TURNS``,
    ``FACTS_WORKERS``). Nothing is checked while ``LLM_BASE_URL`` is empty (the layer is off)."""
    config = settings.LLM
    if not config["BASE_URL"]:
        return []
    errors = []
    if not config["MODEL"]:
        errors.append(
            Error(
                "LLM_BASE_URL is set but LLM_MODEL is not.",
                hint="Set LLM_MODEL to the model the endpoint serves.",
                id="memory.E012",
            )
        )
    if not re.match(r"^https?://", config["BASE_URL"]):
        errors.append(
            Error(
                f"LLM_BASE_URL {config['BASE_URL']!r} is not an http(s) URL.",
                hint="An OpenAI-compatible base URL, such as http://127.0.0.1:11434/v1 or https://api.openai.com/v1.",
                id="memory.E012",
            )
        )
    positive = {
        "LLM_TIMEOUT_SECONDS": config["TIMEOUT_SECONDS"],
        "LLM_CONCURRENCY": config["CONCURRENCY"],
        "FACTS_WINDOW_TURNS": config["WINDOW_TURNS"],
        "FACTS_MAX_ATTEMPTS": config["MAX_ATTEMPTS"],
    }
    not_negative = {
        "LLM_MAX_RETRIES": config["MAX_RETRIES"],
        "LLM_TENANT_CALLS_PER_MINUTE": config["TENANT_CALLS_PER_MINUTE"],
        "LLM_TENANT_TOKENS_PER_MINUTE": config["TENANT_TOKENS_PER_MINUTE"],
        "FACTS_CONTEXT_TURNS": config["CONTEXT_TURNS"],
        "FACTS_WORKERS": config["WORKERS"],
    }
    errors += [
        Error(f"{name} must be positive (it is {value}).", id="memory.E013")
        for name, value in positive.items()
        if value <= 0
    ]
    errors += [
        Error(f"{name} must not be negative (it is {value}).", id="memory.E013")
        for name, value in not_negative.items()
        if value < 0
    ]
    return errors


@register()
def check_recent_embeddings(app_configs=None, **kwargs) -> list[Warning]:
    """memory.W001: the query model's recent calls of a user (``RECENT_EMBEDDINGS_PER_USER``,
    capped by ``RECENT_EMBEDDINGS``) cannot hold the pending messages a query scores
    (``PENDING_EMBED_MAX``): every query would embed some of them again."""
    config = settings.MEMFUSE
    held = min(config["RECENT_EMBEDDINGS"], config["RECENT_EMBEDDINGS_PER_USER"])
    if 0 < held < config["PENDING_EMBED_MAX"]:
        return [
            Warning(
                f"RECENT_EMBEDDINGS_PER_USER (or RECENT_EMBEDDINGS) holds {held} embeddings of a user, fewer than "
                f"PENDING_EMBED_MAX ({config['PENDING_EMBED_MAX']}): queries embed pending messages again.",
                hint="Raise RECENT_EMBEDDINGS_PER_USER to at least PENDING_EMBED_MAX, or set it to 0 to hold none.",
                id="memory.W001",
            )
        ]
    return []
