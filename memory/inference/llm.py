"""The LLM provider of tier 1: any OpenAI-compatible chat-completions endpoint, through the
official ``openai`` package (OpenAI, vLLM, Ollama, llama.cpp's server, LiteLLM).

Configured by ``settings.LLM`` (``LLM_BASE_URL``, ``LLM_MODEL``, ``LLM_API_KEY``,
``LLM_TIMEOUT_SECONDS``, ``LLM_MAX_RETRIES``, ``LLM_CONCURRENCY``); off while ``LLM_BASE_URL``
is empty (``enabled()``), and then nothing builds a client. One client per process, built on
first use; at most ``LLM_CONCURRENCY`` calls of the process are in flight at once, whatever
the tenant. Answers are asked for in a JSON schema (structured outputs) and validated with
pydantic either way: an endpoint that rejects ``response_format: json_schema`` is asked for
a JSON object instead, from then on.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import TypeVar

import openai
from django.conf import settings
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class LLMError(Exception):
    """A call failed: the endpoint is down, timed out, refused, or answered what the schema
    does not allow. ``retry_after``: seconds the endpoint asked to wait (a 429's or 503's
    ``Retry-After``), else ``None``. ``usage``: the tokens spent anyway (``Usage``) or ``None``."""

    def __init__(self, message: str, *, retry_after: float | None = None, usage: Usage | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.usage = usage


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, as the endpoint counted them, and its wall time (ms)."""

    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


def enabled() -> bool:
    """Whether the facts layer is on: ``LLM_BASE_URL`` is set."""
    return bool(settings.LLM["BASE_URL"])


def model_name() -> str:
    """The configured model (``LLM_MODEL``), as written on the facts it extracts."""
    return settings.LLM["MODEL"]


_lock = threading.Lock()
_client: openai.OpenAI | None = None
_client_key: tuple | None = None
_slots: threading.BoundedSemaphore | None = None
# Endpoints known to reject response_format json_schema (then asked for json_object).
_no_json_schema: set[str] = set()


def _provider() -> tuple[openai.OpenAI, threading.BoundedSemaphore]:
    global _client, _client_key, _slots
    config = settings.LLM
    key = (
        config["BASE_URL"],
        config["API_KEY"],
        config["TIMEOUT_SECONDS"],
        config["MAX_RETRIES"],
        config["CONCURRENCY"],
    )
    with _lock:
        if _client is None or _client_key != key:
            _client = openai.OpenAI(
                base_url=config["BASE_URL"],
                # Local servers (vLLM, Ollama, llama.cpp) take any key; the client needs one.
                api_key=config["API_KEY"] or "none",
                timeout=config["TIMEOUT_SECONDS"],
                max_retries=config["MAX_RETRIES"],
            )
            _slots = threading.BoundedSemaphore(max(1, config["CONCURRENCY"]))
            _client_key = key
        return _client, _slots


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def chat_json(*, system: str, user: str, schema: type[T], name: str) -> tuple[T, Usage]:
    """Ask the LLM for one answer in ``schema`` (a pydantic model): ``(answer, usage)``.

    ``system`` and ``user`` are the two messages of the prompt; ``name`` names the schema
    for the endpoint. Waits for one of the process's ``LLM_CONCURRENCY`` slots first. Raises
    ``LLMError`` (with ``retry_after`` when the endpoint gave one) when the endpoint fails
    after ``LLM_MAX_RETRIES`` retries, or answers what ``schema`` does not validate.
    """
    client, slots = _provider()
    base_url = settings.LLM["BASE_URL"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    with slots:
        started = time.perf_counter()
        try:
            if base_url in _no_json_schema:
                response_format = {"type": "json_object"}
            else:
                response_format = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema.model_json_schema(), "strict": False},
                }
            try:
                completion = client.chat.completions.create(
                    model=settings.LLM["MODEL"], messages=messages, response_format=response_format, temperature=0
                )
            except openai.BadRequestError as exc:
                if "response_format" not in str(exc) or response_format["type"] != "json_schema":
                    raise
                _no_json_schema.add(base_url)
                completion = client.chat.completions.create(
                    model=settings.LLM["MODEL"],
                    messages=messages,
                    response_format={"type": "json_object"},
                    temperature=0,
                )
        except openai.APIStatusError as exc:
            raise LLMError(f"LLM endpoint answered {exc.status_code}", retry_after=_retry_after(exc)) from exc
        except openai.APIError as exc:  # connection refused, timeout, a body that is not JSON
            raise LLMError(f"LLM call failed: {type(exc).__name__}: {exc}") from exc
        latency_ms = (time.perf_counter() - started) * 1000
    usage = Usage(
        prompt_tokens=getattr(completion.usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(completion.usage, "completion_tokens", 0) or 0,
        latency_ms=latency_ms,
    )
    content = completion.choices[0].message.content if completion.choices else None
    try:
        return schema.model_validate(json.loads(content or "")), usage
    except (ValueError, ValidationError) as exc:
        raise LLMError(f"LLM answer does not match the {name} schema: {str(exc)[:300]}", usage=usage) from exc
