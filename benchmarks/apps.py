from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    """The development tools beside the product: benchmarks, the soak, the screenshots.

    Installed only when ``MEMFUSE_TOOLS`` says so (``memfuse_project.settings``); no product
    package imports it (the ``benchmarks`` contract in ``pyproject.toml``). No models.
    """

    name = "benchmarks"
    verbose_name = "Benchmarks and tools"
