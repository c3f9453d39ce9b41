"""The module graph of hybridlib: one-way layers, no import cycles, no hidden (function-local) imports.

Read from the source with ``ast`` (nothing is imported), so a cycle that Python would only hit on some
import order, or an import tucked inside a function to dodge one, is caught here. The graph holds every
import, at module level or in a function: the entry points (the package and the command line) import the
modules a command needs when it runs, and those imports count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hybridlib"

# The layers, lowest first (docs/architecture.md, "Modules: one-way layering"): a module imports only
# modules to its left.
LAYERS = [
    "errors", "locations", "config", "threads", "runtime", "hub", "tokens", "rawdata", "batching", "data", "embeddings",
    "model", "distributed", "files", "runs", "runlock", "checkpoints", "trainstate", "training",
    "baselines", "evaluation", "explain", "prediction", "plots", "compare", "exploration", "widgets",
    "notebook", "pipeline", "cli",
]
ENTRY_POINTS = {"__init__", "__main__"}  # the package itself and `python -m hybridlib`: above every layer
# Where function-local imports of hybridlib modules are allowed: hybridlib/__init__.py imports Predictor (torch)
# only when asked for; each command of the CLI imports its modules when it runs (`hybridlib --help` stays light).
LAZY_ENTRY_POINTS = {"__init__", "cli"}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def hybridlib_imports(node: ast.AST) -> list[str]:
    """The hybridlib modules an import statement names ("hybridlib.x"; ``from hybridlib import x`` counts as x)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names if a.name == "hybridlib" or a.name.startswith("hybridlib.")]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative import: resolve against the package
            base = "hybridlib" + (f".{node.module}" if node.module else "")
        else:
            base = node.module or ""
        if base == "hybridlib":
            out = [f"hybridlib.{a.name}" if (PACKAGE / f"{a.name}.py").is_file() else "hybridlib" for a in node.names]
        elif base.startswith("hybridlib."):
            out = [base]
    return [name.split(".")[1] if "." in name else "__init__" for name in out]


def top_level_statements(tree: ast.Module):
    """Statements that run at import time: the module body, including inside if/try blocks (not def/class)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """{module: hybridlib modules it imports (at module level only, with ``top_level_only``)}."""
    out = {}
    for name, tree in modules().items():
        nodes = top_level_statements(tree) if top_level_only else ast.walk(tree)
        out[name] = {m for node in nodes for m in hybridlib_imports(node)} - {name}
    return out


def test_the_scan_sees_the_real_imports():
    g = graph()
    assert set(g) == set(LAYERS) | ENTRY_POINTS, "a module was added or removed: place it in LAYERS"
    assert {"config", "errors", "files", "model"} <= g["checkpoints"]
    assert "training" in g["pipeline"] and "pipeline" in g["cli"]
    assert g["errors"] == set()


def test_no_function_local_imports_of_hybridlib_modules():
    """Every hybridlib import of a library module sits at module level (a local import would hide the order in
    which modules load); only the entry points load modules on demand."""
    local = []
    for name, tree in modules().items():
        top = {id(node) for node in top_level_statements(tree)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                for target in hybridlib_imports(node):
                    if name not in LAZY_ENTRY_POINTS:
                        local.append(f"hybridlib/{name}.py:{node.lineno} imports hybridlib.{target} inside a function")
    assert not local, "\n".join(local)


def test_the_command_line_loads_no_command_at_import():
    """`hybridlib --help`, `hybridlib params` and a refused parameter or path need only config, locations and errors."""
    assert graph(top_level_only=True)["cli"] == {"config", "errors", "locations"}


def test_the_lazy_predictor_is_the_only_exception():
    tree = modules()["__init__"]
    top = {id(node) for node in top_level_statements(tree)}
    lazy = [m for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in top
            for m in hybridlib_imports(node)]
    assert lazy == ["prediction"]
    assert "prediction" not in graph(top_level_only=True)["__init__"]  # `import hybridlib` stays light (no torch)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(g.get(m, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(f"hybridlib.{x}" for x in cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_each_module_imports_only_lower_layers():
    g = graph()
    rank = {m: i for i, m in enumerate(LAYERS)}
    wrong = [f"hybridlib.{m} imports hybridlib.{dep}, a layer above it"
             for m in LAYERS for dep in sorted(g[m]) if dep in rank and rank[dep] >= rank[m]]
    assert not wrong, "\n".join(wrong)
    for m in LAYERS:
        assert not g[m] & ENTRY_POINTS - {"__init__"}, m
        assert "__init__" not in g[m], f"hybridlib.{m} imports the package itself (from hybridlib import ...)"
