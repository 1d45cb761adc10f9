"""``manage.py runfacts``: extract facts (M1) in a process of its own (``memory.facts.worker``)."""

from __future__ import annotations

import threading

from django.core.management.base import BaseCommand, CommandError

from memory.facts import worker
from memory.inference import llm


class Command(BaseCommand):
    help = "Run the facts (M1) extraction workers until stopped; --once runs the runnable jobs and exits."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Run the jobs runnable now, then exit.")

    def handle(self, *args, once: bool = False, **options):
        if not llm.enabled():
            raise CommandError("The facts layer is off: set LLM_BASE_URL and LLM_MODEL (docs/facts.md).")
        if once:
            self.stdout.write(f"{worker.run_once()} jobs run")
            return
        stop = threading.Event()
        try:
            worker.run_forever(stop)
        except KeyboardInterrupt:
            stop.set()
