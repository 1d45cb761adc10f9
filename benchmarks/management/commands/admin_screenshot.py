"""``manage.py admin_screenshot``: a PNG of the operator dashboard, taken in headless Chromium (``benchmarks.screenshots``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from benchmarks.screenshots import add_screenshot_arguments, dashboard_screenshot


class Command(BaseCommand):
    help = "Save a PNG of the operator dashboard, taken in headless Chromium."

    def add_arguments(self, parser):
        add_screenshot_arguments(parser, out="docs/dashboard.png", keep="the sample users and the staff user")
        parser.add_argument(
            "--no-sample", action="store_true", help="add no sample data: show the server's state as it is"
        )

    def handle(self, *args, **options):
        dashboard_screenshot(options, write=self.stdout.write, log=self.stderr.write)
