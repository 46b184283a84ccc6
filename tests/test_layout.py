"""The package's shape: no module imports another that (directly or not) imports it back.

Read from the source with `ast` (every import statement, including those inside functions),
so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "migrating_proxy"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `module` imports (a name below a module counts as the module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module or ""
            names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_in_a_cycle() -> None:
    known = module_names()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "migrating_proxy.cli" in graph["migrating_proxy.__main__"]  # the reader works
    assert cycles(graph) == []


def test_the_reader_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_dialogues_do_no_io() -> None:
    """dialogue/ is sans-IO: no Twisted, no sockets, no threads, no event loop."""
    for name, path in module_names().items():
        if not name.startswith("migrating_proxy.dialogue"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                roots = [alias.name for alias in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                for root in roots:
                    assert root.split(".")[0] not in ("twisted", "socket", "threading",
                                                      "asyncio", "select"), (name, root)
