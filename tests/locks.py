"""Lock waits seen from another connection, for tests that run writers in threads."""

from __future__ import annotations

import time

from django.db import connection


def a_backend_waits_for_a_lock(timeout: float = 10.0) -> bool:
    """Whether, within ``timeout`` seconds, some connection to the test database waits for a
    lock (``pg_stat_activity.wait_event_type = 'Lock'``): a writer blocked by another."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return True
        time.sleep(0.05)
    return False
