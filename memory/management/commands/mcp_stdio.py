"""``manage.py mcp_stdio``: the MCP tools over stdio, for a desktop MCP client on the same host."""

from __future__ import annotations

import os

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from memory import tenancy
from memory.mcp import tools


class Command(BaseCommand):
    help = (
        "Serve the MCP tools (memory_add, memory_query, ...) over stdin/stdout, acting with one API key "
        "(--key, else MEMFUSE_API_KEY). The client starts this command; the same tools are served over "
        "HTTP at /mcp by the web server. Messages added here are flushed by the web server's or "
        "runworker's flush workers."
    )

    def add_arguments(self, parser):
        parser.add_argument("--key", help="the API key to act with (default: the MEMFUSE_API_KEY variable)")

    def handle(self, *args, **options):
        key = options["key"] or os.environ.get("MEMFUSE_API_KEY")
        if not key:
            raise CommandError("An API key is required: --key or MEMFUSE_API_KEY (create_tenant, create_api_key)")
        principal = tenancy.resolve_key(key)
        if principal is None:
            raise CommandError("Invalid, expired or revoked API key")
        if principal.tenant_id is None:
            raise CommandError("Operator keys cannot access tenant data: use a tenant or user key")
        connections.close_all()  # the tools work in other threads, with connections of their own
        tools.use_stdio_key(principal)
        # Until stdin closes. The SDK points fd 1 at stderr while it serves, so stray output
        # (and child processes started meanwhile, such as the embedding process) cannot corrupt
        # the protocol's stream.
        tools.server.run("stdio")
