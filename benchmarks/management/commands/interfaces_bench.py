"""``manage.py interfaces_bench``: what a call costs through MCP against REST, and what a time bound costs (``benchmarks.interfaces``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from benchmarks.interfaces import interfaces_bench
from benchmarks.server import SERVERS


class Command(BaseCommand):
    help = "Per-call cost of the MCP tools against REST, and of a time-bounded query against an unbounded one (JSON)."

    def add_arguments(self, parser):
        parser.add_argument("--messages", type=int, default=1000, help="turns in the user's history (default 1000)")
        parser.add_argument("--calls", type=int, default=200, help="measured calls per mode (default 200)")
        parser.add_argument("--warmup", type=int, default=20, help="unmeasured calls per mode first (default 20)")
        parser.add_argument(
            "--server", choices=SERVERS, default="uvicorn", help="the server to start (default uvicorn)"
        )
        parser.add_argument("--url", help="a running server's base URL instead (its CPU is not measured)")
        parser.add_argument("--json", help="also write the JSON report to this file")

    def handle(self, *args, **options):
        interfaces_bench(options, write=self.stdout.write, log=self.stderr.write)
