"""Settings of the test suite: the product's, with a SECRET_KEY of its own when none is set.

Outside the embedded default the product refuses to start without ``SECRET_KEY``
(``memfuse_project.settings``); the suite (and the servers and commands it starts, which
inherit the environment) runs with this one unless the environment gives another.
"""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-" + "x" * 40)

from memfuse_project.settings import *  # noqa: E402,F403
