"""Writes: one module per entity (tenants, API keys, users, agents, sessions, messages,
knowledge), as Zulip's ``zerver/actions/`` keeps one module per action; ``common`` holds the
helpers they share. Callers import a function from the module that owns it.

Every function takes keyword-only arguments that have already been validated for shape (the
API's serializers, or trusted callers such as ``locomo_eval``) and raises ``memory.errors``
exceptions for what only the database can tell (unknown ids, duplicate names). Embedding runs
before the transaction that writes the rows, never inside it.
"""
