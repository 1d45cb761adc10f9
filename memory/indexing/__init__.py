"""The write side of the indexes: everything that writes embeddings or index rows.

- ``flush``: embed pending messages and write them (run by ``buffers``' workers);
- ``context``: context embeddings, recomputed around changed turns or for whole users;
- ``ann``: the move of a user's context embeddings into an HNSW index (``ANN_BUCKETS``);
- ``snapshots``: writes of a user's lexical index snapshot;
- ``reembed``, ``reembed_columns``: changing the embedding model without downtime.

``memory.retrieval`` only reads what these write; nothing there imports this package. The
guard every write of embeddings runs against a model switch is ``memory.embedding_guard``:
the facts layer, which the flush and ``reembed`` call, writes embeddings under it too.
"""
