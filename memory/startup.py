"""What this app does when a process starts serving (``memfuse_project.serving.start`` calls it).

``load_models``: the models the process's role needs (``runtime.roles``), loaded before its
first request; ``local_tenant_if_embedded``: the development tenant of the embedded default.
``MemoryConfig.ready()`` loads nothing, so that commands that do not serve (``migrate``,
``check``) never pay for a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from memory.errors import Conflict
from memory.inference import registry
from memory.models import KeyScope, Tenant
from memory.services.api_keys import api_key_create
from memory.services.tenants import tenant_create
from runtime import roles

logger = logging.getLogger(__name__)


def load_models() -> None:
    """Load the models this process's role needs; nothing when no role is declared or
    ``PRELOAD_MODELS`` is off. A worker embeds no query, so it loads no query model. Raises
    ``EmbeddingProcessError`` or ``RerankerLoadError`` when a model fails to load."""
    role = roles.role()
    if role is None or not settings.MEMFUSE["PRELOAD_MODELS"]:
        return
    registry.preload(queries=role != roles.WORKER, documents=roles.runs_flush_workers())


LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key"


def local_tenant_if_embedded() -> Path | None:
    """On the embedded default, create the development tenant ``local`` once; returns its key file.

    Its first key is written to ``<EMBEDDED_PG_DIR>/local-api-key`` (mode 0600, next to the
    database files it unlocks) and the log says where. Off with ``LOCAL_TENANT=0``; never with
    a ``DATABASE_URL``, where tenants come from ``manage.py create_tenant``.
    """
    if not (settings.USING_EMBEDDED_DB and settings.MEMFUSE["LOCAL_TENANT"]):
        return None
    key_file = Path(settings.EMBEDDED_PG_DIR) / LOCAL_KEY_FILE
    if Tenant.objects.filter(name=LOCAL_TENANT).exists():
        logger.info("development tenant '%s': its first API key is in %s", LOCAL_TENANT, key_file)
        return key_file
    try:
        tenant = tenant_create(name=LOCAL_TENANT)
    except Conflict:  # another process created it meanwhile
        return key_file
    _, key = api_key_create(scope=KeyScope.TENANT, tenant=tenant, name="local development")
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    logger.warning(
        "created development tenant '%s'; its API key is in %s (send it as Authorization: Bearer <key>)",
        LOCAL_TENANT,
        key_file,
    )
    return key_file
