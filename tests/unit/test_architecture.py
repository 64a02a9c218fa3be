"""The sans-IO core imports no IO; modules import each other without cycles;
the public surface matches __all__."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fastrelay

CORE = [
    "session",
    "tickets",
    "heads",
    "chunked",
    "framing",
    "deadlines",
    "phases",
    "config",
    "errors",
    "mint",
    "observe",
    "logsafe",
    "signed_tickets",
    "ledger",
]
FORBIDDEN = {"asyncio", "ssl", "socket", "uvloop", "selectors"}
PKG = pathlib.Path(fastrelay.__file__).parent


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module: str) -> None:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def _package_imports(module: str) -> set[str]:
    """fastrelay modules that ``module`` imports, TYPE_CHECKING ones included."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {a.name for a in node.names}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("fastrelay.")
        ):
            found.add(node.module.split(".")[1])
    return {m for m in found if (PKG / f"{m}.py").exists()}


def test_module_import_graph_is_acyclic() -> None:
    modules = [p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")]
    graph = {m: _package_imports(m) for m in modules}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    # The data path is not reachable from the registry: pairing builds the
    # transfer in the connection, not in the registry or the server.
    assert "transfer" not in graph["registry"] and "connection" not in graph["registry"]


def test_public_names() -> None:
    for name in fastrelay.__all__:
        assert hasattr(fastrelay, name), name
