"""``python manage.py locomo_eval PATH``: retrieval recall@k on a LoCoMo-format file (``memory.evaluation``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from django.core.management.base import BaseCommand

from memory import startup
from memory.evaluation import locomo_eval
from runtime import roles
from runtime.embedded_pg import migrate_if_embedded


class Command(BaseCommand):
    help = "Ingest a LoCoMo-format file and measure retrieval recall@5/10/20 of the evidence turns."

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path, help="LoCoMo-format JSON file (a list of conversations)")
        parser.add_argument("--json", dest="json_out", type=Path, help="write the results as JSON to this file")
        parser.add_argument("--keep", action="store_true", help="keep the users created (default: delete them)")
        parser.add_argument("--conversations", type=int, default=0, help="only the first N conversations (0: all)")
        parser.add_argument("--bm25-weight", type=float, help="override BM25_WEIGHT for this run")
        parser.add_argument("--vector-weight", type=float, help="override VECTOR_WEIGHT for this run")
        parser.add_argument("--rrf-k", type=int, help="override RRF_K for this run")
        parser.add_argument("--speaker-weight", type=float, help="override SPEAKER_WEIGHT for this run (0: off)")
        parser.add_argument(
            "--rerank",
            action=argparse.BooleanOptionalAction,
            help="rerank with the RERANKER_MODEL_PATH cross-encoder (default: RERANK when a model is set)",
        )
        parser.add_argument("--rerank-top-n", type=int, help="override RERANK_TOP_N for this run")
        parser.add_argument(
            "--layers",
            default="m0",
            help="memory layers to search, comma-separated: m0 (messages), m1 (facts; needs LLM_BASE_URL). Default m0",
        )

    def handle(self, *args, **options):
        roles.declare(roles.TOOL)  # a process running retrieval: loads its models
        startup.load_models()
        migrate_if_embedded()  # the embedded database may be new
        locomo_eval(options, write=self.stdout.write)
