"""The package's import graph, read from the source (ast): no circle anywhere, deferred
and TYPE_CHECKING imports included, and an engine that imports only a few modules."""

from __future__ import annotations

import ast
from pathlib import Path

import cached_aside

PACKAGE = Path(cached_aside.__file__).parent
ENGINE_LIMIT = 8  # issue 25: the engine is a thin front over a few parts


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each package module and the package modules it imports, wherever the import
    statement stands (module level, a function, an `if TYPE_CHECKING:` block)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from . import _x` imports the module _x; `from . import X`, the package
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                    for alias in node.names
                ]
            else:
                continue
            imported.update(target for target in targets if target in paths)
        imported.discard(name)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_every_module() -> None:
    graph = import_graph()
    assert "cached_aside._effects" in graph
    assert "cached_aside._scripts" in graph["cached_aside._effects"]
    assert "cached_aside._keys" in graph["cached_aside._scripts"]  # under TYPE_CHECKING


def test_a_circle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def test_the_effects_import_nothing_that_performs_them() -> None:
    """The effects are the flows' vocabulary: the lowest layer but the scripts'."""
    graph = import_graph()
    assert graph["cached_aside._effects"] <= {"cached_aside._scripts"}
    assert graph["cached_aside._scripts"] <= {"cached_aside._keys"}


def test_the_engine_imports_only_a_few_package_modules() -> None:
    imported = import_graph()["cached_aside._engine"]
    assert len(imported) <= ENGINE_LIMIT, sorted(imported)
