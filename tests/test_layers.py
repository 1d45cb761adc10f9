"""The apps depend one way: ``memory`` uses ``buffers``; ``buffers`` never imports ``memory``.

The same rule as the import-linter contract in ``pyproject.toml``, checked here on the
direct imports of every module of ``buffers`` (top-level or inside a function, absolute or
relative, and ``importlib.import_module`` / ``import_string`` of a literal name).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER, UPPER = "buffers", "memory"
_DYNAMIC_IMPORTS = {"import_module", "import_string", "__import__"}


def imported_names(tree: ast.AST, *, module: str) -> list[tuple[int, str]]:
    """``[(line, dotted name)]`` of what ``tree`` (the source of ``module``) imports."""
    package = module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            names.append((node.lineno, name))
            names.extend((node.lineno, f"{name}.{alias.name}" if name else alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if called in _DYNAMIC_IMPORTS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append((node.lineno, first.value))
    return names


def imports_of(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def upper_imports(source: str, *, module: str) -> list[tuple[int, str]]:
    """The imports of the upper app in ``source`` (the text of ``module``)."""
    return [(line, name) for line, name in imported_names(ast.parse(source), module=module) if imports_of(name, UPPER)]


def test_buffers_never_imports_memory():
    """No module of buffers imports memory (memory reaches buffers, never the reverse)."""
    offenders = []
    for path in sorted((ROOT / LOWER).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        if relative.name == "__init__":
            module += ".__init__"  # so that a relative import resolves from the package itself
        for line, name in upper_imports(path.read_text(encoding="utf-8"), module=module):
            offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "buffers must not import memory:\n" + "\n".join(offenders)


def test_the_check_finds_every_form_of_import():
    """The check finds plain, from-, relative, function-local and dynamic imports of memory,
    and passes imports of buffers itself and of names that only begin with "memory"."""
    source = """
import memory
import memory.indexing.flush as flush
from memory.errors import ServiceError
from .. import memory as sibling
from ..memory import services

def later():
    from memory import registry
    importlib.import_module("memory.selectors")
    return import_string("memory.indexing.flush.flush_pending")

import buffers.jobs
from buffers import events
from . import models
import memoryview_helpers
"""
    found = {name for _, name in upper_imports(source, module="buffers.workers")}
    assert found == {
        "memory",
        "memory.indexing.flush",
        "memory.errors",
        "memory.errors.ServiceError",
        "memory.services",
        "memory.registry",
        "memory.selectors",
        "memory.indexing.flush.flush_pending",
    }
    # "from .. import memory" in buffers.workers is the top-level memory package.
    assert any(name == "memory" and line == 5 for line, name in upper_imports(source, module="buffers.workers"))
