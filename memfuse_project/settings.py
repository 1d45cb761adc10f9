"""Settings for MemFuse for Django, read from the environment.

Every value has a default that works on a laptop: without ``DATABASE_URL`` the service runs
an embedded PostgreSQL (the ``pgserver`` package) in ``.pgdata/`` inside the working directory.
Importing this module only reads the environment: the embedded server is started by the entry
points (``runtime.embedded_pg.start_if_embedded``).
"""

import importlib.util
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from memfuse_project.env import envbool, envfloat, envint, envlist, envstr, scaled_rate

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DEBUG", False)
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")

# --- HTTPS behind a proxy (docs/operations.md, "Deploy"): each off by default, for plain-HTTP laptops.
# SECURE_PROXY_SSL_HEADER is "<META name>,<value>", e.g. "HTTP_X_FORWARDED_PROTO,https": only
# behind a proxy that always sets (or strips) that header, else a client could claim HTTPS.
SECURE_PROXY_SSL_HEADER = tuple(envlist("SECURE_PROXY_SSL_HEADER")) or None
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", False)
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")


INSTALLED_APPS = [
    # daphne first: its runserver serves the ASGI application (HTTP and WebSocket).
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    # API keys: our memory.ApiKey subclasses its AbstractAPIKey (its own APIKey table stays unused).
    "rest_framework_api_key",
    "channels",
    # OpenAPI schema (/api/schema/) and its docs pages, with the UI's assets served from here.
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "memory",
    "buffers",
]

# The development tools (benchmarks, the soak, the screenshots: the ``benchmarks`` app and its
# management commands) beside the product, never inside it. Installed when the package is
# there to import (a source checkout) unless MEMFUSE_TOOLS is off; a deployment sets it off, or
# ships without ``benchmarks/``, and its ``manage.py`` then knows only the operator commands.
MEMFUSE_TOOLS = envbool("MEMFUSE_TOOLS", importlib.util.find_spec("benchmarks") is not None)
if MEMFUSE_TOOLS:
    INSTALLED_APPS.append("benchmarks")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The REST API's requests (``/api/`` under ASGI, see ``memfuse_project.lifespan.APIHandler``) skip
# the middlewares above: it keeps no sessions or cookies and authenticates every request.
API_MIDDLEWARE: list[str] = []

ROOT_URLCONF = "memfuse_project.urls"
WSGI_APPLICATION = "memfuse_project.wsgi.application"
ASGI_APPLICATION = "memfuse_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# The only way to the database is Django's native psycopg pool (Django 5.1+): connection
# count stays bounded by DB_POOL_MAX_SIZE per process whatever the number of users.
DB_POOL = {
    "min_size": envint("DB_POOL_MIN_SIZE", 2),
    "max_size": envint("DB_POOL_MAX_SIZE", 10),
    # Seconds a request waits for a free connection before psycopg_pool raises PoolTimeout.
    "timeout": envfloat("DB_POOL_TIMEOUT", 10.0),
}
EMBEDDED_PG_DIR = Path(envstr("EMBEDDED_PG_DIR", str(Path.cwd() / ".pgdata")))

USING_EMBEDDED_DB = not envstr("DATABASE_URL")
if not USING_EMBEDDED_DB:
    _default_db = dj_database_url.parse(envstr("DATABASE_URL"))
else:
    from runtime.embedded_pg import database_settings

    _default_db = database_settings(EMBEDDED_PG_DIR)

_default_db.update(
    {
        "ENGINE": "django.db.backends.postgresql",
        "CONN_MAX_AGE": 0,  # required with a pool: the pool owns connection lifetime
        # With a pool, Django passes psycopg_pool's check_connection (an empty query) as the
        # pool's check: a connection a database restart closed is dropped when taken, never
        # handed to a request. Its cost per request: docs/benchmarks.md, "Pool check".
        "CONN_HEALTH_CHECKS": envbool("DB_CONN_HEALTH_CHECKS", True),
        "OPTIONS": {
            **_default_db.get("OPTIONS", {}),
            "pool": DB_POOL,
            "server_side_binding": envbool("DB_SERVER_SIDE_BINDING", True),
            # Statements run this often on a connection are prepared (psycopg; Django's default
            # is never): the flush's and the query's statements are long, and planning them at
            # every run cost PostgreSQL more than running them. 0: never (transaction poolers).
            "prepare_threshold": envint("DB_PREPARE_THRESHOLD", 5) or None,
        },
    }
)
DATABASES = {"default": _default_db}

