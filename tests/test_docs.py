"""The documentation against the code: docs/configuration.md lists exactly the environment
variables the settings read, the system checks it names are the ones registered, and the
README's and docs' relative links lead to files that exist.

No database: these tests read source files only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
OUTSIDE_SECTION = "Read outside the settings"
VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
# Product code that may read the environment outside the settings (not tests, not tools).
PRODUCT_DIRS = ("memfuse_project", "memory", "buffers", "runtime")


def settings_sources() -> list[Path]:
    """The settings module, or every module of a settings package."""
    package = ROOT / "memfuse_project" / "settings"
    if package.is_dir():
        return sorted(package.rglob("*.py"))
    return [ROOT / "memfuse_project" / "settings.py"]


def _callee_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_callee_name(func.value)}.{func.attr}"
    return ""


def environment_reads(source: str) -> set[str]:
    """Names of the environment variables ``source`` reads: the first argument of a call of an
    ``env*`` helper (``envint("X", 1)``, ``env.int("X")``), of ``os.environ.get`` or
    ``os.getenv``, and ``os.environ["X"]``; only string literals that look like variable names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            name = _callee_name(node.func)
            first = node.args[0]
            reads_env = "env" in name.lower() or name.endswith("environ.get")
            if reads_env and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if VARIABLE.match(first.value):
                    found.add(first.value)
        elif isinstance(node, ast.Subscript) and _callee_name(node.value).endswith("environ"):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and VARIABLE.match(key.value):
                found.add(key.value)
    return found


def settings_variables() -> set[str]:
    return set().union(*(environment_reads(path.read_text()) for path in settings_sources()))


def documented_variables(text: str) -> dict[str, set[str]]:
    """``{section heading: variables}`` of the tables in ``text``: the backquoted names in each
    row's first cell (header and separator rows skipped)."""
    sections: dict[str, set[str]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and not line.startswith("|---"):
            first_cell = line.strip("|").split("|")[0]
            names = {name for name in re.findall(r"`([^`]+)`", first_cell) if VARIABLE.match(name)}
            if names:
                sections.setdefault(heading, set()).update(names)
    return sections


def test_scanner_finds_each_way_of_reading_the_environment():
    """The scanner sees helpers, os.environ and os.getenv, and ignores other calls: it can fail."""
    source = (
        "import os\n"
        "A = envint('ALPHA', 1)\n"
        "B = env.bool('BETA', False)\n"
        "C = os.environ.get('GAMMA')\n"
        "D = os.getenv('DELTA', '')\n"
        "E = os.environ['EPSILON']\n"
        "F = getattr(settings, 'NOT_AN_ENV_READ', None)\n"
        "G = envstr(f'{name}_FILE')\n"
    )
    assert environment_reads(source) == {"ALPHA", "BETA", "GAMMA", "DELTA", "EPSILON"}


def test_settings_are_scanned():
    """The settings' source yields the variables every deployment sets (the scan is not empty)."""
    assert {"DATABASE_URL", "SECRET_KEY", "FLUSH_WORKERS", "BM25_WEIGHT"} <= settings_variables()


def test_every_variable_the_settings_read_is_documented():
    """Each environment variable the settings read has a row in docs/configuration.md."""
    documented = set().union(*documented_variables(CONFIGURATION.read_text()).values())
    missing = sorted(settings_variables() - documented)
    assert not missing, f"docs/configuration.md has no row for {missing}"


def test_every_documented_variable_is_read():
    """Each row names a variable the settings read, or (in its last table) the product code reads."""
    sections = documented_variables(CONFIGURATION.read_text())
    outside = sections.pop(OUTSIDE_SECTION, set())
    read = settings_variables()
    stale = sorted(set().union(*sections.values()) - read)
    assert not stale, f"docs/configuration.md documents {stale}, which the settings do not read"
    product = "\n".join(
        path.read_text() for directory in PRODUCT_DIRS for path in (ROOT / directory).rglob("*.py")
    )
    for name in sorted(outside):
        assert name not in read, f"{name} is read by the settings: move its row to their tables"
        assert re.search(rf"[\"']{name}[\"']", product), f"no product code reads {name}"


def test_documented_system_checks_are_the_registered_ones():
    """The check ids docs/configuration.md lists are those memory/checks.py raises."""
    raised = re.findall(r"id=\"(memory\.[EW]\d{3})\"", (ROOT / "memory" / "checks.py").read_text())
    documented = re.findall(r"`(memory\.[EW]\d{3})`", CONFIGURATION.read_text())
    assert sorted(set(documented)) == sorted(set(raised))


def _markdown_files() -> list[Path]:
    return [*sorted(ROOT.glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda path: path.name)
def test_relative_links_lead_to_files(path):
    """Every relative link of the README and docs names a file of the repository."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
