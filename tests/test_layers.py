"""Dependencies run one way: ``memfuse_project`` > ``memory`` > ``buffers`` > ``runtime``,
and no package of the product imports the tools (``benchmarks``).

The same rules as the import-linter contracts in ``pyproject.toml``, checked here on the
direct imports of every module of each layer (top-level or inside a function, absolute or
relative, and ``importlib.import_module`` / ``import_string`` of a literal name). A lower
layer imports no higher one; ``runtime`` imports only Django and third-party libraries.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# From the top (the entry points) down to the base; each imports only those after it.
LAYERS = ("memfuse_project", "memory", "buffers", "runtime")
TOOLS = "benchmarks"
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


def forbidden_imports(source: str, *, module: str, forbidden: tuple[str, ...]) -> list[tuple[int, str]]:
    """The imports of any package of ``forbidden`` in ``source`` (the text of ``module``)."""
    return [
        (line, name)
        for line, name in imported_names(ast.parse(source), module=module)
        if any(imports_of(name, package) for package in forbidden)
    ]


def modules_of(package: str):
    """``(path, dotted module name)`` of every Python file of ``package``."""
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        if relative.name == "__init__":
            module += ".__init__"  # so that a relative import resolves from the package itself
        yield path, module


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one_or_the_tools(layer):
    """No module of a layer imports a layer above it, nor benchmarks."""
    higher = (*LAYERS[: LAYERS.index(layer)], TOOLS)
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path, module in modules_of(layer)
        for line, name in forbidden_imports(path.read_text(encoding="utf-8"), module=module, forbidden=higher)
    ]
    assert not offenders, f"{layer} must not import {', '.join(higher)}:\n" + "\n".join(offenders)


def test_every_first_party_package_is_a_layer_or_a_tool():
    """Each package at the root of the repository is placed: a layer, the tools or the tests
    (a new package must be given its place here and in pyproject.toml)."""
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages <= {*LAYERS, TOOLS, "tests"}, packages - {*LAYERS, TOOLS, "tests"}


def test_the_check_finds_every_form_of_import():
    """The check finds plain, from-, relative, function-local and dynamic imports of a higher
    layer, and passes imports of the layer itself and of names that only begin with one."""
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
    found = {name for _, name in forbidden_imports(source, module="buffers.workers", forbidden=("memory",))}
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
    lines = forbidden_imports(source, module="buffers.workers", forbidden=("memory",))
    assert any(name == "memory" and line == 5 for line, name in lines)
