"""The extraction workers: threads that claim ``FactJob`` rows and run them.

``FACTS_WORKERS`` threads run in each process that runs flush workers (started with them by
``memfuse_project.serving.start``), or in their own process with ``manage.py runfacts``.
Each loops: claim a job (``facts_claim``: fair per tenant, skipping tenants over their
budget), run it, and when none is runnable sweep the facts of deleted or edited messages,
purge old rows, embed again the facts of an older embedding model and sleep a second. None starts while the layer is off.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections, connection

from memory.facts import jobs
from memory.facts.provenance import facts_sweep
from memory.facts.reembed import facts_reembed
from memory.inference import llm

logger = logging.getLogger(__name__)

IDLE_SECONDS = 1.0
# How often an idle worker sweeps and purges (s).
SWEEP_SECONDS = 10.0
# Facts a sweep looks at each time: its work bounded however many facts there are (a pass
# over a million facts takes 100 sweeps).
SWEEP_BATCH = 10_000


def run_once() -> int:
    """Claim and run runnable jobs until none is left; returns the jobs run. For tests and
    for ``runfacts --once``."""
    ran = 0
    while (job := jobs.facts_claim()) is not None:
        jobs.facts_run_job(job)
        ran += 1
    return ran


def run_forever(stop: threading.Event) -> None:
    """One worker's loop, until ``stop`` is set. Errors (the database down) are logged and
    the loop goes on after a pause."""
    last_sweep = 0.0
    while not stop.is_set():
        try:
            close_old_connections()
            job = jobs.facts_claim()
            if job is not None:
                jobs.facts_run_job(job)
                continue
            if time.monotonic() - last_sweep > SWEEP_SECONDS:
                facts_sweep(batch=SWEEP_BATCH)
                jobs.facts_purge()
                facts_reembed()
                last_sweep = time.monotonic()
        except Exception:
            logger.warning("facts worker failed; retrying", exc_info=True)
        # The connection goes back to the pool while idle: requests need it more.
        if not connection.in_atomic_block:
            connection.close()
        stop.wait(IDLE_SECONDS)


_stop = threading.Event()
_threads: list[threading.Thread] = []
_lock = threading.Lock()


def start() -> None:
    """Start this process's ``FACTS_WORKERS`` threads (once); nothing while the layer is off."""
    if not llm.enabled():
        return
    with _lock:
        if _threads:
            return
        _stop.clear()
        for number in range(settings.LLM["WORKERS"]):
            thread = threading.Thread(target=run_forever, args=(_stop,), name=f"facts-worker-{number}", daemon=True)
            thread.start()
            _threads.append(thread)


def stop(*, timeout_seconds: float = 5.0) -> None:
    """Stop this process's threads; a call in flight finishes (bounded by ``LLM_TIMEOUT_SECONDS``)."""
    with _lock:
        _stop.set()
        for thread in _threads:
            thread.join(timeout=timeout_seconds)
        _threads.clear()
