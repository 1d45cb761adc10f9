"""Benchmarks, the bench datasets and the screenshots: tools beside the product (a Django app
installed when ``MEMFUSE_TOOLS`` is on), run through its management commands
(``memfuse_bench``, ``soak_bench``, ``interfaces_bench``, ``chat_screenshot``,
``admin_screenshot``) or ``python -m benchmarks.portability`` / ``benchmarks.reembed``. The
LoCoMo evaluation is the product's (``memory.evaluation``, ``manage.py locomo_eval``). The product never imports them; the tests use
``benchmarks.server`` to start servers and the datasets to bulk-load users.

- ``server``: the service as a subprocess (``ServerProcess``), free ports, process memory;
- ``client``: the REST API over aiohttp, bench users, waiting for flushes;
- ``stats``: open-loop schedules, latency percentiles, recall@k, slopes;
- ``texts``: chat turns (LoCoMo's, or generated);
- ``runner``: what every ``memfuse_bench`` benchmark shares; ``ingest``, ``query``, ``chat``: the benchmarks;
- ``dataset``, ``chat_dataset``: bulk-loaded users of flushed messages;
- ``soak``: a mixed load for minutes; ``tenants``:
  three tenants beside an abusive one (its clients in ``abuse``); ``interfaces``: MCP against
  REST; ``portability``: export and import; ``screenshots``: the PNGs of the docs.
"""
