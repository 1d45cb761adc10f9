"""``manage.py chat_screenshot``: a PNG of the chat page (``/chat/``) in use, taken in headless Chromium (``benchmarks.screenshots``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from benchmarks.screenshots import add_screenshot_arguments, chat_screenshot


class Command(BaseCommand):
    help = "Save a PNG of the chat page in use (docs/chat.png), taken in headless Chromium."

    def add_arguments(self, parser):
        add_screenshot_arguments(parser, out="docs/chat.png", keep="the sample tenant")

    def handle(self, *args, **options):
        chat_screenshot(options, write=self.stdout.write, log=self.stderr.write)
