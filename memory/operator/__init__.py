"""Operator figures: what an operator reads about the running service.

- ``stats``: the snapshot of this process and of the database (pool, models, cache, buffers).
- ``exposition``: the events (``memory.metrics``) and that snapshot as the Prometheus text format.
- ``history``: the last hour of samples, drawn as the dashboard's charts.

Their HTTP views (the dashboard, ``GET /api/v1/admin/stats``, ``GET /metrics``) are the API's:
``memory.api.operator``.
"""
