"""Messages on the channel layer: flush requests to workers, flush events to WebSocket groups.

Channel-layer delivery is at most once and the in-memory layer is per process: a message here
only *triggers* work or tells a UI. The work itself is a row (``FlushJob``, pending messages),
so a lost message delays a flush and never loses data.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

logger = logging.getLogger(__name__)

_loop: asyncio.AbstractEventLoop | None = None
_local_pool = None  # the FlushWorkerPool of this process, when it runs one
_lock = threading.Lock()


def session_group(session_id: uuid.UUID | str) -> str:
    """The channel-layer group of a session's WebSocket clients."""
    return f"session-{session_id}"


def register_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Remember the ASGI server's event loop: threads deliver in-memory layer messages on it.

    Replaced when the remembered loop has stopped (a reloaded server, or tests' loops).
    """
    global _loop
    if _loop is not loop and (_loop is None or not _loop.is_running()):
        with _lock:
            if _loop is None or not _loop.is_running():
                _loop = loop


def set_local_pool(pool) -> None:
    """Register (or with ``None`` unregister) this process's flush worker pool."""
    global _local_pool
    _local_pool = pool


def _deliver(coroutine_factory) -> None:
    """Run a channel-layer coroutine from sync code, on the server's loop when there is one.

    The in-memory layer is not thread-safe: worker threads must hand it to the loop its
    consumers run on. Failures are logged: delivery is at most once by design.
    """
    async def deliver() -> None:
        await coroutine_factory()

    loop = _loop
    try:
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(deliver(), loop)
        else:
            async_to_sync(deliver)()
    except Exception:
        logger.warning("channel layer delivery failed", exc_info=True)


def notify_flush(*, user_id: uuid.UUID, priority: int) -> None:
    """Tell flush workers that a job is waiting: the local pool, else the flush channel."""
    pool = _local_pool
    if pool is not None:
        pool.wake()
        return
    layer = get_channel_layer()
    if layer is None or "InMemory" in type(layer).__name__:
        return  # no worker could hear it; workers poll the job table
    message = {"type": "flush.request", "user_id": str(user_id), "priority": priority}
    _deliver(lambda: layer.send(settings.BUFFERS["CHANNEL"], message))


def flush_completed(*, session_id: uuid.UUID, message_ids: list[str]) -> None:
    """Push ``flush.completed`` to the session's WebSocket clients."""
    layer = get_channel_layer()
    if layer is None:
        return
    event = {"type": "flush.completed", "session_id": str(session_id), "message_ids": message_ids}
    _deliver(lambda: layer.group_send(session_group(session_id), event))
