"""Relative times resolved against the date of the session they were said in.

An LLM copies the words ("last Saturday"); the date is computed here, where arithmetic is
exact: in a session of Monday 8 May 2023, "last Saturday" is 6 May 2023.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "ten": 10}
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


def resolve(expression: str, *, on: date) -> date | None:
    """The date ``expression`` names, said on ``on``; ``None`` when it is not one of the forms
    known here: an ISO date (``2023-05-06``), ``today``, ``yesterday``, ``tomorrow``, ``the day
    before yesterday``, ``last|this|next <weekday>``, ``<weekday>`` (the last one before
    ``on``), ``last|next week|month|year``, ``<n> days|weeks|months|years ago`` (months as 30
    days, years as 365), ``in <n> days|weeks``.

    "last <weekday>" is the most recent such day strictly before ``on``; "next <weekday>" the
    first strictly after it; "this <weekday>" the one of ``on``'s week (Monday first).
    """
    text = " ".join(expression.lower().replace(",", " ").split())
    text = re.sub(r"^(on|the|at|during)\s+", "", text)
    if not text:
        return None
    iso = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text)
    if iso:
        try:
            return date(int(iso[1]), int(iso[2]), int(iso[3]))
        except ValueError:
            return None
    fixed = {"today": 0, "tonight": 0, "this morning": 0, "yesterday": -1, "tomorrow": 1, "day before yesterday": -2}
    if text in fixed:
        return on + timedelta(days=fixed[text])
    match = re.fullmatch(r"(?:(last|this|next|past)\s+)?(" + "|".join(_WEEKDAYS) + r")", text)
    if match:
        which, weekday = match[1] or "last", _WEEKDAYS.index(match[2])
        if which in ("last", "past"):
            return on - timedelta(days=(on.weekday() - weekday - 1) % 7 + 1)
        if which == "next":
            return on + timedelta(days=(weekday - on.weekday() - 1) % 7 + 1)
        return on + timedelta(days=weekday - on.weekday())
    match = re.fullmatch(r"(last|past|next)\s+(week|month|year)", text)
    if match:
        days = _UNIT_DAYS[match[2]]
        return on + timedelta(days=days if match[1] == "next" else -days)
    match = re.fullmatch(r"(\d+|" + "|".join(_NUMBERS) + r")\s+(day|week|month|year)s?\s+ago", text)
    if match:
        count = int(match[1]) if match[1].isdigit() else _NUMBERS[match[1]]
        return on - timedelta(days=count * _UNIT_DAYS[match[2]])
    match = re.fullmatch(r"in\s+(\d+|" + "|".join(_NUMBERS) + r")\s+(day|week)s?", text)
    if match:
        count = int(match[1]) if match[1].isdigit() else _NUMBERS[match[1]]
        return on + timedelta(days=count * _UNIT_DAYS[match[2]])
    return None
