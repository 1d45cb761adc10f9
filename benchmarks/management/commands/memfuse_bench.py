"""``python manage.py memfuse_bench {ingest,query,chat}``: benchmarks of the service over HTTP.

The run is ``benchmarks.runner``; each benchmark's phases and options are its class's
(``benchmarks.ingest``, ``benchmarks.query``, ``benchmarks.chat``).
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.management.base import BaseCommand

from benchmarks.runner import BENCHMARKS, memfuse_bench
from benchmarks.server import SERVERS
from memory import startup
from runtime import roles


class Command(BaseCommand):
    help = "Benchmark the service over HTTP and print the results as JSON (see benchmarks.runner)."

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
        for name, bench in BENCHMARKS.items():
            sub = subparsers.add_parser(name, help=bench.help)
            sub.add_argument("--url", help="base URL of a running server (default: start one on loopback)")
            sub.add_argument(
                "--server",
                choices=SERVERS,
                default="uvicorn",
                help="the server the bench starts without --url: uvicorn (the README's production command; "
                "default) or runserver (daphne's, the quick start)",
            )
            sub.add_argument(
                "--api-key",
                default=os.environ.get("MEMFUSE_API_KEY"),
                help="a tenant key of the --url server (default: $MEMFUSE_API_KEY)",
            )
            sub.add_argument("--clients", type=int, default=64, help="concurrent clients")
            sub.add_argument("--json", dest="json_out", type=Path, help="also write the results to this file")
            sub.add_argument("--seed", type=int, help="seed of text selection (default: random, reported)")
            bench.add_arguments(sub)

    def handle(self, *args, **options):
        roles.declare(roles.TOOL)  # a process running retrieval: loads its models
        startup.load_models()
        # memfuse_bench checks the options, then migrates the embedded database (it may be new).
        memfuse_bench(options, stdout=self.stdout, stderr=self.stderr)
