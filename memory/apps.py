from django.apps import AppConfig


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def ready(self) -> None:
        from buffers import services as buffers
        from memfuse_project import serving
        from memory import checks  # noqa: F401  (checks registers the system checks)
        from memory.indexing import flush
        from memory.inference import registry

        # memory sits above buffers (buffers never imports it): the write-behind tier runs
        # this app's flush through the hooks it is given here, before any flush worker starts.
        buffers.use_hooks(buffers.FlushHooks(flush=flush.flush_pending, warm_up=registry.start_background_embedder))
        # The models of a serving process (its entry point declared its role before Django
        # started), loaded before its first request.
        serving.preload_models()
