from django.apps import AppConfig


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def ready(self) -> None:
        from buffers import services as buffers
        from memory import checks, flush, registry  # noqa: F401  (checks registers system checks)

        # memory sits above buffers (buffers never imports it): the write-behind tier runs
        # this app's flush through the hooks it is given here, before the registry asks
        # buffers whether this process runs flush workers.
        buffers.use_hooks(
            buffers.FlushHooks(
                flush=flush.flush_pending, warm_up=registry.start_background_embedder, serving=registry.should_preload
            )
        )
        registry.preload_if_serving()