# Signs the admin's sessions and CSRF tokens. The embedded default keeps a random one in its
# data folder, read (or created at first start, like the development tenant's key) when the
# embedded server is started; any other deployment must set it: a default in the source
# would be a key anyone can read.
SECRET_KEY = envstr("SECRET_KEY")
if not SECRET_KEY and not USING_EMBEDDED_DB:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set. With DATABASE_URL the service needs SECRET_KEY (or SECRET_KEY_FILE): "
        "50 or more random characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channels -------------------------------------------------------------------------------
REDIS_URL = envstr("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 reads with a 5 s socket timeout, as long as channels_redis's
                # blocking pop: an idle worker's read would time out and kill runworker.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                "prefix": envstr("CHANNEL_LAYER_PREFIX", "asgi"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Cache: rate-limit counters ---------------------------------------------------------------
# With REDIS_URL, counters are shared by every process; otherwise each process counts alone.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": envstr("CACHE_KEY_PREFIX", "memfuse"),
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["memory.api.limits.BoundedJSONParser"],
    # Every endpoint but health needs an API key (Authorization: Bearer <key>).
    "DEFAULT_AUTHENTICATION_CLASSES": ["memory.api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["memory.api.auth.HasTenantKey"],
    "DEFAULT_THROTTLE_CLASSES": ["memory.api.auth.ApiKeyRateThrottle"],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "memory.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "memory.api.schema.MemFuseAutoSchema",
}

# OpenAPI 3 schema of the REST API (drf-spectacular): GET /api/schema/, docs at /api/docs/
# (Swagger UI) and /api/redoc/, their scripts from drf-spectacular-sidecar (no CDN).
SPECTACULAR_SETTINGS = {
    "TITLE": "MemFuse for Django",
    "DESCRIPTION": (
        "Long-term memory for LLM chat apps, compatible with MemFuse's REST API. Every answer is the "
        "envelope {status, code, data, message, errors}; every request but GET /api/v1/health needs "
        "Authorization: Bearer <key>."
    ),
    "VERSION": "0.3.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],  # the schema and docs are public: they hold no tenant data
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RoleEnum": "memory.models.Role",
        "SuccessStatusEnum": ["success"],
        "ErrorStatusEnum": ["error"],
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "memory.api.schema.uuid_path_parameters",
    ],
}

