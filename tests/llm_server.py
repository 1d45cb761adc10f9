"""A small deterministic OpenAI-compatible server for the tests: ``POST /v1/chat/completions``.

No LLM is reachable from the tests, so they start this one (``LLMServer``) and point
``LLM_BASE_URL`` at it. It answers from the prompt's content, by rules simple enough for a
test to predict:

- extraction (a system prompt asking to extract facts): every numbered turn of at least five
  words is one fact, ``"<turn as said>"``, citing that turn; its time words (``last
  Saturday``, ``yesterday``, ``<n> weeks ago``...) are copied into ``time_expression``, and
  ``valid_from`` is left out (the product resolves the words);
- consolidation: a new fact equal to an existing one is NONE; one that says "no longer" and
  shares two words with an existing fact DELETEs it; one sharing half of its words with an
  existing fact UPDATEs it (the new text); anything else is ADD.

Tokens are counted as characters / 4. ``mode`` makes it misbehave: ``"slow"`` (answers after
``delay`` s), ``"hang"`` (answers only once ``release()`` is called or after 60 s),
``"5xx"``, ``"429"`` (with ``Retry-After: retry_after``), ``"malformed"`` (content that is not
JSON), ``"no_json_schema"`` (400 for ``response_format: json_schema``, as some servers do).
``stop()`` takes it down (connections refused).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TIME = re.compile(
    r"\b(last (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|week|month|year)|yesterday|today|tomorrow"
    r"|\d+ (?:days?|weeks?|months?|years?) ago|next (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday))\b",
    re.IGNORECASE,
)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def extract(prompt: str) -> dict:
    """The extraction answer for a user prompt (``memory.facts.prompts.extract_prompt``'s shape)."""
    facts = []
    section = prompt.split("Turns to extract from:", 1)[-1]
    for number, turn in re.findall(r"^\[(\d+)\] (.*)$", section, re.MULTILINE):
        if len(turn.split()) < 5:
            continue
        when = _TIME.search(turn)
        facts.append(
            {
                "text": turn.strip(),
                "kind": "event" if when else "attribute",
                "entities": sorted(set(re.findall(r"\b[A-Z][a-z]+\b", turn)))[:5],
                "time_expression": when.group(0) if when else "",
                "confidence": 0.9,
                "sources": [int(number)],
            }
        )
    return {"facts": facts}


def consolidate(prompt: str) -> dict:
    """The consolidation answer for a user prompt (``consolidate_prompt``'s shape)."""
    existing_part, _, new_part = prompt.partition("New facts:")
    existing = re.findall(r"^\[(\d+)\] (.*)$", existing_part, re.MULTILINE)
    decisions = []
    for number, text in re.findall(r"^\[(\d+)\] (.*)$", new_part, re.MULTILINE):
        decision = {"new": int(number), "event": "ADD", "existing": None, "text": None}
        words = _words(text)
        for old_number, old_text in existing:
            shared = words & _words(old_text)
            if old_text == text:
                decision.update(event="NONE", existing=int(old_number))
                break
            if "no longer" in text.lower() and len(shared) >= 2:
                decision.update(event="DELETE", existing=int(old_number))
                break
            if words and len(shared) * 2 >= len(words):
                decision.update(event="UPDATE", existing=int(old_number), text=text)
                break
        decisions.append(decision)
    return {"decisions": decisions}


class LLMServer:
    """The server, on ``127.0.0.1`` and a free port, in a thread. ``base_url`` is what
    ``LLM_BASE_URL`` takes; ``calls`` the completions answered (any status);
    ``prompt_tokens`` and ``completion_tokens`` what it counted for the answered ones."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.retry_after = 1
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests: list[dict] = []
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.calls += 1
                server.requests.append(body)
                status, headers, payload = server.answer(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="llm-test-server", daemon=True)
        self._thread.start()

    def answer(self, body: dict) -> tuple[int, dict, dict | bytes]:
        """``(status, headers, payload)`` for a request ``body``, by ``mode``."""
        if self.mode == "slow":
            time.sleep(self.delay)
        elif self.mode == "hang":
            self._released.wait(60)
        elif self.mode == "5xx":
            return 500, {}, {"error": {"message": "internal error", "type": "server_error"}}
        elif self.mode == "429":
            return (
                429,
                {"Retry-After": str(self.retry_after)},
                {"error": {"message": "rate limited", "type": "rate_limit"}},
            )
        elif self.mode == "no_json_schema" and (body.get("response_format") or {}).get("type") == "json_schema":
            return (
                400,
                {},
                {"error": {"message": "response_format json_schema is not supported", "type": "invalid_request_error"}},
            )
        messages = body.get("messages", [])
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in messages if m["role"] == "user"), "")
        content = json.dumps(extract(user) if "extract" in system.lower() else consolidate(user))
        if self.mode == "malformed":
            content = "Sure! Here are the facts: {facts: [oops"
        prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        completion_tokens = len(content) // 4
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        return (
            200,
            {},
            {
                "id": f"chatcmpl-{self.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "test"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def release(self) -> None:
        """End a ``hang``: the calls waiting answer now, and later ones do not wait."""
        self._released.set()

    def stop(self) -> None:
        """Take the server down: later calls are refused."""
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.llm_server [--mode slow] [--delay 2]``: serve until interrupted, the
    base URL (``LLM_BASE_URL``) on the first line; for benchmarks of the service beside it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--mode", default="ok", choices=["ok", "slow", "hang", "5xx", "429", "malformed", "no_json_schema"])
    parser.add_argument("--delay", type=float, default=2.0, help="seconds before each answer in mode slow")
    options = parser.parse_args(argv)
    server = LLMServer()
    server.mode, server.delay = options.mode, options.delay
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"calls {server.calls}, prompt tokens {server.prompt_tokens}, completion tokens {server.completion_tokens}")
        server.stop()


if __name__ == "__main__":
    main()
