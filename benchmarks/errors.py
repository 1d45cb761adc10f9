"""The one exception of the tools."""


class BenchError(Exception):
    """A benchmark cannot go on (setup failed, the server died); commands turn it into ``CommandError``."""
