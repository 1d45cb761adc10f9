"""Environment for commands the tests run as subprocesses: they must use the test database."""

from __future__ import annotations

import os

from django.db import connection


def subprocess_env(**extra: str) -> dict:
    """``os.environ`` with ``DATABASE_URL`` pointing at this test run's database, plus ``extra``."""
    db = connection.settings_dict
    host = (db["HOST"] or "127.0.0.1").replace("/", "%2F")
    url = f"postgres://{db['USER']}@{host}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "INFO", **extra}
    env.pop("RUN_MAIN", None)
    return env
