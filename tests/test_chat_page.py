"""The chat page (``/chat/``) in headless Chromium (Playwright, Debian's ``chromium``) against runserver.

A person types a key, creates a user and a session, sends two turns and sees, for the
second, the first one recalled (partial, then final frame, with scores and retrievers), and
a flush event; a wrong key shows the error, not a stack trace. Skipped where the browser or
Playwright is missing (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.screenshots import chat_connect, chat_new_session, chat_send, chromium_browser

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module", autouse=True)
def database_calls_beside_playwrights_loop():
    """Playwright's sync API runs an event loop in this thread, and Django then refuses database
    calls here (fixtures, teardown), though they are plain sync calls from a sync test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="module")
def browser():
    with chromium_browser(CHROMIUM) as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors  # no uncaught script error


def test_two_turns_recall_the_first_and_show_a_flush(runserver, page, tenant_key):
    """Turn two's panel shows turn one recalled, in a partial then a final frame with scores and
    retrievers; Flush now brings a flush.completed event; the key is in sessionStorage, not the URL."""
    chat_connect(page, runserver.url, tenant_key)
    chat_new_session(page, user="alice", session="first chat", timeout_ms=TIMEOUT_MS)

    chat_send(page, 1, "I adopted a golden retriever puppy named Biscuit.", timeout_ms=TIMEOUT_MS)
    page.fill("#turn-text", "What is my puppy called?")
    page.click("#send")
    page.wait_for_selector("#panel-2 .stage[data-stage=final]", timeout=TIMEOUT_MS)

    stages = page.locator("#panel-2 .stage")
    assert [stages.nth(i).get_attribute("data-stage") for i in range(stages.count())] == ["partial", "final"]
    final = page.locator("#panel-2 .stage[data-stage=final] li").first
    assert "Biscuit" in final.inner_text()
    assert "bm25" in final.locator(".retrievers").inner_text()
    assert float(final.locator(".score").inner_text()) > 0
    assert "nothing recalled" in page.locator("#panel-1").inner_text()  # the first turn had no past

    page.click("#flush")
    event = page.wait_for_selector("#flush-events li", timeout=TIMEOUT_MS)
    assert "flush.completed" in event.inner_text()

    assert tenant_key not in page.url
    assert page.evaluate("sessionStorage.getItem('memfuse.apiKey')") == tenant_key
    assert page.locator("#error").is_hidden()


def test_a_wrong_key_shows_the_error_without_a_stack_trace(runserver, page):
    """A key that does not resolve: the page says so in words, and offers no user or session."""
    chat_connect(page, runserver.url, "abcdefgh.notakey")

    error = page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)

    text = error.inner_text()
    assert "Invalid, expired or revoked API key" in text
    assert "Traceback" not in text and "Error:" not in text and ".js" not in text
    assert page.locator("#pickers").is_hidden() and page.locator("#chat").is_hidden()
