"""Lexemes under PostgreSQL's English analysis: what BM25 counts, for documents and queries."""

from __future__ import annotations

import re

from django.db import connection

# A lexeme of a tsvector's text form: 'word':1,5 ('' escapes a quote inside a lexeme).
_TSVECTOR_ENTRY = re.compile(r"'((?:[^']|'')*)'(?::([0-9A-D,]+))?")


def tsvector_counts(text: str | None) -> dict[str, int]:
    """Each lexeme of a tsvector's text form with its number of positions.

    ``"'group':6,9 'support':5"`` -> ``{"group": 2, "support": 1}``. A lexeme without
    positions counts once.
    """
    counts: dict[str, int] = {}
    for lexeme, positions in _TSVECTOR_ENTRY.findall(text or ""):
        if "''" in lexeme:
            lexeme = lexeme.replace("''", "'")
        counts[lexeme] = positions.count(",") + 1 if positions else 1
    return counts


def tsvector_tokens(text: str | None) -> list[str]:
    """Tokens of a tsvector's text form, each lexeme repeated once per position.

    ``"'group':6,9 'support':5"`` -> ``["group", "group", "support"]``.
    """
    return [lexeme for lexeme, count in tsvector_counts(text).items() for _ in range(count)]


def query_tokens(text: str) -> list[str]:
    """The query's lexemes under PostgreSQL's English analysis (the documents' analysis),
    each repeated once per position: BM25 counts a query term once per occurrence."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_tsvector('english', %s)::text", [text])
        return tsvector_tokens(cursor.fetchone()[0])
