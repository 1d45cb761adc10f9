"""The cross-encoder reranker (``RERANKER_MODEL_PATH``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from memory.inference.encoders import ModelStats


class RerankerLoadError(RuntimeError):
    """The configured ``RERANKER_MODEL_PATH`` does not hold a loadable cross-encoder."""


def reranker_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold a cross-encoder (a message), or ``None`` if it looks usable.

    Reads no weights (system checks call it): the directory must exist and hold a
    transformers ``config.json`` of a sequence-classification model with one label.
    """
    if not path.is_dir():
        return f"RERANKER_MODEL_PATH {path} is not a directory"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"RERANKER_MODEL_PATH {path} has no readable config.json ({exc})"
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    if labels not in (None, 1):
        return f"RERANKER_MODEL_PATH {path} is a classifier with {labels} labels; a reranker has one"
    return None


class Reranker:
    """A cross-encoder (sentence-transformers ``CrossEncoder``), thread-safe to call.

    ``score(query, texts)`` returns ``(len(texts),)`` float32 relevance scores, higher is
    more relevant (the model's single logit through a sigmoid: only the order matters).
    Raises ``RerankerLoadError`` when ``path`` does not hold a loadable model.
    """

    def __init__(self, path: Path, *, batch_size: int, threads: int, max_length: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        problem = reranker_path_problem(path)
        if problem:
            raise RerankerLoadError(problem)
        started = time.perf_counter()
        import torch
        from sentence_transformers import CrossEncoder

        torch.set_num_threads(max(1, threads))
        self.path = path
        self.batch_size = batch_size
        try:
            self.model = CrossEncoder(str(path), device="cpu", local_files_only=True, max_length=max_length)
        except Exception as exc:  # any failure to build the model is a configuration error
            raise RerankerLoadError(f"RERANKER_MODEL_PATH {path} could not be loaded: {exc}") from exc
        self.stats = ModelStats(load_seconds=time.perf_counter() - started)
        self._inference_lock = threading.Lock()

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        """Relevance of each of ``texts`` to ``query``: ``(len(texts),)`` float32."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        with self._inference_lock:
            started = time.perf_counter()
            scores = self.model.predict(
                [(query, text) for text in texts],
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            elapsed = time.perf_counter() - started
        self.stats.record(texts=len(texts), seconds=elapsed)
        return np.asarray(scores, dtype=np.float32).reshape(len(texts))

