"""The Channels consumer of flush requests, for ``runworker`` processes."""

from __future__ import annotations

from channels.consumer import SyncConsumer

from buffers import workers


class FlushConsumer(SyncConsumer):
    """Consumes ``flush.request`` messages on the flush channel (``manage.py runworker memfuse-flush``).

    The message only wakes this process's workers: the job is already a row, and workers
    that miss the message find it at their next poll.
    """

    def flush_request(self, message: dict) -> None:
        pool = workers.start_pool()
        if pool is not None:  # None: the process is stopping
            pool.wake()
