"""The suite's fixtures (``tests/conftest.py``: the named world, and the autouse resets of the
flush pool, the serving role and the key cache) for the tools' tests too."""

from tests.conftest import *  # noqa: F403
