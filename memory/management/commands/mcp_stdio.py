"""``manage.py mcp_stdio``: the MCP tools over stdio, for a desktop MCP client on the same host."""

from __future__ import annotations

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from memory import tenancy
from memory.mcp import tools


class Command(BaseCommand):
    help = (
        "Serve the MCP tools (memory_add, memory_query, ...) over stdin/stdout, acting with one API key: "
        "the MEMFUSE_API_KEY variable, --key-file PATH, or --key (which every user of the host can read "
        "in ps). The client starts this command; the same tools are served over HTTP at /mcp by the web "
        "server. Messages added here are flushed by the web server's or runworker's flush workers."
    )

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group()
        source.add_argument(
            "--key-file", metavar="PATH", help="a file holding the API key, e.g. .pgdata/local-api-key (instead of MEMFUSE_API_KEY)"
        )
        source.add_argument(
            "--key",
            help="the API key itself (instead of MEMFUSE_API_KEY). A command line shows in ps and /proc to "
            "every user of the host: prefer MEMFUSE_API_KEY or --key-file",
        )

    def handle(self, *args, **options):
        principal = tenancy.resolve_key(self.api_key(options))
        if principal is None:
            raise CommandError("Invalid, expired or revoked API key")
        if principal.tenant_id is None:
            raise CommandError("Operator keys cannot access tenant data: use a tenant or user key")
        connections.close_all()  # the tools work in other threads, with connections of their own
        tools.use_stdio_key(principal)
        # Until stdin closes. The SDK points fd 1 at stderr while it serves, so stray output
        # (and child processes started meanwhile, such as the embedding process) cannot corrupt
        # the protocol's stream.
        tools.mcp_server().run("stdio")

    @staticmethod
    def api_key(options: dict) -> str:
        """The key to act with: ``--key-file``'s contents (stripped), ``--key``, else
        ``MEMFUSE_API_KEY``. Raises ``CommandError`` naming the source when there is none or
        the file cannot be read."""
        if options.get("key_file"):
            path = Path(options["key_file"])
            try:
                key = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"--key-file: cannot read {path}: {exc}") from None
            if not key:
                raise CommandError(f"--key-file: {path} is empty")
            return key
        key = options.get("key") or os.environ.get("MEMFUSE_API_KEY")
        if not key:
            raise CommandError(
                "An API key is required: MEMFUSE_API_KEY, --key-file PATH or --key (create_tenant, create_api_key)"
            )
        return key
