"""The import rules of ARCHITECTURE.md, checked on the source: imports only run down the
floors, siblings on one floor stay independent, and no modules import each other in a circle
(lazy imports inside functions count; imports under ``if TYPE_CHECKING:`` do not)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emrun"

FLOORS: list[set[str]] = [
    {"emrun", "errors", "paths", "atomic", "subprocesses", "stages", "shipped", "unionfind",
     "components", "memory"},
    {"capacity", "devices", "geometry", "locks"},
    {"registry", "io", "synth"},
    {"recipe"},
    {"models", "losses", "data", "evaluate"},
    {"infer", "segment"},
    {"train"},
    {"bench", "demo", "export", "preview", "summary", "view"},
    {"cli"},
    {"__main__"},
]
"""Each part of emrun (a subpackage or a top-level module) on its floor, lowest first; the
same table as ARCHITECTURE.md."""

FLOOR = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """``emrun.infer.engine`` -> ``infer``; ``emrun`` -> ``emrun``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or \
        (PACKAGE.parent / relative / "__init__.py").exists()


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except what sits under ``if TYPE_CHECKING:`` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """The emrun modules ``path`` imports, resolved to modules (not names inside them)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "emrun")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source.split(".")[0] != "emrun":
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if is_module(child) else source)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_has_a_floor():
    parts = {part_of(m) for m in graph()}
    assert parts - FLOOR.keys() == set(), "add new parts to FLOORS and to ARCHITECTURE.md"
    assert FLOOR.keys() - parts == set(), "FLOORS names a part that no longer exists"


def test_imports_only_run_down():
    wrong = []
    for module, targets in graph().items():
        here = part_of(module)
        for target in targets:
            there = part_of(target)
            if there != here and FLOOR[there] >= FLOOR[here]:
                side = "up" if FLOOR[there] > FLOOR[here] else "sideways"
                wrong.append(f"{module} -> {target} ({side}: floor {FLOOR[here]} -> "
                             f"{FLOOR[there]})")
    assert wrong == []


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_no_circles():
    assert circles(graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_circle_finder_finds_circles(edges, expected):
    assert circles(edges) == expected


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = PACKAGE / "infer" / "engine.py"
    found = imports_of(source)
    assert "emrun.io.package" in found  # `from ..io.package import load_network`
    assert "emrun.infer.tta" in found  # imported inside a function


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_recipe_floor_needs_no_torch():
    """A recipe is checked and its schema written without torch (ARCHITECTURE.md)."""
    for part in ("recipe", "registry", "geometry", "errors", "paths"):
        for path in [*PACKAGE.joinpath(part).rglob("*.py"), PACKAGE / f"{part}.py"]:
            if path.exists():
                assert "torch" not in third_party_imports(path), path
