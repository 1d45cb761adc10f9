"""Settings of the test suite: the product's, with a SECRET_KEY of its own when none is set.

Outside the embedded default the product refuses to start without ``SECRET_KEY``
(``memfuse_project.settings``); the suite (and the servers and commands it starts, which
inherit the environment) runs with this one unless the environment gives another.

On the embedded default (no ``DATABASE_URL``) these settings are the suite's entry point: they
start the embedded server (``runtime.embedded_pg``) before pytest-django connects.
"""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-" + "x" * 40)

from memfuse_project.settings import *  # noqa: E402,F403
from memfuse_project.settings import DATABASES, EMBEDDED_PG_DIR, USING_EMBEDDED_DB  # noqa: E402

if USING_EMBEDDED_DB:
    from runtime.embedded_pg import embedded_database_settings

    DATABASES["default"].update(embedded_database_settings(EMBEDDED_PG_DIR))

# The suite tests the tools too (benchmarks/tests, the commands), whatever MEMFUSE_TOOLS says.
if "benchmarks" not in INSTALLED_APPS:  # noqa: F405
    INSTALLED_APPS = [*INSTALLED_APPS, "benchmarks"]  # noqa: F405