# --- Memory service -------------------------------------------------------------------------
MEMFUSE = {
    # Local path of a sentence-transformers model; empty: the bundled all-MiniLM-L6-v2.
    "EMBEDDING_MODEL_PATH": envstr("EMBEDDING_MODEL_PATH"),
    "EMBEDDING_DIM": envint("EMBEDDING_DIM", 384),
    "EMBEDDING_BATCH_SIZE": envint("EMBEDDING_BATCH_SIZE", 64),
    # Most texts one model call takes from the requests of many callers (EmbeddingBatcher).
    "EMBEDDING_MAX_BATCH_TEXTS": envint("EMBEDDING_MAX_BATCH_TEXTS", 256),
    # How long a background (flush) batch waits for more texts before the model call.
    "EMBEDDING_LINGER_SECONDS": envfloat("EMBEDDING_LINGER_SECONDS", 0.1),
    # Where flushes embed: "process" (a child process with its own model, niced: requests
    # never wait behind flush inference for a core or the GIL) or "thread" (the process's model).
    "BACKGROUND_EMBEDDING": envstr("BACKGROUND_EMBEDDING", "process"),
    # Niceness of background (flush) inference (0: same as requests). Requests preempt it.
    # Above 0, the background process also runs in Linux's idle scheduling class (SCHED_IDLE).
    "EMBEDDING_NICE": envint("EMBEDDING_NICE", 19),
    # torch intra-op threads. Inference is serialised by a lock, so one call may use every
    # core; more threads than cores make one encode many times slower (oversubscription).
    "TORCH_THREADS": envint("TORCH_THREADS", os.cpu_count() or 1),
    # torch threads of the query model (one short text at a time), and of a serving process's
    # own model when flushes embed in the background process (memory.inference.modes.serving_threads).
    "QUERY_TORCH_THREADS": envint("QUERY_TORCH_THREADS", 1),
    # One-text calls the query process runs at once (int8; memory.inference.ProcessEmbedder):
    # a query's embedding does not wait for the pending messages embedded for another, and
    # a burst's newest messages are embedded on every core. One model in memory whatever it is.
    "QUERY_EMBEDDING_CONCURRENCY": envint("QUERY_EMBEDDING_CONCURRENCY", min(2, os.cpu_count() or 1)),
    # Where queries are embedded: "process" (a child process at normal priority with its own
    # query model: the model's Python time leaves the web process's GIL) or "thread" (this
    # process's model). See memory.inference.ProcessEmbedder.
    "QUERY_EMBEDDING": envstr("QUERY_EMBEDDING", "process"),
    # Queries embedded by an int8 copy of the model (memory.inference.QueryEmbedder): several
    # times faster per query; docs/retrieval.md has its effect on recall.
    "QUERY_EMBEDDING_INT8": envbool("QUERY_EMBEDDING_INT8", True),
    # Stored documents (a flush's messages, knowledge items) embedded by the same int8 model,
    # one text per call (memory.inference.documents_int8): faster than the full model on the
    # flush process's one thread, and a pending message's on-demand embedding equals its flushed one.
    "DOCUMENT_EMBEDDING_INT8": envbool("DOCUMENT_EMBEDDING_INT8", True),
    # Load the models at start in serving processes (memory.startup.load_models).
    "PRELOAD_MODELS": envbool("PRELOAD_MODELS", True),
    "MAX_MESSAGE_CHARS": envint("MAX_MESSAGE_CHARS", 32_000),
    "MAX_BATCH_MESSAGES": envint("MAX_BATCH_MESSAGES", 500),
    # What a client may send (memory.api.limits): an HTTP body (413 beyond, before it is read),
    # a WebSocket text frame (a 413 error frame), JSON nesting (400 beyond; the body is level 1).
    "MAX_REQUEST_BYTES": envint("MAX_REQUEST_BYTES", 4 * 1024 * 1024),
    "WS_MAX_FRAME_BYTES": envint("WS_MAX_FRAME_BYTES", envint("MAX_REQUEST_BYTES", 4 * 1024 * 1024)),
    "MAX_JSON_DEPTH": envint("MAX_JSON_DEPTH", 32),
    # The body of POST /api/v1/users/{id}/import (a memory file, spooled to disk).
    "MAX_IMPORT_BYTES": envint("MAX_IMPORT_BYTES", 1024 * 1024 * 1024),
    # A line of an import's file (read with a bounded readline, so a longer one is never held
    # whole) and its records (memory.portability): 413 beyond, naming the line. The line's
    # default holds a message an add could store (MAX_REQUEST_BYTES) with its embedding.
    "IMPORT_MAX_LINE_BYTES": envint("IMPORT_MAX_LINE_BYTES", 8 * 1024 * 1024),
    "IMPORT_MAX_RECORDS": envint("IMPORT_MAX_RECORDS", 2_000_000),
    # Bytes of per-user services (lexical indexes) the process's LRU cache keeps, in MB; the
    # least recently used users go first (memory.retrieval.cache).
    "USER_CACHE_MB": envfloat("USER_CACHE_MB", 256.0),
    # Most pending (not yet flushed) messages a query embeds on demand, newest first: the
    # bound on what a query may wait for after a burst (memory.retrieval.vector).
    "PENDING_EMBED_MAX": envint("PENDING_EMBED_MAX", 16),
    # One-text calls of the query model remembered by user and text, in all and per user
    # (memory.inference.recent.RecentEmbeddings): they hold the embeddings of pending
    # messages a query scores (read your writes), and a text embedded again soon after (the
    # chat turn's query, then the same words added as its message) costs no second model
    # call. About 2.1 KB each once done; 0: none (a query embeds its pending messages anew).
    "RECENT_EMBEDDINGS": envint("RECENT_EMBEDDINGS", 2048),
    "RECENT_EMBEDDINGS_PER_USER": envint("RECENT_EMBEDDINGS_PER_USER", 64),
    # Read-ahead: an add starts the query model on its newest messages, behind every query
    # (memory.inference.ModelRegistry.read_ahead). At most PENDING_EMBED_MAX of a user and this
    # many of a tenant stay queued; past it the oldest is cancelled (a query embeds it on
    # demand). Per tenant: a tenant can make many users, only operators make tenants. 0: none.
    "READ_AHEAD_MAX": envint("READ_AHEAD_MAX", 64),
    # A user with this many messages gets their context embeddings into the HNSW index, and
    # approximate vector search (memory.retrieval.vector); below it the search is exact.
    "ANN_MIN_MESSAGES": envint("ANN_MIN_MESSAGES", 5000),
    # hnsw.ef_search of that search (at least the candidates asked for).
    "ANN_EF_SEARCH": envint("ANN_EF_SEARCH", 200),
    # A flush rewrites the user's index snapshot once this many changes (or a tenth of their
    # documents, if more) are not in it (memory.retrieval.store).
    "SNAPSHOT_MIN_CHANGES": envint("SNAPSHOT_MIN_CHANGES", 64),
    # Retrieval: weighted reciprocal rank fusion of BM25 and vector candidates
    # (docs/retrieval.md has why these weights).
    # Defaults of a query; the safe ones can be overridden per query (docs/retrieval.md).
    "RRF_K": envint("RRF_K", 60),
    "BM25_WEIGHT": envfloat("BM25_WEIGHT", 3.0),
    "VECTOR_WEIGHT": envfloat("VECTOR_WEIGHT", 1.0),
    "CANDIDATES_PER_RETRIEVER": envint("CANDIDATES_PER_RETRIEVER", 100),
    # Candidates of each retriever (default: CANDIDATES_PER_RETRIEVER).
    "BM25_CANDIDATES": envint("BM25_CANDIDATES", envint("CANDIDATES_PER_RETRIEVER", 100)),
    "VECTOR_CANDIDATES": envint("VECTOR_CANDIDATES", envint("CANDIDATES_PER_RETRIEVER", 100)),
    # Pseudo-relevance feedback for the vector retriever (Rocchio): its query embedding moves
    # toward the embeddings of BM25's top VECTOR_PRF_DOCS documents (0: off), by this weight.
    "VECTOR_PRF_DOCS": envint("VECTOR_PRF_DOCS", 3),
    "VECTOR_PRF_WEIGHT": envfloat("VECTOR_PRF_WEIGHT", 0.75),
    # The vector retriever scores each message by the mean of its own cosine similarity
    # (counted VECTOR_OWN_WEIGHT times) and those of the VECTOR_CONTEXT_TURNS turns either
    # side in its session (0: its own alone); BM25's context window, on the vector side.
    "VECTOR_CONTEXT_TURNS": envint("VECTOR_CONTEXT_TURNS", 2),
    "VECTOR_OWN_WEIGHT": envint("VECTOR_OWN_WEIGHT", 2),
    # When a query names one of the user's speakers (metadata["speaker"]), that speaker's
    # turns in the fused order are a third list of the fusion, of this weight (0: off).
    "SPEAKER_WEIGHT": envfloat("SPEAKER_WEIGHT", 1.0),
    # How the two rankings are fused: "rrf" (weighted reciprocal rank fusion, RRF_K) or
    # "convex" (weighted sum of min-max normalised scores).
    "FUSION": envstr("FUSION", "rrf"),
    # Cross-encoder reranker of the fused top RERANK_TOP_N: a local model directory; empty,
    # no reranking. Loaded at start in serving processes, next to the embedding model.
    "RERANKER_MODEL_PATH": envstr("RERANKER_MODEL_PATH"),
    "RERANK": envbool("RERANK", True),  # rerank by default when a model is configured
    "RERANK_TOP_N": envint("RERANK_TOP_N", 20),
    "RERANK_MAX_TOKENS": envint("RERANK_MAX_TOKENS", 256),  # query + document, truncated
    # BM25 indexes each message with this many neighbouring turns either side (0: alone),
    # its own words counted BM25_OWN_WEIGHT times (docs/retrieval.md has the measurements).
    "BM25_CONTEXT_TURNS": envint("BM25_CONTEXT_TURNS", 2),
    "BM25_OWN_WEIGHT": envint("BM25_OWN_WEIGHT", 2),
    # Threads that run the API's sync views and the WebSocket consumers' database and model
    # calls: the serving event loop's default executor (asyncio's own default, cpu_count + 4,
    # caps concurrent queries below what the CPU can do on a small machine).
    # The same variable daphne reads.
    "ASGI_THREADS": envint("ASGI_THREADS", 32),
    # API keys: resolved keys are cached per process this long (s): also how long a key revoked
    # in another process may still be accepted here.
    "API_KEY_CACHE_SECONDS": envfloat("API_KEY_CACHE_SECONDS", 10.0),
    "API_KEY_CACHE_SIZE": envint("API_KEY_CACHE_SIZE", 10_000),
    # Requests per API key ("<n>/second|minute|hour|day"), counted in the default cache; a
    # WebSocket's connect and each of its add and query frames count against the same budget.
    "API_RATE_LIMIT": envstr("API_RATE_LIMIT", "6000/minute"),
    # Requests of all the keys of one tenant together (operator keys count against none), so
    # that more keys do not make a larger budget. Default: five keys' worth of API_RATE_LIMIT.
    "API_TENANT_RATE_LIMIT": envstr("API_TENANT_RATE_LIMIT", scaled_rate(envstr("API_RATE_LIMIT", "6000/minute"), 5)),
    # Requests of one tenant (all its keys) a process serves at once (memory.api.admission);
    # past it, 429 before the body is read (0: no bound). Default half the pool, rounded up:
    # a request holds a pooled connection while it runs, so another tenant's finds one free.
    "API_TENANT_CONCURRENCY": envint("API_TENANT_CONCURRENCY", (envint("DB_POOL_MAX_SIZE", 10) + 1) // 2),
    # Live (unrevoked, unexpired) user keys one user may hold; creating one more is a 409.
    "MAX_API_KEYS_PER_USER": envint("MAX_API_KEYS_PER_USER", 20),
    # The embedded default (no DATABASE_URL) creates a tenant "local" at first start and
    # writes its key to <EMBEDDED_PG_DIR>/local-api-key.
    "LOCAL_TENANT": envbool("LOCAL_TENANT", True),
    # A bearer token that may read GET /metrics (a Prometheus scrape job's), besides operator
    # keys and staff sessions; empty: none.
    "METRICS_TOKEN": envstr("METRICS_TOKEN"),
    # How often a serving process samples its figures for the dashboard's charts (s).
    "DASHBOARD_SAMPLE_SECONDS": envfloat("DASHBOARD_SAMPLE_SECONDS", 10.0),
}

# --- Write-behind buffers (the buffers app) ---------------------------------------------------
BUFFERS = {
    # Flush workers per process, and whether this process runs them: "auto" runs them in the
    # ASGI process when the channel layer is in-memory (single process) and in runworker.
    # Flush threads wait on the model most of the time (holding no connection then): enough
    # of them keep a batch of EMBEDDING_MAX_BATCH_TEXTS waiting whenever the model frees.
    "WORKERS": envint("FLUSH_WORKERS", 8),
    # Fair flushing (buffers.services.claim_next_job): claims take turns over tenants; a
    # process runs at most MAX_RUNNING_PER_TENANT jobs of one tenant at once (0: no bound), and
    # a job yields its worker after SLICE_SECONDS, queued again for the rest (0: never).
    # Default two: they keep the process's one background model busy (one embeds while the
    # other writes); more of one tenant only add writes competing with the requests for the
    # web process and the database, and another tenant's job finds a free worker.
    "MAX_RUNNING_PER_TENANT": envint("FLUSH_MAX_RUNNING_PER_TENANT", min(2, envint("FLUSH_WORKERS", 8))),
    "SLICE_SECONDS": envfloat("FLUSH_SLICE_SECONDS", 5.0),
    # POST users|sessions/{id}/flush {"wait": true}: waits of one tenant in progress at once in
    # a process (each holds a request thread; none holds a connection); past it, 429 (0: no bound).
    "WAIT_MAX_PER_TENANT": envint("FLUSH_WAIT_MAX_PER_TENANT", 4),
    # Finished jobs are purged by the ticker this long after they finished (s; 0: kept):
    # failed ones, which an operator may retry, longer.
    "DONE_RETENTION_SECONDS": envfloat("FLUSH_DONE_RETENTION_SECONDS", 3600.0),
    "FAILED_RETENTION_SECONDS": envfloat("FLUSH_FAILED_RETENTION_SECONDS", 7 * 24 * 3600.0),
    "IN_PROCESS": envstr("FLUSH_IN_PROCESS", "auto"),
    "CHANNEL": envstr("FLUSH_CHANNEL", "memfuse-flush"),
    # Messages one flush claims, embeds and writes at a time.
    "BATCH_SIZE": envint("FLUSH_BATCH_SIZE", 64),
    # Size trigger: pending messages, or pending tokens (estimated as characters / 4).
    "SIZE_MESSAGES": envint("FLUSH_SIZE_MESSAGES", 10),
    "SIZE_TOKENS": envint("FLUSH_SIZE_TOKENS", 2000),
    # Time trigger: a message pending longer than this is flushed at low priority.
    "INTERVAL_SECONDS": envfloat("FLUSH_INTERVAL_SECONDS", 5.0),
    "TICK_SECONDS": envfloat("FLUSH_TICK_SECONDS", 1.0),
    "TIMEOUT_SECONDS": envfloat("FLUSH_TIMEOUT_SECONDS", 60.0),
    # A claim (of messages or of a job) older than this belongs to a dead worker.
    "LEASE_SECONDS": envfloat("FLUSH_LEASE_SECONDS", 120.0),
    "MAX_ATTEMPTS": envint("FLUSH_MAX_ATTEMPTS", 4),
    "BACKOFF_SECONDS": envfloat("FLUSH_BACKOFF_SECONDS", 1.0),
    "BACKOFF_MAX_SECONDS": envfloat("FLUSH_BACKOFF_MAX_SECONDS", 60.0),
    "SHUTDOWN_SECONDS": envfloat("FLUSH_SHUTDOWN_SECONDS", 10.0),
    # A process running flush workers beats every TICK_SECONDS; one silent for this long (while
    # the database was up) is dead, and the others' tickers release its claims and jobs.
    "HEARTBEAT_TIMEOUT_SECONDS": envfloat("FLUSH_HEARTBEAT_TIMEOUT_SECONDS", 5.0),
    # Backpressure (buffers.backlog): past MAX_BACKLOG_MESSAGES pending messages of its own, a
    # tenant's adds get 503 with Retry-After: BACKLOG_RETRY_AFTER_SECONDS; past
    # MAX_BACKLOG_MESSAGES_TOTAL of all tenants, those of the tenants holding at least an equal
    # share of it (0: no limit). Health says "degraded" once the oldest pending message is
    # older than BACKLOG_DEGRADED_SECONDS.
    "MAX_BACKLOG_MESSAGES": envint("MAX_BACKLOG_MESSAGES", 20_000),
    "MAX_BACKLOG_MESSAGES_TOTAL": envint("MAX_BACKLOG_MESSAGES_TOTAL", 100_000),
    "BACKLOG_RETRY_AFTER_SECONDS": envint("BACKLOG_RETRY_AFTER_SECONDS", 5),
    "BACKLOG_DEGRADED_SECONDS": envfloat("BACKLOG_DEGRADED_SECONDS", 60.0),
}

# --- Facts (M1): an LLM distils facts from the flushed messages (memory.facts, docs/facts.md) ---
# Off while LLM_BASE_URL is empty: no fact is extracted, read or returned.
LLM = {
    # Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM).
    "BASE_URL": envstr("LLM_BASE_URL"),
    "MODEL": envstr("LLM_MODEL"),
    "API_KEY": envstr("LLM_API_KEY"),
    "TIMEOUT_SECONDS": envfloat("LLM_TIMEOUT_SECONDS", 60.0),
    # Retries of one call by the openai client (it honours Retry-After); past them the job
    # backs off (FACTS_BACKOFF_SECONDS, doubling) for up to FACTS_MAX_ATTEMPTS attempts.
    "MAX_RETRIES": envint("LLM_MAX_RETRIES", 1),
    # Calls in flight at once per process, all tenants together.
    "CONCURRENCY": envint("LLM_CONCURRENCY", 4),
    # Per tenant, over the last minute, all processes together (0: no bound). Past either,
    # that tenant's extraction waits; M0 never does.
    "TENANT_CALLS_PER_MINUTE": envint("LLM_TENANT_CALLS_PER_MINUTE", 60),
    "TENANT_TOKENS_PER_MINUTE": envint("LLM_TENANT_TOKENS_PER_MINUTE", 100_000),
    # Turns of the session before the flushed ones that a window shows the LLM as context.
    "CONTEXT_TURNS": envint("FACTS_CONTEXT_TURNS", 4),
    # Flushed turns in one extraction call at most (a larger flush makes several jobs).
    "WINDOW_TURNS": envint("FACTS_WINDOW_TURNS", 24),
    # Existing facts of the user a new fact is compared with (consolidation).
    "SIMILAR_FACTS": envint("FACTS_SIMILAR", 5),
    # ... and only those at least this similar (cosine), or sharing words with it: a window
    # with no similar fact costs no consolidation call.
    "SIMILARITY_MIN": envfloat("FACTS_SIMILARITY_MIN", 0.5),
    "MAX_ATTEMPTS": envint("FACTS_MAX_ATTEMPTS", 5),
    "BACKOFF_SECONDS": envfloat("FACTS_BACKOFF_SECONDS", 5.0),
    "BACKOFF_MAX_SECONDS": envfloat("FACTS_BACKOFF_MAX_SECONDS", 600.0),
    # Extraction threads in each process that runs flush workers (0: only manage.py runfacts).
    "WORKERS": envint("FACTS_WORKERS", 1),
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        # Django's own default: its loggers print only with DEBUG.
        "debug_console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "level": "INFO",
            "filters": ["require_debug_true"],
        },
    },
    "filters": {
        "one_line_refusals": {"()": "runtime.pool.OneLineRefusals"},
        "require_debug_true": {"()": "django.utils.log.RequireDebugTrue"},
    },
    # The root logger holds the handler; the named loggers propagate to it, so a line prints
    # once. Configured, the root is also left alone by a library's logging.basicConfig (the MCP
    # SDK's server runs one), which would otherwise add a second handler.
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "memory": {"level": envstr("LOG_LEVEL", "INFO")},
        "memfuse_project": {"level": envstr("LOG_LEVEL", "INFO")},
        "buffers": {"level": envstr("LOG_LEVEL", "INFO")},
        "django": {"handlers": ["debug_console"], "level": "INFO", "propagate": False},
        # A request refused while the database is down: one line, not a traceback per request.
        "django.request": {
            "handlers": ["console"],
            "level": "ERROR",
            "filters": ["one_line_refusals"],
            "propagate": False,
        },
        # psycopg_pool's one-line warnings (a failed reconnection, a closed connection dropped).
        "psycopg": {"level": "WARNING"},
    },
}
