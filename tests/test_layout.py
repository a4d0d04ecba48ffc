"""The package's shape: its module-level import graph has no cycle, no module imports another
module's ``_private`` names, and ``import qdrift_stats`` stays light (the public API loads lazily).

Run: ``python -m pytest tests/test_layout.py``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qdrift_stats"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from X import ...`` (relative imports resolved against ``importer``)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: top level, class bodies, ``if``/``try``/``with``
    blocks; not function bodies (imported at call time) and not ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def targets(importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement loads (itself and the packages it passes through)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = resolve(importer, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.add(sub if sub in MODULES else base)
    loaded: set[str] = set()
    own_packages = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # the packages on the way (not the lazy top-level package)
            candidate = ".".join(parts[:i])
            if candidate in MODULES and candidate not in own_packages and candidate != importer:
                loaded.add(candidate)
    return loaded


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in module_level_imports(tree):
            graph[name] |= targets(name, node)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def private_imports() -> list[str]:
    """``module: from other import _name`` for every import (any depth) of another module's private name."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = resolve(name, node)
            if not source.startswith("qdrift_stats") or source == name:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}: from {source} import {alias.name}")
    return found


def test_the_graph_sees_the_known_imports():
    """The checker itself: a few imports that must be found (so an empty graph cannot pass)."""
    graph = import_graph()
    assert "qdrift_stats.estimators.base" in graph["qdrift_stats.estimators.empirical"]
    assert "qdrift_stats.errors" in graph["qdrift_stats.estimators.base"]
    assert "qdrift_stats.estimators" in graph["qdrift_stats.validate.learning_curve"]
    assert graph["qdrift_stats"] == set()  # the public API imports lazily
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_module_level_imports_are_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports()
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_import_qdrift_stats_loads_neither_torch_nor_diffusers():
    code = "import sys, qdrift_stats; print(sorted(m for m in ('torch', 'diffusers', 'xarray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", __import__("qdrift_stats").__all__)
def test_every_public_name_resolves(name):
    import qdrift_stats

    assert getattr(qdrift_stats, name) is not None
    assert name in dir(qdrift_stats)


def test_record_is_the_subpackage_and_the_function():
    import qdrift_stats
    import qdrift_stats.record.store  # noqa: F401 (importing a submodule must not replace the function)
    from qdrift_stats.record.lockstep import record

    assert callable(qdrift_stats.record) and qdrift_stats.record.store.SCHEMA
    assert qdrift_stats.record.lockstep.record is record


def test_all_lists_exactly_the_lazy_names():
    import qdrift_stats

    assert set(qdrift_stats.__all__) == {"__version__", *qdrift_stats._LAZY}
