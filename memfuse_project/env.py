"""The settings' small helpers: strict readers of the environment (as healthchecks'
``hc/settings.py`` has), and ``scaled_rate``.

A value a reader does not know stops the start with ``ImproperlyConfigured`` naming the
variable: a typo must not silently become the default. Strings (``envstr``, ``envlist``) may
come from the file named by ``<NAME>_FILE`` instead (secrets mounted as files).
"""

import math
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured


def envstr(name: str, default: str = "") -> str:
    """Return env var ``name``, or the contents of the file named by ``{name}_FILE``."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


# The words envbool knows, case-insensitive; any other value is a mistake to report, not to read
# as false ("flase", "enabled").
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def envbool(name: str, default: bool) -> bool:
    """Env var ``name`` as a bool: ``1/true/yes/on`` or ``0/false/no/off`` (any case), ``default``
    when unset or empty. Raises ``ImproperlyConfigured`` naming the variable on any other value
    (healthchecks' ``hc/settings.py`` does the same)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    word = value.strip().lower()
    if word not in _TRUE | _FALSE:
        raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off")
    return word in _TRUE


def envint(name: str, default: int) -> int:
    """Env var ``name`` as an int, ``default`` when unset or empty. Raises
    ``ImproperlyConfigured`` naming the variable when it is not an integer."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None


def envfloat(name: str, default: float) -> float:
    """Env var ``name`` as a finite float, ``default`` when unset or empty. Raises
    ``ImproperlyConfigured`` naming the variable when it is not a finite number."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ImproperlyConfigured(f"{name}={value!r} is not a finite number")
    return number


def scaled_rate(rate: str, factor: int) -> str:
    """A ``"<n>/<period>"`` rate with ``n`` times ``factor``; a malformed rate unchanged (the
    system check memory.E006 reports it)."""
    count, _, period = rate.partition("/")
    return f"{int(count) * factor}/{period}" if count.isdigit() and period else rate


def envlist(name: str, default: str = "") -> list[str]:
    """Env var ``name`` as a comma-separated list (empty items dropped)."""
    return [item.strip() for item in envstr(name, default).split(",") if item.strip()]
