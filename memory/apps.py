from django.apps import AppConfig


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def ready(self) -> None:
        from memory import checks, registry  # noqa: F401  (checks registers system checks)

        registry.preload_if_serving()
