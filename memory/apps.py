from django.apps import AppConfig


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def ready(self) -> None:
        from memfuse_project import serving
        from memory import checks  # noqa: F401  (registers the system checks)

        # The models of a serving process (its entry point declared its role before Django
        # started), loaded before its first request.
        serving.preload_models()
