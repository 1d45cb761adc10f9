"""Facts (M1): the optional layer of facts an LLM distils from a user's messages
(docs/facts.md). Nothing runs while it is off (``memory.inference.llm.enabled()``).

- ``models``: ``Fact``, ``FactSource``, ``FactJob``, ``LlmCall`` (the ``memory`` app's, registered
  by ``memory.apps.MemoryConfig.import_models``);
- ``jobs``: queueing extraction beside the flush, the claim fair across tenants, running a
  job, its retries and dead letters, the admin's re-run, the purge;
- ``extraction``: a job's window of turns and the facts the LLM finds in it (``prompts``,
  ``times``: the prompts and the resolution of time words);
- ``consolidation``: each new fact beside the user's similar ones (ADD, UPDATE, DELETE,
  NONE) and the write of the decisions with their sources;
- ``budget``: every LLM call recorded, and the tenants past their per-minute budget;
- ``provenance``: the sweep of facts whose source messages were deleted or edited;
- ``reembed``: the facts' vectors embedded again after a change of embedding model;
- ``worker``: the extraction threads; ``selectors``: the reads; ``portability``: export and
  import; ``metrics``: the figures on ``/metrics``; ``admin``: the admin's pages.

It sits below ``memory.indexing``: the flush queues extraction (``jobs.facts_queue``) and
``reembed`` calls ``reembed.facts_reembed``; it writes embeddings under
``memory.embedding_guard`` as they do.
"""
