"""Operator figures: what an operator reads about the running service.

- ``metrics``: Prometheus counters and histograms of events, recorded where they happen.
- ``stats``: the snapshot of this process and of the database (pool, models, cache, buffers).
- ``exposition``: both as the Prometheus text format; ``metrics_view``: ``GET /metrics``.
- ``history``: the last hour of samples, drawn as the dashboard's charts.
- ``dashboard``: the admin dashboard page and ``GET /api/v1/admin/stats``.
"""
