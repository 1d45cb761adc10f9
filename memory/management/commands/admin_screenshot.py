"""``manage.py admin_screenshot``: a PNG of the operator dashboard, taken in headless Chromium.

Starts a server (``runserver`` on a free loopback port, as ``memfuse_bench`` does) or uses
``--url``, creates a staff user with a one-off password, logs in through the admin's login
form and saves ``/admin/dashboard/`` as a full-page PNG. Unless ``--no-sample``, it first adds
a few users' messages through the same services the API uses, so the figures are not all
zero: one user over the size trigger (flushed by the server's workers: a flush done, model
calls), two users below it (pending), and a few queries through the REST API (the per-user
cache's lookups). The server it starts runs with ``FLUSH_INTERVAL_SECONDS=600`` so that the
time trigger does not flush those pending messages before the picture. The sample users and
the staff user are deleted afterwards unless ``--keep``.

Needs the ``playwright`` Python package and a Chromium binary (Debian's ``chromium``:
``apt-get install chromium``); no browser is downloaded. Nothing in the tests or CI needs them.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from memory import services
from memory.management.commands.memfuse_bench import ServerProcess
from memory.models import KeyScope, Message, User
from memory.services import MessageIn

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


class Command(BaseCommand):
    help = "Save a PNG of the operator dashboard, taken in headless Chromium."

    def add_arguments(self, parser):
        parser.add_argument("--out", default="docs/dashboard.png", help="PNG path (default docs/dashboard.png)")
        parser.add_argument("--url", help="a running server's base URL; default: start one on a free port")
        parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary (default /usr/bin/chromium)")
        parser.add_argument("--width", type=int, default=1440, help="viewport width in CSS pixels")
        parser.add_argument("--no-sample", action="store_true", help="add no sample data: show the server's state as it is")
        parser.add_argument("--keep", action="store_true", help="keep the sample users and the staff user")

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

        server = None
        url = (options["url"] or "").rstrip("/")
        if not url:
            log = Path(tempfile.gettempdir()) / "admin_screenshot_server.log"
            # --insecure: runserver serves the admin's CSS without DEBUG (this picture only).
            server = ServerProcess(log_path=log, env={"FLUSH_INTERVAL_SECONDS": "600"}, args=["--insecure"])
            self.stderr.write(f"starting a server (log: {log})")
            url = server.start()
        password = secrets.token_urlsafe(16)
        staff = self._staff_user(password)
        samples: list[User] = []
        tenant = None
        try:
            if not options["no_sample"]:
                # The sample lives in a tenant of its own, deleted with everything in it afterwards.
                tenant = services.tenant_create(name=f"{SAMPLE_PREFIX}{secrets.token_hex(3)}")
                _, self.key = services.api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="admin_screenshot")
                agent = services.agent_create(tenant_id=tenant.pk, name="assistant")
                samples = self._add_samples(url, agent)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": options["width"], "height": 900})
                    page.goto(f"{url}/admin/login/?next=/admin/dashboard/")
                    page.fill("#id_username", STAFF_USERNAME)
                    page.fill("#id_password", password)
                    page.click("input[type=submit]")
                    page.wait_for_selector("#mf-pool", timeout=30_000)
                    page.screenshot(path=str(out), full_page=True)
                finally:
                    browser.close()
        finally:
            if not options["keep"]:
                if tenant is not None:
                    tenant.delete()
                staff.delete()
            if server is not None:
                server.stop()
        self.stdout.write(json.dumps({"out": str(out), "url": f"{url}/admin/dashboard/", "sample_users": len(samples)}))

    def _staff_user(self, password: str):
        """The staff user the browser logs in as, with a fresh one-off password."""
        user, _ = get_user_model().objects.get_or_create(username=STAFF_USERNAME)
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
        return user

    def _add_samples(self, url: str, agent) -> list[User]:
        """Three users' messages (one flushed by the server, two pending) and a few REST queries."""
        users = []
        for index, count in enumerate([settings.BUFFERS["SIZE_MESSAGES"] + 2, 5, 2]):
            user = services.user_create(tenant_id=agent.tenant_id, name=f"{SAMPLE_PREFIX}{secrets.token_hex(3)}-{index}")
            session = services.session_create(user=user, agent=agent, name="sample")
            texts = [SAMPLE_MESSAGES[i % len(SAMPLE_MESSAGES)] for i in range(count)]
            services.messages_add(session=session, messages=[MessageIn(role="user", content=text) for text in texts])
            users.append(user)
        # The first user is over the size trigger: wait for the server's workers to flush it.
        deadline = time.monotonic() + 120
        while Message.objects.filter(user=users[0], flushed_at__isnull=True).exists():
            if time.monotonic() > deadline:
                self.stderr.write("the sample's size-triggered flush did not finish in 120 s (no flush workers?)")
                break
            time.sleep(0.5)
        for user in users:
            for query in ["Where does my sister work?", "What is the dog called?"]:
                self._query(url, user, query)
        return users

    def _query(self, url: str, user: User, query: str) -> None:
        """A REST query, so the server's per-user cache and model serve it; reports a refusal."""
        request = urllib.request.Request(
            f"{url}/api/v1/users/{user.pk}/query",
            data=json.dumps({"query": query, "top_k": 3}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as exc:
            self.stderr.write(f"sample query refused ({exc.code}): the cache figures show no sample lookups")
