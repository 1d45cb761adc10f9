"""The documentation against the code: docs/configuration.md lists exactly the environment
variables the settings read, the system checks it names are the ones registered, the README's
and docs' relative links lead to files and headings that exist, and docs/benchmarks.md gives a
command for every benchmark the management commands offer.

No database: these tests read source files and the commands' argument parsers only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.core.management import get_commands, load_command_class

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
    product = "\n".join(path.read_text() for directory in PRODUCT_DIRS for path in (ROOT / directory).rglob("*.py"))
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


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-`` (``"Pool check (`soak_bench pool-check`)"`` -> ``pool-check-soak_bench-pool-check``)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (a repeated heading's get ``-1``, ``-2``, ... as on GitHub)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#+ (.+)", line)
        if match:
            anchor = heading_anchor(match.group(1))
            found.add(anchor if anchor not in counts else f"{anchor}-{counts[anchor]}")
            counts[anchor] = counts.get(anchor, 0) + 1
    return found


def test_heading_anchor_follows_github():
    """Backquotes, parentheses, commas and apostrophes go; underscores and hyphens stay: it can fail."""
    assert heading_anchor("Loading a user's index (`soak_bench index-load`)") == (
        "loading-a-users-index-soak_bench-index-load"
    )
    assert heading_anchor("Queries over 1,000 users") == "queries-over-1000-users"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda path: path.name)
def test_link_anchors_lead_to_headings(path):
    """Every ``#anchor`` of a relative link (or of a link within the page) names a heading of its target."""
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", path.read_text()):
        if "://" in target:
            continue
        page = (path.parent / target) if target else path
        assert anchor in anchors(page), (
            f"{path.name} links to {target or path.name}#{anchor}, which has no such heading"
        )


# The benchmark commands whose every benchmark (subcommand or mode) docs/benchmarks.md must show.
BENCHMARK_COMMANDS = ("memfuse_bench", "soak_bench", "interfaces_bench", "locomo_eval")


def benchmark_invocations(name: str) -> list[str]:
    """``"<command> <benchmark>"`` for each benchmark of management command ``name`` (its
    subcommands, or the choices of its first positional argument), or ``[name]`` when it has none."""
    command = load_command_class(get_commands()[name], name)
    parser = command.create_parser("manage.py", name)
    for action in parser._actions:  # argparse keeps no public list of them
        if action.choices and not action.option_strings:
            return [f"{name} {choice}" for choice in action.choices]
    return [name]


def test_benchmark_invocations_reads_the_parsers():
    """soak_bench's modes come from its parser, and a command without modes is itself: it can fail."""
    assert "soak_bench soak" in benchmark_invocations("soak_bench")
    assert benchmark_invocations("interfaces_bench") == ["interfaces_bench"]


@pytest.mark.parametrize("name", BENCHMARK_COMMANDS)
def test_every_benchmark_has_its_command_in_benchmarks_md(name):
    """Each benchmark of the command has a ``manage.py <command> <benchmark>`` line in a code block of docs/benchmarks.md."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", text, flags=re.S))
    missing = [run for run in benchmark_invocations(name) if not re.search(rf"manage\.py {re.escape(run)}\b", blocks)]
    assert not missing, f"docs/benchmarks.md shows no command of {missing}"


# Backquoted references to the repository in the README and docs: a path under one of these
# folders, or a dotted name of one of these packages (``memory.flush.refresh_statistics``).
REPOSITORY_PATH = re.compile(
    r"(?<![\w/.])((?:memfuse_project|memory|buffers|benchmarks|tests|templates|docs)/[\w./-]*\w)"
)
DOTTED_NAME = re.compile(r"(?<![\w./=])((?:memfuse_project|memory|buffers|benchmarks)(?:\.\w+)+)")


def _dotted_name_exists(dotted: str) -> bool:
    """Whether ``dotted`` is a module of the repository, or a name its longest module prefix's
    source mentions (read as text: nothing is imported)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        for module in (base.with_suffix(".py"), base / "__init__.py"):
            if module.is_file():
                rest = parts[end:]
                return not rest or re.search(rf"\b{re.escape(rest[0])}\b", module.read_text()) is not None
    return False


def test_dotted_name_check_can_fail():
    """A module, a module's function and an unknown name are told apart."""
    assert _dotted_name_exists("memory.checks")
    assert _dotted_name_exists("memfuse_project.env.envbool")
    assert not _dotted_name_exists("memory.no_such_module_here")


# CHANGELOG.md names things as they were when they were added.
@pytest.mark.parametrize(
    "path", [path for path in _markdown_files() if path.name != "CHANGELOG.md"], ids=lambda path: path.name
)
def test_repository_references_exist(path):
    """Every backquoted path of the repository, and every dotted module or name of the product
    and its tools, that the README and docs mention exists in the tree (WebSocket frame types
    such as ``memory.query`` and system check ids aside)."""
    frame_types = set(re.findall(r'"type": "([\w.]+)"', (ROOT / "docs" / "api.md").read_text()))
    fences = re.compile(r"```.*?```", flags=re.S)
    text = path.read_text()
    stale = []
    for code in [*fences.findall(text), *re.findall(r"`([^`]+)`", fences.sub("", text))]:
        for reference in REPOSITORY_PATH.findall(code):
            if not (ROOT / reference).exists():
                stale.append(reference)
        for dotted in DOTTED_NAME.findall(code):
            if dotted in frame_types or re.fullmatch(r"memory\.[EW]\d{3}", dotted):
                continue
            if not _dotted_name_exists(dotted):
                stale.append(dotted)
    assert not stale, f"{path.name} names {stale}, which the tree does not hold"
