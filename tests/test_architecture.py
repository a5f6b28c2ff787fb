"""The package structure: the library never imports the apps, and no two of its packages import each other.

Nodes are hieravid's subpackages (``ops``, ``adapters``, ``runtime``, ``apps``, ``integrations``, ``testing``) and
each module at the top of ``hieravid/``; an edge is any import of one node by another (inside functions too), except
imports only made for type checking and the lazy re-exports of ``hieravid/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "adapters", "runtime", "apps", "integrations", "testing")
APPS = ("hieravid.apps", "hieravid.integrations")
#: The conformance kit: used from tests only, so nothing else may import it.
KIT = "hieravid.testing"


def _files() -> dict[str, Path]:
    """Dotted module name → file, for the library (``hieravid/``) and the adapters (``hieravid.adapters``)."""
    files = {}
    for path in (REPO / "hieravid").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "adapters").rglob("*.py"):
        parts = ("hieravid", *path.relative_to(REPO).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _node(module: str) -> str | None:
    """The node a hieravid module belongs to (None for the package root and modules outside hieravid)."""
    parts = module.split(".")
    if parts[0] != "hieravid" or len(parts) < 2:
        return None
    return f"hieravid.{parts[1]}"


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for statement in node.body for child in ast.walk(statement))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = _files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        source = _node(module)
        if source is None:  # hieravid/__init__.py: lazy re-exports by name only
            continue
        targets = {_node(name) for name in _imports(module, path) if name in files or name.rsplit(".", 1)[0] in files}
        graph.setdefault(source, set()).update(target for target in targets if target and target != source)
    return graph


def test_every_package_of_the_tree_is_a_node() -> None:
    graph = _graph()
    for package in PACKAGES:
        assert f"hieravid.{package}" in graph, package
    assert {"hieravid.policy", "hieravid.plan", "hieravid.specs"} <= set(graph)


def test_the_library_never_imports_the_apps() -> None:
    graph = _graph()
    offenders = {
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if target in APPS and source not in APPS
    }
    assert offenders == set()


def test_nothing_imports_the_conformance_kit() -> None:
    graph = _graph()
    assert {source for source, targets in graph.items() if KIT in targets} == set()
    assert "hieravid.runtime" in graph[KIT]  # the kit itself is seen


def test_no_two_packages_import_each_other() -> None:
    graph = _graph()
    # Depth-first search for any cycle (a mutual import is the shortest one).
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_sees_real_edges() -> None:
    """The analysis is not vacuous: known dependencies are found."""
    graph = _graph()
    assert "hieravid.adapters" in graph["hieravid.runtime"]
    assert "hieravid.policy" in graph["hieravid.ops"]
    assert "hieravid.runtime" in graph["hieravid.apps"]
    assert "hieravid.adapters" in graph["hieravid.specs"]
