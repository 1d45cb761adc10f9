"""PNGs of the chat page and the operator dashboard, taken in headless Chromium.

``manage.py chat_screenshot`` drives the chat page (``/chat/``) as a person would: types the
key, creates a user and a session, sends a few turns (each one's panel fills with what it
recalls: the partial BM25 frame, then the final fused one, with scores and retrievers),
presses "Flush now" and waits for the ``flush.completed`` event. ``manage.py
admin_screenshot`` logs a staff user with a one-off password in through the admin's login
form and saves ``/admin/dashboard/``; unless ``--no-sample``, it first adds a few users'
messages through the same services the API uses, so the figures are not all zero: one user
over the size trigger (flushed by the server's workers: a flush done, model calls), two
users below it (pending), and a few queries through the REST API (the per-user cache's
lookups). The server it starts runs with ``FLUSH_INTERVAL_SECONDS=600`` so that the time
trigger does not flush those pending messages before the picture.

Both start a server (``runserver`` on a free loopback port, ``benchmarks.server``) or use
``--url``, and delete what they made afterwards unless ``--keep``. They need the
``playwright`` Python package and a Chromium binary (Debian's ``chromium``: ``apt-get install
chromium``); no browser is downloaded. The chat page's browser test drives the page through
the same helpers (``chromium_browser``, ``chat_connect``, ``chat_new_session``, ``chat_send``).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.core.management.base import CommandError

from benchmarks.dataset import tenant_delete
from benchmarks.errors import BenchError
from benchmarks.server import serving

CHAT_TURNS = [
    "I adopted a golden retriever puppy called Biscuit in March.",
    "My sister Ana is an architect in Porto.",
    "What is my dog's name, and where does my sister work?",
]
CHAT_TIMEOUT_MS = 60_000
STAFF_USERNAME = "dashboard-screenshot"
SAMPLE_PREFIX = "dashboard-sample-"
SAMPLE_MESSAGES = [
    "I moved to Lisbon last spring and started learning Portuguese.",
    "My sister Ana is an architect; she designed a library in Porto.",
    "We adopted a golden retriever puppy called Biscuit in March.",
    "I run 10 km every Sunday morning along the river.",
    "My favourite book this year was a history of the spice trade.",
    "I am planning a trip to Kyoto in October to see the temples.",
]
SAMPLE_FLUSH_TIMEOUT = 120.0  # s


# --- the browser ------------------------------------------------------------------------------


def add_screenshot_arguments(parser, *, out: str, keep: str) -> None:
    """The options both screenshot commands take: ``--out`` (default ``out``), ``--url``,
    ``--chromium``, ``--width`` and ``--keep`` (``keep``: what it keeps)."""
    parser.add_argument("--out", default=out, help=f"PNG path (default {out})")
    parser.add_argument("--url", help="a running server's base URL; default: start one on a free port")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary (default /usr/bin/chromium)")
    parser.add_argument("--width", type=int, default=1440, help="viewport width in CSS pixels")
    parser.add_argument("--keep", action="store_true", help=f"keep {keep}")


def browser_check(options: dict) -> Path:
    """Check that Playwright and ``--chromium`` are there, before anything is started; make
    ``--out``'s folder. Returns the PNG path. Raises ``CommandError`` naming what is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise CommandError("needs the playwright package: pip install playwright==1.65.0") from None
    chromium = Path(options["chromium"])
    if not chromium.exists():
        raise CommandError(f"--chromium: no browser at {chromium} (apt-get install chromium)")
    out = Path(options["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def chromium_browser(executable: Path) -> Iterator:
    """A headless Playwright ``Browser`` of the Chromium at ``executable`` (never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def save_page_png(executable: Path, out: Path, *, width: int, drive: Callable) -> None:
    """``drive(page)`` in a page ``width`` x 900 CSS pixels, then the whole page as a PNG at ``out``."""
    with chromium_browser(executable) as browser:
        page = browser.new_page(viewport={"width": width, "height": 900})
        drive(page)
        page.screenshot(path=str(out), full_page=True)


# --- the chat page ----------------------------------------------------------------------------


def chat_connect(page, url: str, key: str) -> None:
    """Open ``/chat/`` and connect with the API key ``key``."""
    page.goto(f"{url}/chat/")
    page.fill("#api-key", key)
    page.click("#connect")


def chat_new_session(page, *, user: str, session: str, timeout_ms: int) -> None:
    """On a connected chat page: create user ``user`` and session ``session``, wait for the chat."""
    page.wait_for_selector("#pickers:not([hidden])", timeout=timeout_ms)
    page.fill("#new-user", user)
    page.click("#user-form button")
    page.wait_for_selector(f"#user-select option:has-text('{user}')", state="attached", timeout=timeout_ms)
    page.fill("#new-session", session)
    page.click("#session-form button")
    page.wait_for_selector("#chat:not([hidden])", timeout=timeout_ms)


def chat_send(page, number: int, text: str, *, timeout_ms: int) -> None:
    """Send turn ``number`` (from 1): wait for its panel's final frame and for it to be stored."""
    page.fill("#turn-text", text)
    page.click("#send")
    page.wait_for_selector(f"#panel-{number} .stage[data-stage=final]", timeout=timeout_ms)
    page.wait_for_selector(f"#turn-{number} .meta:has-text('stored')", timeout=timeout_ms)


def chat_screenshot(options: dict, *, write, log) -> dict:
    """The chat page in use as a PNG; ``{"out", "url", "turns"}``, also written as JSON through
    ``write(str)``. Raises ``CommandError`` for a missing browser or a server that does not start."""
    from memory.models import KeyScope
    from memory.services.api_keys import api_key_create
    from memory.services.tenants import tenant_create

    out = browser_check(options)
    tenant = tenant_create(name=f"chat-screenshot-{secrets.token_hex(3)}")
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="chat_screenshot")
    log_path = Path(tempfile.gettempdir()) / "chat_screenshot_server.log"
    try:
        with serving(options["url"], log_path=log_path, log=log) as (url, _):
            # Playwright's sync API runs an event loop in this thread; the tenant's deletion
            # below is a plain sync call all the same.
            os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
            save_page_png(Path(options["chromium"]), out, width=options["width"], drive=lambda page: _chat(page, url, key))
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if not options["keep"]:
            tenant_delete(tenant)  # after the server stopped: a failed clean-up must not leave it running
    result = {"out": str(out), "url": f"{url}/chat/", "turns": len(CHAT_TURNS)}
    write(json.dumps(result))
    return result


def _chat(page, url: str, key: str) -> None:
    """Key, user, session, the turns one after the other, then a flush and its event."""
    chat_connect(page, url, key)
    chat_new_session(page, user="alice", session="weekend plans", timeout_ms=CHAT_TIMEOUT_MS)
    for number, text in enumerate(CHAT_TURNS, 1):
        chat_send(page, number, text, timeout_ms=CHAT_TIMEOUT_MS)
    page.click("#flush")
    page.wait_for_selector("#flush-events li", timeout=CHAT_TIMEOUT_MS)


# --- the operator dashboard -------------------------------------------------------------------


def dashboard_screenshot(options: dict, *, write, log) -> dict:
    """The operator dashboard as a PNG; ``{"out", "url", "sample_users"}``, also written as JSON
    through ``write(str)``. Raises ``CommandError`` for a missing browser or a server that does
    not start."""
    from memory.models import KeyScope
    from memory.services.agents import agent_create
    from memory.services.api_keys import api_key_create
    from memory.services.tenants import tenant_create

    out = browser_check(options)
    log_path = Path(tempfile.gettempdir()) / "admin_screenshot_server.log"
    # --insecure: runserver serves the admin's CSS without DEBUG (this picture only).
    server = {"env": {"FLUSH_INTERVAL_SECONDS": "600"}, "args": ["--insecure"]}
    samples: list = []
    try:
        with serving(options["url"], log_path=log_path, log=log, **server) as (url, _):
            password = secrets.token_urlsafe(16)
            staff = _staff_user(password)
            tenant = None
            try:
                if not options["no_sample"]:
                    # The sample lives in a tenant of its own, deleted with everything in it afterwards.
                    tenant = tenant_create(name=f"{SAMPLE_PREFIX}{secrets.token_hex(3)}")
                    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="admin_screenshot")
                    agent = agent_create(tenant_id=tenant.pk, name="assistant")
                    samples = _add_samples(url, agent, key, log=log)
                save_page_png(Path(options["chromium"]), out, width=options["width"], drive=lambda page: _login(page, url, password))
            finally:
                if not options["keep"]:
                    if tenant is not None:
                        tenant_delete(tenant)
                    staff.delete()
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    result = {"out": str(out), "url": f"{url}/admin/dashboard/", "sample_users": len(samples)}
    write(json.dumps(result))
    return result


