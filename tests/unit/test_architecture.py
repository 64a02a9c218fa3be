"""The layers hold: the sans-IO core imports no IO; modules import each other
without cycles; the public surface matches __all__ and the README.

import-linter (pyproject.toml, ``[tool.importlinter]``) states the layer
contracts; `test_import_contracts` runs it, so a wrong import fails the suite
with import-linter's message naming it.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import fastrelay

FORBIDDEN_IN_CORE = {"asyncio", "ssl", "socket", "uvloop", "selectors", "threading", "time"}
PKG = pathlib.Path(fastrelay.__file__).parent
ROOT = PKG.parent
CORE = sorted(p.stem for p in (PKG / "core").glob("*.py") if p.stem != "__init__")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (TYPE_CHECKING included)."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module: str) -> None:
    imported = {m.split(".")[0] for m in _imports(PKG / "core" / f"{module}.py")}
    assert not imported & FORBIDDEN_IN_CORE


def test_module_import_graph_is_acyclic() -> None:
    graph = {
        name: {m for m in _imports(path) if m in MODULES and m != name}
        for name, path in MODULES.items()
        if not name.endswith("__init__") and name.count(".") >= 1
    }
    # Package __init__s re-export; what matters is module-to-module cycles.
    graph = {k: {m for m in v if MODULES[m].stem != "__init__"} for k, v in graph.items()}
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
    # transfer in the connection, not in the registry or the listener.
    registry = graph["fastrelay.server.registry"]
    assert "fastrelay.server.transfer" not in registry
    assert "fastrelay.server.connection" not in registry


def test_nothing_inside_imports_the_package_root() -> None:
    for name, path in MODULES.items():
        if name in ("fastrelay", "fastrelay.__main__", "fastrelay.cli"):
            continue
        assert "fastrelay" not in _imports(path), f"{name} imports the package root"


def test_import_contracts() -> None:
    """import-linter's contracts (pyproject.toml) hold; its report names any
    import that breaks one."""
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    repo = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [str(lint), "--no-cache", str(repo / "pyproject.toml")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_names() -> None:
    for name in fastrelay.__all__:
        assert hasattr(fastrelay, name), name
