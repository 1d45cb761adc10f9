"""``python manage.py soak_bench {soak,pool-check,index-load,respawn,ws-connections,tenants}``: a mixed
load for minutes, the pool check's cost (``benchmarks.soak``), what loading a user's index costs
a process (``benchmarks.index_load``), the service's start, memory by process and the return of
a killed query process (``benchmarks.respawn``), what an open WebSocket connection holds
(``benchmarks.ws_connections``), or what an abusive tenant costs three others
(``benchmarks.tenants``)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from benchmarks.soak import soak_bench
from benchmarks.tenants import DEFAULT_ABUSE


class Command(BaseCommand):
    help = (
        "soak: mixed load for minutes (memory slope, errors, backlog); pool-check: cost of the pool's connection check; "
        "index-load: peak memory and time of loading a user's index in a fresh process; "
        "respawn: seconds to start, memory by process (RSS, PSS, USS), seconds until a killed query process answers again; "
        "ws-connections: the web process's memory per open WebSocket connection; "
        "tenants: three well-behaved tenants alone, then beside an abusive one (latency, errors, flush lag, memory)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "mode", choices=["soak", "pool-check", "index-load", "respawn", "ws-connections", "tenants"]
        )
        parser.add_argument("--url", help="base URL of a running server (default: start uvicorn on loopback)")
        parser.add_argument("--api-key", help="a tenant key (with --url)")
        parser.add_argument(
            "--server-pid", type=int, help="with --url: the server's process id, for its memory figures"
        )
        parser.add_argument("--operator-key", help="with --url: an operator key, to sample the server's per-user cache")
        parser.add_argument(
            "--server-env", action="append", default=[], metavar="NAME=VALUE", help="environment of the started server"
        )
        parser.add_argument("--duration", type=float, help="seconds of load (default 600; tenants: 60 per run)")
        parser.add_argument(
            "--warmup", type=float,
            help="seconds of samples left out of the memory slope (default 60; tenants: of requests left out of the latency, 5)",
        )  # fmt: skip
        parser.add_argument(
            "--users", type=int, default=4,
            help="add clients, one user and session each (respawn: users warmed up; ws-connections: sessions; tenants: per well-behaved tenant)",
        )  # fmt: skip
        parser.add_argument(
            "--add-rate", type=float, help="adds (rounds of 2 messages) per second, in all (default 20; tenants: 6)"
        )
        parser.add_argument("--query-rate", type=float, default=5.0, help="REST queries per second, in all")
        parser.add_argument("--query-clients", type=int, default=2)
        parser.add_argument("--ws-clients", type=int, default=4, help="WebSocket clients connecting and leaving")
        parser.add_argument("--ws-frames", type=int, default=6, help="frames per WebSocket connection")
        parser.add_argument("--sample-seconds", type=float, default=5.0)
        parser.add_argument(
            "--drain-timeout", type=float,
            help="seconds to wait for the backlog to empty (default 600; tenants: for a run's well-behaved messages, 60)",
        )  # fmt: skip
        parser.add_argument(
            "--iterations", type=int, default=20000, help="pool-check: getconn/putconn pairs per timed pass"
        )
        parser.add_argument(
            "--sizes", default="10000,30000,100000", help="index-load: the users' message counts, comma-separated"
        )
        parser.add_argument(
            "--repeats", type=int, default=5, help="index-load: fresh processes per user; respawn: servers started"
        )
        parser.add_argument(
            "--connections", type=int, default=300, help="ws-connections: connections held open at once"
        )
        parser.add_argument(
            "--abuse",
            default=DEFAULT_ABUSE,
            help="tenants: the abuser's kinds, comma-separated, of adds, flush-waits, imports, keyless, backlog",
        )
        parser.add_argument(
            "--abuse-add-rate", type=float, default=0.0,
            help="tenants: messages per second of the abuser's adds (0: three times the flush rate, measured first)",
        )  # fmt: skip
        parser.add_argument("--abuse-users", type=int, default=16, help="tenants: the abuser's users")
        parser.add_argument(
            "--flush-waits", type=int, default=32, help="tenants: the abuser's concurrent waiting flushes"
        )
        parser.add_argument("--import-mb", type=float, default=4.0, help="tenants: MB of each of the abuser's imports")
        parser.add_argument(
            "--keyless-mb", type=float, default=256.0, help="tenants: MiB of each body sent with no key"
        )
        parser.add_argument("--json", dest="json_out", type=Path, help="also write the results to this file")

    def handle(self, *args, **options):
        soak_bench(options, write=self.stdout.write)