def _login(page, url: str, password: str) -> None:
    page.goto(f"{url}/admin/login/?next=/admin/dashboard/")
    page.fill("#id_username", STAFF_USERNAME)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#mf-pool", timeout=30_000)


def _staff_user(password: str):
    """The staff user the browser logs in as, with a fresh one-off password."""
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username=STAFF_USERNAME)
    user.is_staff = user.is_superuser = user.is_active = True
    user.set_password(password)
    user.save()
    return user


def _add_samples(url: str, agent, key: str, *, log) -> list:
    """Three users' messages (one flushed by the server, two pending) and a few REST queries."""
    from django.conf import settings

    from memory.models import Message
    from memory.services.messages import MessageIn, messages_add
    from memory.services.sessions import session_create
    from memory.services.users import user_create

    users = []
    for index, count in enumerate([settings.BUFFERS["SIZE_MESSAGES"] + 2, 5, 2]):
        user = user_create(tenant_id=agent.tenant_id, name=f"{SAMPLE_PREFIX}{secrets.token_hex(3)}-{index}")
        session = session_create(user=user, agent=agent, name="sample")
        texts = [SAMPLE_MESSAGES[i % len(SAMPLE_MESSAGES)] for i in range(count)]
        messages_add(session=session, messages=[MessageIn(role="user", content=text) for text in texts])
        users.append(user)
    # The first user is over the size trigger: wait for the server's workers to flush it.
    deadline = time.monotonic() + SAMPLE_FLUSH_TIMEOUT
    while Message.objects.filter(user=users[0], flushed_at__isnull=True).exists():
        if time.monotonic() > deadline:
            log(f"the sample's size-triggered flush did not finish in {SAMPLE_FLUSH_TIMEOUT:.0f} s (no flush workers?)")
            break
        time.sleep(0.5)
    for user in users:
        for query in ["Where does my sister work?", "What is the dog called?"]:
            _query(url, user, query, key, log=log)
    return users


def _query(url: str, user, query: str, key: str, *, log) -> None:
    """A REST query, so the server's per-user cache and model serve it; reports a refusal."""
    request = urllib.request.Request(
        f"{url}/api/v1/users/{user.pk}/query",
        data=json.dumps({"query": query, "top_k": 3}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as exc:
        log(f"sample query refused ({exc.code}): the cache figures show no sample lookups")
