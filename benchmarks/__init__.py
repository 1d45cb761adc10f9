"""Benchmarks, the LoCoMo evaluation, the bench datasets and the screenshots: tools beside the
product, run through thin management commands (``memfuse_bench``, ``locomo_eval``,
``soak_bench``, ``interfaces_bench``, ``chat_screenshot``, ``admin_screenshot``) or
``python -m benchmarks.portability``. The product never imports them; the tests use
``benchmarks.server`` to start servers and the datasets to bulk-load users.

- ``server``: the service as a subprocess (``ServerProcess``), free ports, process memory;
- ``client``: the REST API over aiohttp, bench users, waiting for flushes;
- ``stats``: open-loop schedules, latency percentiles, recall@k, slopes;
- ``texts``: chat turns (LoCoMo's, or generated);
- ``runner``: what every ``memfuse_bench`` benchmark shares; ``ingest``, ``query``, ``chat``: the benchmarks;
- ``dataset``, ``chat_dataset``: bulk-loaded users of flushed messages;
- ``locomo``: recall@k on a LoCoMo file; ``soak``: a mixed load for minutes; ``tenants``:
  three tenants beside an abusive one (its clients in ``abuse``); ``interfaces``: MCP against
  REST; ``portability``: export and import; ``screenshots``: the PNGs of the docs.
"""
