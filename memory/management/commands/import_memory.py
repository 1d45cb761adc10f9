"""``manage.py import_memory FILE --tenant T [--user NAME] [--format memfuse|locomo]``.

Imports a user's memory (``memory.portability``): a JSON Lines export (the default format),
or a LoCoMo file (``--format locomo``: one user per conversation, named
``<NAME or "locomo">-<sample_id>``). Validates the whole file first; nothing is written when a
line is wrong. Idempotent by record id: run it again after an interruption to finish. The
command acts as the tenant: it may create the agents the file names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from memory.errors import ServiceError
from memory.models import KeyScope, Tenant
from memory.portability import importer
from memory.portability.locomo import locomo_records
from runtime.embedded_pg import migrate_if_embedded


class Command(BaseCommand):
    help = "Import a user's memory from an export file (JSON Lines) or a LoCoMo file."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path, help="the file to import")
        parser.add_argument("--tenant", required=True, help="the tenant's name")
        parser.add_argument("--user", help="the user to import into (by name; created when missing)")
        parser.add_argument("--format", choices=["memfuse", "locomo"], default="memfuse", help="the file's format")

    def handle(self, *args, file: Path, tenant: str, user: str | None, format: str, **options):
        migrate_if_embedded()
        if not file.is_file():
            raise CommandError(f"file: no such file: {file}")
        found = Tenant.objects.filter(name=tenant).first()
        if found is None:
            raise CommandError(f"--tenant: no tenant named {tenant!r} (manage.py create_tenant creates one)")
        if format == "locomo":
            jobs = self._locomo_sources(file, prefix=user or "locomo")
            user = None  # each conversation names its user
        else:
            jobs = [(importer.jsonl_source(file), _count_lines(file))]
        started = time.perf_counter()
        reports = []
        for source, total in jobs:
            with tqdm(total=total, desc=f"import {file.name}", unit="record", disable=None) as progress:
                try:
                    report = importer.memory_import(
                        tenant_id=found.pk,
                        source=source,
                        user_name=user,
                        scope=KeyScope.TENANT,
                        progress=progress.update,
                    )
                except ServiceError as exc:
                    raise CommandError(f"{exc.errors[0]['field'] or 'file'}: {exc.message}") from None
            reports.append(report.as_dict())
        seconds = time.perf_counter() - started
        messages = sum(r["created"]["messages"] + r["existing"]["messages"] for r in reports)
        self.stdout.write(
            json.dumps(
                {
                    "users": reports,
                    "seconds": round(seconds, 2),
                    "messages_per_s": round(messages / seconds, 1) if seconds else None,
                },
                indent=2,
            )
        )

    @staticmethod
    def _locomo_sources(file: Path, *, prefix: str) -> list:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CommandError(f"file: cannot read {file} as JSON: {exc}") from None
        if not isinstance(data, list) or not all(
            isinstance(c, dict) and isinstance(c.get("conversation"), dict) for c in data
        ):
            raise CommandError("file: expected a JSON list of LoCoMo conversations (objects with 'conversation')")
        jobs = []
        for index, item in enumerate(data):
            records = list(locomo_records(item, index=index, user_name=lambda sample_id: f"{prefix}-{sample_id}"))
            jobs.append((importer.records_of(records), len(records)))
        return jobs


def _count_lines(file: Path) -> int:
    """The lines of ``file`` (the progress bar's total), read a MiB at a time: a line may be
    longer than the import will read of it (``IMPORT_MAX_LINE_BYTES``)."""
    lines = 0
    last = b"\n"
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
