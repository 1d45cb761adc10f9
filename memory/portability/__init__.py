"""A user's memory as a file: export and import in JSON Lines.

The format (``FORMAT``, version ``VERSION``), one JSON object a line, each with a ``type``:

1. ``{"type": "header", "format": "memfuse.memory", "version": 1, "exported_at",
   "embedding": {"model", "dimension"} | null}``: ``embedding`` names the model of the
   embeddings the file carries (``memory.inference.registry.document_model``), ``null`` without them;
2. ``{"type": "user", "id", "name", "description", "metadata", "created_at"}``, once;
3. ``{"type": "agent", "id", "name", "description", "metadata", "created_at"}``: the agents
   of the user's sessions;
4. ``{"type": "session", "id", "name", "agent_id", "metadata", "created_at"}``;
5. ``{"type": "message", "id", "session_id", "position", "role", "content", "metadata",
   "created_at"[, "embedding": [float, ...]]}``, by session, then position;
6. ``{"type": "knowledge", "id", "content", "metadata", "created_at"[, "embedding"]}``;
7. ``{"type": "fact", "id", "text", "kind", "entities", "valid_from", "time_expression",
   "confidence", "model", "version", "superseded_by", "deleted_at", "metadata", "created_at",
   "sources": [message id, ...]}``: the facts layer's (``memory.facts.portability``), only
   when the user has facts; never an embedding (an import embeds them again).

Ids are UUIDs, times ISO 8601 with a zone. A record refers only to records above it.

``export.user_export`` writes it (streamed, a page of rows at a time);
``importer.memory_import`` reads it (``importer`` says how it validates and writes);
``locomo.locomo_records`` turns a LoCoMo file into the same records.
"""

FORMAT = "memfuse.memory"
VERSION = 1
