from django.apps import AppConfig


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def import_models(self) -> None:
        """This app's models: ``memory.models`` and the facts layer's (``memory.facts.models``).

        Django registers an app's models while it imports them, before any ``ready()``. The
        facts layer keeps its models in its own package, whose modules import
        ``memory.models``: imported here rather than from ``memory.models``, so that
        ``memory.models`` stays below the facts layer."""
        super().import_models()
        from memory.facts import models  # noqa: F401  (registers Fact, FactSource, FactJob, LlmCall)

    def ready(self) -> None:
        """Register the system checks and give ``buffers`` this app's flush. Loads no model:
        a serving process's entry point does (``memory.startup.load_models``), so that
        ``migrate`` or ``check`` never pay for one."""
        from buffers import services as buffers
        from memory import checks  # noqa: F401  (checks registers the system checks)
        from memory.indexing import flush  # noqa: F401  (registers the flush hooks)
        from memory.inference import registry

        # memory sits above buffers (buffers never imports it): the write-behind tier runs
        # this app's flush through the hooks it is given here, before any flush worker starts.
        buffers.use_hooks(buffers.FlushHooks(flush=flush.flush_pending, warm_up=registry.start_background_embedder))
