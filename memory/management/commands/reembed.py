"""``manage.py reembed --model PATH [--batch-size N] [--drop-old]``, ``reembed --drop-old``,
``reembed --abort``.

Re-embeds every message and knowledge item with the sentence-transformers model at PATH
while the service keeps answering with the current one, then switches queries to it
(``memory.indexing.reembed``). Run it again after an interruption: it resumes where it stopped.
Prints a progress bar per phase and, at the end, its throughput against the model's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from memory.indexing import reembed, reembed_columns
from runtime.embedded_pg import migrate_if_embedded


class Command(BaseCommand):
    help = "Re-embed every message and knowledge item with another embedding model, online, then switch to it."

    def add_arguments(self, parser):
        parser.add_argument("--model", type=Path, help="directory of the new sentence-transformers model")
        parser.add_argument("--batch-size", type=int, default=256, help="rows per batch (default 256)")
        parser.add_argument(
            "--drop-old", action="store_true", help="drop the previous model's columns (after a switch)"
        )
        parser.add_argument("--abort", action="store_true", help="drop an unfinished run's columns and progress")
        # Stop after that many fill batches, as a kill would: what the resume tests start from.
        parser.add_argument("--stop-after-batches", type=int, help="stop after N fill batches (to test resuming)")

    def handle(
        self, *args, model: Path | None, batch_size: int, drop_old: bool, abort: bool, stop_after_batches, **options
    ):
        # The arguments first: a mistyped command is refused without touching the database.
        if model is None and not (abort or drop_old):
            raise CommandError("--model: give the directory of the new model (or --drop-old, or --abort)")
        if model is not None and not model.is_dir():
            raise CommandError(f"--model: not a directory: {model}")
        if batch_size < 1:
            raise CommandError("--batch-size: must be at least 1")
        migrate_if_embedded()
        if abort:
            found = reembed_columns.reembed_abort()
            self.stdout.write("unfinished run dropped" if found else "no unfinished run")
            return
        if model is None:
            found = reembed_columns.reembed_drop_old()
            self.stdout.write("old embeddings dropped" if found else "no old embeddings to drop")
            return
        bars: dict[str, tqdm] = {}

        def progress(phase: str, done: int, total: int) -> None:
            bar = bars.get(phase)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[phase] = tqdm(total=total, desc=phase, unit="row", disable=None)
            bar.total = max(total, done)
            bar.n = done
            bar.refresh()

        try:
            stats = reembed.reembed_run(
                model_path=model,
                batch_size=batch_size,
                progress=progress,
                stop_after_batches=stop_after_batches,
                drop_old=drop_old,
            )
        except reembed.ReembedError as exc:
            raise CommandError(str(exc)) from None
        finally:
            for bar in bars.values():
                bar.close()
        rate, raw = stats.texts_per_second, stats.raw_texts_per_second
        self.stdout.write(
            json.dumps(
                {
                    "model": str(model),
                    "embedded": stats.embedded,
                    "switched": stats.switched,
                    "fill_seconds": round(stats.fill_seconds, 2),
                    "texts_per_s": round(rate, 1) if rate else None,
                    "model_texts_per_s": round(raw, 1) if raw else None,
                    "share_of_model_throughput": round(rate / raw, 3) if rate and raw else None,
                },
                indent=2,
            )
        )
