"""Fail when the modules of a package import each other in a cycle.

    python3 scripts/check_imports.py [PACKAGE_DIR]      (default: stalk/ next to this script)

Every import statement counts, wherever it stands: at the top, under ``if TYPE_CHECKING:``, or
inside a function. A type-only or lazy import is still a design tie, and a cycle through one is
still a cycle. ``from pkg import name`` ties to ``pkg.name`` when that is a module, else to
``pkg`` itself; an import of ``a.b.c`` ties to ``a.b.c`` only, not to the packages ``a`` and
``a.b`` that Python runs first (what import-linter's graph does too).

Prints each cycle with the file and line of every import in it; exits 1 if there is one.
This is the one check import-linter has no contract for: ``acyclic_siblings`` looks only between
siblings, so it misses a package whose ``__init__`` and a child import each other.
"""

from __future__ import annotations

import ast
import sys
from itertools import pairwise
from pathlib import Path

#: (importer, imported) -> line of the first import making the tie.
Edges = dict[tuple[str, str], int]


def module_names(root: Path) -> dict[str, Path]:
    """Map each module's dotted name to its file; a package is named by its ``__init__.py``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Edges:
    """Return the ties from module ``name`` to other modules of the package."""
    is_package = path.name == "__init__.py"
    edges: Edges = {}

    def tie(target: str, line: int) -> None:
        # `import a.b.c` where only `a.b` is ours still ties to `a.b`.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.setdefault((name, target), line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                tie(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join([*parts[:keep], *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                tie(sub if sub in modules else base, node.lineno)
    return edges


def cycles(edges: Edges) -> list[tuple[list[str], set[str]]]:
    """Return each group of modules tied in cycles (Tarjan's algorithm) with its shortest cycle."""
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    sys.setrecursionlimit(max(1000, 4 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(_shortest_cycle(graph, group), group) for group in sorted(groups, key=min)]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """Return a shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError("a strongly connected group always has a cycle")


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "stalk")
    modules = module_names(root.resolve())
    edges: Edges = {}
    for name, path in modules.items():
        edges.update(imports_of(name, path, modules))
    found = cycles(edges)
    for cycle, group in found:
        print(f"import cycle: {' -> '.join(cycle)}")
        for src, dst in pairwise(cycle):
            where = modules[src].relative_to(root.resolve().parent)
            print(f"    {where}:{edges[(src, dst)]}: {src} imports {dst}")
        if len(group) > len(cycle) - 1:
            print(f"    (tied in cycles with it: {', '.join(sorted(group - set(cycle)))})")
    if found:
        print(f"check_imports: {len(found)} import cycle(s) in {root.name}/")
        return 1
    print(f"check_imports: no import cycle among {len(modules)} modules of {root.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
