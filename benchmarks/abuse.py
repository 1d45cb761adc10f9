"""The clients of ``soak_bench tenants`` (``benchmarks.tenants``): threads that record every
answer (``Load``), and the abusive tenant (``Abuser``): its adds, waiting flushes, imports of
generated files (``ImportTemplate``) and bodies with no key (``keyless_body``).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests

ABUSE_KINDS = ("adds", "flush-waits", "imports", "keyless", "backlog")
REQUEST_TIMEOUT = 30.0  # s: a well-behaved request not answered by then counts as status 0
ABUSE_TIMEOUT = 300.0  # s: a flush wait holds up to FLUSH_TIMEOUT_SECONDS, an import its whole file
ADD_BATCH = 500  # messages of an abusive add: MAX_BATCH_MESSAGES's default
ADD_THREADS = 4
SESSION_MESSAGES = 20  # messages per session of a generated import
# An abusive client pauses this long (s) after a refusal: without it, its own loop would take
# a core of the machine the server shares, and measure the bench rather than the service.
REFUSED_PAUSE = 0.5
KEYLESS_CHUNK = 1 << 16  # bytes per send; also the socket's send buffer, so few bytes wait in it
KEYLESS_TARGETS = (  # (name, path, chunked)
    ("import", "/api/v1/users/{id}/import", False),
    ("import_chunked", "/api/v1/users/{id}/import", True),
    ("add", "/api/v1/sessions/{id}/messages", False),
)
PLACEHOLDER = "PPPPPPPP"  # the first group of every id of an import template: replaced per import


@dataclass
class Answer:
    """One request: its ``kind``, the well-behaved ``tenant`` (0, 1, 2; None: the abuser), the
    HTTP status (0: a network error or no answer in time), its send time (monotonic s) and
    seconds to the answer; the message ids a 2xx acknowledged and its wall-clock time
    (``time.time()``); the bytes a keyless body had sent when the answer came; the seconds its
    ``Retry-After`` asked for; an error's message (or the network error's type)."""

    kind: str
    tenant: int | None
    status: int
    sent: float
    seconds: float
    message_ids: list[str] = field(default_factory=list)
    acked_at: float = 0.0
    bytes_sent: int = 0
    retry_after: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class UserSession:
    """A user of a tenant (0, 1, 2: a well-behaved one; None: the abuser) and its one session."""

    tenant: int | None
    user_id: str
    session_id: str


class Load:
    """Threads sending requests until ``stop()``; their answers in ``answers`` (thread-safe)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self._threads: list[threading.Thread] = []

    def spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def record(self, answer: Answer) -> Answer:
        with self._lock:
            self._answers.append(answer)
        return answer

    def paced(self, interval: float, offset: float = 0.0):
        """Yields 0, 1, 2, ... ``interval`` s apart (later when a call was slow: none piles up),
        the first after ``offset`` s, until ``stop()``."""
        n, next_at = 0, time.monotonic() + offset
        while not self.stopping.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                return
            next_at = max(next_at + interval, time.monotonic() - interval)
            yield n
            n += 1

    def post(
        self, http: requests.Session, kind: str, tenant: int | None, path: str, *, timeout: float, **kwargs
    ) -> Answer:
        """POST ``path`` (``json=`` or ``data=`` in ``kwargs``) and record the answer."""
        sent = time.monotonic()
        try:
            response = http.post(self.url + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            return self.record(Answer(kind, tenant, 0, sent, time.monotonic() - sent, detail=type(exc).__name__))
        answer = Answer(kind, tenant, response.status_code, sent, time.monotonic() - sent)
        try:
            answer.retry_after = float(response.headers["Retry-After"])
        except (KeyError, ValueError):
            pass
        envelope = _envelope(response)
        if response.ok:
            answer.acked_at = time.time()
            data = envelope.get("data")
            answer.message_ids = list(data.get("message_ids", [])) if isinstance(data, dict) else []
        else:
            answer.detail = str(envelope.get("message", ""))[:200]
        return self.record(answer)


def _envelope(response: requests.Response) -> dict:
    try:
        envelope = response.json()
    except ValueError:
        return {}
    return envelope if isinstance(envelope, dict) else {}


def http_session(key: str) -> requests.Session:
    """A ``requests.Session`` (one keep-alive connection) sending ``key``."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    return http


class Abuser(Load):
    """The abusive tenant against its ``users`` with its tenant ``key``: the ``kinds`` of abuse
    of ``ABUSE_KINDS`` (``benchmarks.tenants`` describes them) from ``start()``; ``add()`` alone
    for one batch. ``add_rate``: messages per second of the ``adds`` kind; ``template``: the
    file of the ``imports``."""

    def __init__(
        self,
        url: str,
        key: str,
        users: list[UserSession],
        *,
        texts: list[str],
        kinds: tuple[str, ...] = (),
        add_rate: float = 0.0,
        flush_waits: int = 0,
        template: ImportTemplate | None = None,
        keyless_bytes: int = 0,
    ) -> None:
        super().__init__(url)
        self.key, self.users, self.texts, self.kinds = key, users, texts, kinds
        self.add_rate, self.flush_waits, self.template, self.keyless_bytes = (
            add_rate,
            flush_waits,
            template,
            keyless_bytes,
        )

    def start(self) -> None:
        if "adds" in self.kinds:
            interval = ADD_THREADS * ADD_BATCH / self.add_rate
            for index in range(ADD_THREADS):
                self.spawn(self._adds, index, interval)
        if "backlog" in self.kinds:
            self.spawn(self._backlog)
        if "flush-waits" in self.kinds:
            for index in range(self.flush_waits):
                self.spawn(self._flush_waits, index)
        if "imports" in self.kinds:
            self.spawn(self._imports)
        if "keyless" in self.kinds:
            self.spawn(self._keyless)

    def _batch(self, n: int) -> dict:
        return {
            "messages": [
                {"role": ("user", "assistant")[i % 2], "content": self.texts[(n * ADD_BATCH + i) % len(self.texts)]}
                for i in range(ADD_BATCH)
            ]
        }

    def add(self, http: requests.Session, kind: str, n: int) -> Answer:
        user = self.users[n % len(self.users)]
        return self.post(
            http, kind, None, f"/api/v1/sessions/{user.session_id}/messages", json=self._batch(n), timeout=ABUSE_TIMEOUT
        )

    def _adds(self, index: int, interval: float) -> None:
        with http_session(self.key) as http:
            for n in self.paced(interval, offset=interval * index / ADD_THREADS):
                self.add(http, "adds", index + ADD_THREADS * n)

    def _backlog(self) -> None:
        with http_session(self.key) as http:
            n = 0
            while not self.stopping.is_set():
                answer = self.add(http, "backlog", n)
                n += 1
                if answer.status >= 400:
                    self.stopping.wait(answer.retry_after or REFUSED_PAUSE)

    def _flush_waits(self, index: int) -> None:
        with http_session(self.key) as http:
            n = 0
            while not self.stopping.is_set():
                user = self.users[(index + n) % len(self.users)]
                answer = self.post(
                    http,
                    "flush-waits",
                    None,
                    f"/api/v1/users/{user.user_id}/flush",
                    json={"wait": True},
                    timeout=ABUSE_TIMEOUT,
                )
                n += 1
                if not 200 <= answer.status < 300:
                    self.stopping.wait(REFUSED_PAUSE)

    def _imports(self) -> None:
        headers = {"Content-Type": "application/x-ndjson"}
        with http_session(self.key) as http:
            n = 0
            while not self.stopping.is_set():
                user = self.users[n % len(self.users)]
                body, ids = self.template.instance()
                answer = self.post(
                    http,
                    "imports",
                    None,
                    f"/api/v1/users/{user.user_id}/import",
                    data=body,
                    headers=headers,
                    timeout=ABUSE_TIMEOUT,
                )
                if 200 <= answer.status < 300:
                    answer.message_ids = ids
                n += 1
                self.stopping.wait(REFUSED_PAUSE)

    def _keyless(self) -> None:
        n = 0
        while not self.stopping.is_set():
            name, path, chunked = KEYLESS_TARGETS[n % len(KEYLESS_TARGETS)]
            sent = time.monotonic()
            outcome = keyless_body(
                self.url, path.format(id=uuid.uuid4()), size=self.keyless_bytes, chunked=chunked, stopping=self.stopping
            )
            if outcome is not None:
                status, bytes_sent = outcome
                self.record(
                    Answer(f"keyless_{name}", None, status, sent, time.monotonic() - sent, bytes_sent=bytes_sent)
                )
            n += 1
            self.stopping.wait(REFUSED_PAUSE)


def keyless_body(url: str, path: str, *, size: int, chunked: bool, stopping: threading.Event) -> tuple[int, int] | None:
    """POST a body of ``size`` bytes with no key over a raw socket, sending until the server
    answers: ``(status, bytes of the body sent by then)``; status 0 when the connection failed
    or closed without an answer; None when ``stopping`` was set first. With ``chunked`` the
    body goes with ``Transfer-Encoding: chunked`` (the count includes the chunks' framing),
    else with its ``Content-Length``."""
    parts = urlsplit(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/x-ndjson\r\n{framing}\r\n\r\n"
    full = _piece(KEYLESS_CHUNK, chunked)
    deadline = time.monotonic() + ABUSE_TIMEOUT
    sent = 0
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=REQUEST_TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KEYLESS_CHUNK)
            sock.sendall(head.encode())
            pending = memoryview(b"")
            body_left = size
            while time.monotonic() < deadline:
                if stopping.is_set():
                    return None
                readable, writable, _ = select.select([sock], [sock] if pending or body_left else [], [], 1.0)
                if readable:
                    break
                if not writable:
                    continue
                if not pending:
                    take = min(body_left, KEYLESS_CHUNK)
                    body_left -= take
                    last = b"0\r\n\r\n" if chunked and body_left == 0 else b""
                    pending = memoryview((full if take == KEYLESS_CHUNK else _piece(take, chunked)) + last)
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += count
                pending = pending[count:]
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            return _status(sock), sent
    except OSError:
        return 0, sent


def _piece(length: int, chunked: bool) -> bytes:
    """``length`` bytes of the body, framed as a chunk when ``chunked``."""
    data = b"x" * length
    return b"%x\r\n%s\r\n" % (length, data) if chunked else data


def _status(sock: socket.socket) -> int:
    """The status of the HTTP answer ``sock`` receives (0: closed or not an HTTP answer)."""
    received = b""
    try:
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except OSError:
        pass
    fields = received.split(b"\r\n", 1)[0].split()
    return int(fields[1]) if len(fields) >= 2 and fields[0].startswith(b"HTTP/") and fields[1].isdigit() else 0


class ImportTemplate:
    """A file of the export format (``memory.portability``) into user ``user_id`` with agent
    ``agent``: about ``size_bytes`` of sessions of ``SESSION_MESSAGES`` messages, a knowledge item
    each, no embeddings. Every id and session name starts with ``PLACEHOLDER``; ``instance()``
    replaces it with a new group, so each import writes new records without the bench
    encoding the file again."""

    def __init__(self, *, user_id: str, agent: dict, texts: list[str], size_bytes: int) -> None:
        now = datetime.now(UTC).isoformat()
        lines = [
            {"type": "header", "format": "memfuse.memory", "version": 1, "exported_at": now, "embedding": None},
            {"type": "user", "id": user_id, "name": "abuser", "description": "", "metadata": {}, "created_at": now},
            {
                "type": "agent",
                "id": agent["id"],
                "name": agent["name"],
                "description": "",
                "metadata": {},
                "created_at": now,
            },
        ]
        encoded = [json.dumps(line) for line in lines]
        self.message_suffixes: list[str] = []
        size, count, session = sum(len(line) + 1 for line in encoded), 0, 0
        while size < size_bytes:
            session_id, count = self._id(count), count + 1
            records = [
                {
                    "type": "session",
                    "id": session_id,
                    "name": f"{PLACEHOLDER} import {session}",
                    "agent_id": agent["id"],
                    "metadata": {},
                    "created_at": now,
                }
            ]
            for position in range(SESSION_MESSAGES):
                message_id, count = self._id(count), count + 1
                self.message_suffixes.append(message_id[len(PLACEHOLDER) :])
                records.append({"type": "message", "id": message_id, "session_id": session_id, "position": position,
                                "role": ("user", "assistant")[position % 2], "content": texts[count % len(texts)],
                                "metadata": {}, "created_at": now})  # fmt: skip
            records.append(
                {
                    "type": "knowledge",
                    "id": self._id(count),
                    "content": texts[count % len(texts)],
                    "metadata": {},
                    "created_at": now,
                }
            )
            count, session = count + 1, session + 1
            lines = [json.dumps(record) for record in records]  # ASCII: characters are bytes
            encoded.extend(lines)
            size += sum(len(line) + 1 for line in lines)
        self.body = ("\n".join(encoded) + "\n").encode()

    @staticmethod
    def _id(count: int) -> str:
        return f"{PLACEHOLDER}-0000-4000-8000-{count:012x}"

    def instance(self) -> tuple[bytes, list[str]]:
        """``(body, its message ids)`` with a new first group in every id."""
        group = uuid.uuid4().hex[:8]
        return self.body.replace(PLACEHOLDER.encode(), group.encode()), [
            group + suffix for suffix in self.message_suffixes
        ]
