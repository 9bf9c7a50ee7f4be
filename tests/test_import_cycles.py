"""The package has no import cycle: every ``import`` of ``src/cellsymphony`` (function-level ones included)
parsed with ``ast``, and the module graph searched for cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cellsymphony

ROOT = Path(cellsymphony.__file__).parent
PACKAGE = "cellsymphony"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that importing ``name`` runs last (``a.b.c`` -> ``a.b.c`` or its package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """``{module: {imported package module: line}}`` for every import statement that runs: module, class and
    function level. Imports under ``if TYPE_CHECKING:`` are left out: they never run (annotations only,
    with ``from __future__ import annotations``), so they cannot take part in an import cycle."""
    modules = _modules() if modules is None else modules
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = {
            id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
            for stmt in block.body for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # "from pkg import name": the submodule pkg.name when there is one, else pkg itself
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                r = _resolve(t, modules)
                if r is not None and r != mod:
                    edges.setdefault(r, node.lineno)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _describe(cycle: list[str], graph) -> str:
    return " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)
    ) + f" -> {cycle[-1]}"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the whole package was parsed
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(cycle, graph)}"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a function-level import closing a cycle through a package __init__
        ({"__init__.py": "from . import a\n", "a.py": "def f():\n    from . import b\n", "b.py": "from .a import f\n"},
         ["cellsymphony.a", "cellsymphony.b", "cellsymphony.a"]),
        ({"__init__.py": "from . import a\n", "a.py": "from . import b\n", "b.py": "import numpy\n"}, None),
        # an annotation-only import never runs: no cycle
        ({"__init__.py": "from . import a\n", "a.py": "from . import b\n",
          "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n"}, None),
        # "from .. import name": the parent package itself when name is not a module
        ({"__init__.py": "from .sub import x\n", "sub/__init__.py": "from ._m import x\n",
          "sub/_m.py": "def x():\n    from .. import __version__\n"},
         ["cellsymphony", "cellsymphony.sub", "cellsymphony.sub._m", "cellsymphony"]),
    ],
)
def test_the_cycle_finder_finds_cycles(tmp_path, files, expected):
    pkg = tmp_path / PACKAGE
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    modules = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = p
    cycle = find_cycle(import_graph(modules))
    if expected is None:
        assert cycle is None
    else:
        assert cycle is not None and set(cycle) == set(expected) and len(cycle) == len(expected)
        assert cycle[0] == cycle[-1]
