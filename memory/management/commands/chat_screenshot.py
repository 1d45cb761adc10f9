"""``manage.py chat_screenshot``: a PNG of the chat page (``/chat/``) in use, taken in headless Chromium.

Starts a server (``runserver`` on a free loopback port, as ``memfuse_bench`` does) or uses
``--url``, creates a tenant of its own with a key, and drives the page as a person would:
types the key, creates a user and a session, sends a few turns (each one's panel fills with
what it recalls: the partial BM25 frame, then the final fused one, with scores and
retrievers), presses "Flush now" and waits for the ``flush.completed`` event, then saves the
page as a PNG. The tenant is deleted afterwards with everything in it unless ``--keep``.

Needs the ``playwright`` Python package and a Chromium binary (Debian's ``chromium``:
``apt-get install chromium``); no browser is downloaded.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from memory import services
from memory.management.commands.memfuse_bench import ServerProcess
from memory.models import KeyScope, User

TURNS = [
    "I adopted a golden retriever puppy called Biscuit in March.",
    "My sister Ana is an architect in Porto.",
    "What is my dog's name, and where does my sister work?",
]
TIMEOUT_MS = 60_000


class Command(BaseCommand):
    help = "Save a PNG of the chat page in use (docs/chat.png), taken in headless Chromium."

    def add_arguments(self, parser):
        parser.add_argument("--out", default="docs/chat.png", help="PNG path (default docs/chat.png)")
        parser.add_argument("--url", help="a running server's base URL; default: start one on a free port")
        parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary (default /usr/bin/chromium)")
        parser.add_argument("--width", type=int, default=1440, help="viewport width in CSS pixels")
        parser.add_argument("--keep", action="store_true", help="keep the sample tenant")

    def handle(self, *args, **options):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise CommandError("needs the playwright package: pip install playwright==1.65.0") from None
        chromium = Path(options["chromium"])
        if not chromium.exists():
            raise CommandError(f"--chromium: no browser at {chromium} (apt-get install chromium)")
        out = Path(options["out"])
        out.parent.mkdir(parents=True, exist_ok=True)

        tenant = services.tenant_create(name=f"chat-screenshot-{secrets.token_hex(3)}")
        _, key = services.api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="chat_screenshot")
        server = None
        url = (options["url"] or "").rstrip("/")
        try:
            if not url:
                log = Path(tempfile.gettempdir()) / "chat_screenshot_server.log"
                server = ServerProcess(log_path=log)
                self.stderr.write(f"starting a server (log: {log})")
                url = server.start()
            # Playwright's sync API runs an event loop in this thread; the tenant's deletion
            # below is a plain sync call all the same.
            os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": options["width"], "height": 900})
                    self._chat(page, url, key)
                    page.screenshot(path=str(out), full_page=True)
                finally:
                    browser.close()
        finally:
            if server is not None:
                server.stop()  # first: a failed clean-up must not leave it running
            if not options["keep"]:
                # Users first, through user_delete: it locks as a running flush does (a cascade does not).
                for user in User.objects.filter(tenant=tenant):
                    services.user_delete(user=user)
                tenant.delete()
        self.stdout.write(json.dumps({"out": str(out), "url": f"{url}/chat/", "turns": len(TURNS)}))

    @staticmethod
    def _chat(page, url: str, key: str) -> None:
        """Key, user, session, the turns one after the other, then a flush and its event."""
        page.goto(f"{url}/chat/")
        page.fill("#api-key", key)
        page.click("#connect")
        page.wait_for_selector("#pickers:not([hidden])", timeout=TIMEOUT_MS)
        page.fill("#new-user", "alice")
        page.click("#user-form button")
        page.wait_for_selector("#user-select option:has-text('alice')", state="attached", timeout=TIMEOUT_MS)
        page.fill("#new-session", "weekend plans")
        page.click("#session-form button")
        page.wait_for_selector("#chat:not([hidden])", timeout=TIMEOUT_MS)
        for number, text in enumerate(TURNS, 1):
            page.fill("#turn-text", text)
            page.click("#send")
            page.wait_for_selector(f"#panel-{number} .stage[data-stage=final]", timeout=TIMEOUT_MS)
            page.wait_for_selector(f"#turn-{number} .meta:has-text('stored')", timeout=TIMEOUT_MS)
        page.click("#flush")
        page.wait_for_selector("#flush-events li", timeout=TIMEOUT_MS)
