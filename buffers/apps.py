from django.apps import AppConfig


class BuffersConfig(AppConfig):
    """Write-behind buffers and flush workers (built on top of the memory app)."""

    name = "buffers"
    verbose_name = "Buffers"
