"""The import graph of vstream: no module imports itself back through others at import time.

Every module under vstream/ is parsed with `ast` (nothing is imported); an edge goes from a module to each vstream
module it imports, `from X import name` counting as an import of `X.name` where that is a module, else of `X`. Edges of
imports inside functions are kept apart: they run when the function is called, after every module has loaded, so only
module-level imports (including those under a module-level `if` or `try`) can form a cycle. Importing a submodule also
initialises its parent packages; those implicit edges are not drawn (a package's __init__ importing its own submodules
is the ordinary layout, not a cycle).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import AbstractSet

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vstream"

KNOWN_CYCLES: set[frozenset[str]] = set()
"""Cycles among module-level imports that exist and are accepted for now (none); a new one fails the test."""

Graph = dict[str, AbstractSet[str]]
"""Module -> the vstream modules it imports."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module name that a (possibly relative) `from ... import` names."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The vstream modules an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    source = _resolve(node, importer, is_package)
    found = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
    return [m for m in dict.fromkeys(found) if m in modules]


class _Imports(ast.NodeVisitor):
    """Module-level and in-function imports of one module."""

    def __init__(self, importer: str, is_package: bool, modules: set[str]):
        self.importer, self.is_package, self.modules = importer, is_package, modules
        self.depth = 0
        self.top: set[str] = set()
        self.deferred: set[str] = set()
        self.external_top: set[str] = set()
        self.external_deferred: set[str] = set()

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        """`if TYPE_CHECKING:` imports never run: type checkers read them, the import graph does not."""
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        targets = set(_targets(node, self.importer, self.is_package, self.modules)) - {self.importer}
        (self.deferred if self.depth else self.top).update(targets)
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] * (not node.level)
        roots = {n.split(".")[0] for n in names} - {"vstream", ""}
        (self.external_deferred if self.depth else self.external_top).update(roots)

    visit_Import = visit_ImportFrom = _import


@functools.cache
def _visited() -> dict[str, _Imports]:
    """Every module of vstream, parsed once, with what it imports."""
    modules = all_modules()
    names = set(modules)
    out = {}
    for name, path in modules.items():
        out[name] = _Imports(name, path.name == "__init__.py", names)
        out[name].visit(ast.parse(path.read_text(), str(path)))
    return out


def import_graph() -> tuple[Graph, Graph]:
    """(module-level edges, in-function edges) of every module of vstream."""
    visited = _visited()
    return ({m: frozenset(v.top) for m, v in visited.items()}, {m: frozenset(v.deferred) for m, v in visited.items()})


def external_imports() -> tuple[Graph, Graph]:
    """(module-level, in-function) top-level packages outside vstream that each module imports (`av`, `torch`, ...)."""
    visited = _visited()
    return ({m: frozenset(v.external_top) for m, v in visited.items()},
            {m: frozenset(v.external_deferred) for m, v in visited.items()})


def cyclic_components(graph: Graph) -> list[frozenset[str]]:
    """The strongly connected components that hold a cycle: the sets of modules that import each other, in a ring."""
    return [frozenset(c) for c in _components(graph) if len(c) > 1 or next(iter(c)) in graph[next(iter(c))]]


def _components(graph: Graph) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def cycle_path(component: frozenset[str], graph: Graph) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_graph_sees_every_module_and_both_kinds_of_import():
    top, deferred = import_graph()
    assert "vstream.cli" in top and "vstream.cli.ask" in top and "vstream.errors" in top
    assert "vstream.cli.ask" in top["vstream.cli"]  # `from vstream.cli import ask` names the submodule
    assert "vstream.cli.options" in top["vstream.cli.ask"]
    assert "vstream.model.loading" in deferred["vstream"]  # `vstream.load` imports it when called


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c", "e"}, "c": {"a"}, "d": {"d"}, "e": set()}
    found = cyclic_components(graph)
    assert sorted(map(sorted, found)) == [["a", "b", "c"], ["d"]]
    assert sorted(cycle_path(c, graph) for c in found) == [["a", "b", "c", "a"], ["d", "d"]]


def test_no_new_cycle_among_module_level_imports():
    top, _ = import_graph()
    found = cyclic_components(top)
    new = [" -> ".join(cycle_path(c, top)) for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles among module-level imports: " + "; ".join(new)
    gone = KNOWN_CYCLES - set(found)
    assert not gone, f"known cycles that no longer exist (remove them from KNOWN_CYCLES): {gone}"


def test_the_command_line_is_in_no_cycle_even_through_imports_in_functions():
    top, deferred = import_graph()
    every = {m: top[m] | deferred[m] for m in top}
    for component in cyclic_components(every):
        cli = sorted(m for m in component if m == "vstream.cli" or m.startswith("vstream.cli."))
        assert not cli, f"{cli} in an import cycle: {' -> '.join(cycle_path(component, every))}"


@pytest.mark.parametrize("module", sorted(m for m in all_modules() if m.startswith("vstream.cli.")
                                           and m != "vstream.cli.__main__"))
def test_no_command_module_imports_the_command_table(module):
    """The table in vstream/cli/__init__.py imports the commands; no command imports it back, even in a function."""
    top, deferred = import_graph()
    assert "vstream.cli" not in top[module] | deferred[module]


LAYER_CONTRACTS: dict[str, frozenset[str]] = {
    "vstream.memory": frozenset({"vstream.model"}),
    "vstream.model": frozenset({"vstream.engine", "vstream.server"}),
    "vstream.engine": frozenset({"vstream.server", "vstream.sources", "av"}),
}
"""Layer -> what none of its modules may import, at module level or in a function, directly or through the modules it
imports (what importing them runs: their module-level imports, their parent packages'). The memory is arithmetic on
tensors and knows no model; the model knows no engine or server; the engine consumes tensors and `(t, frame)`s from
any iterable and knows no server, no source and no video library (PyAV, `av`)."""

KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
"""(importer, imported) pairs that break LAYER_CONTRACTS today and are accepted for now; a new one fails."""


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _loaded(module: str, top: Graph) -> set[str]:
    """The vstream modules that importing `module` runs: it, its parent packages, and theirs and their module-level
    imports', transitively."""
    seen: set[str] = set()
    work = [module]
    while work:
        name = work.pop()
        parts = name.split(".")
        for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if m in top and m not in seen:
                seen.add(m)
                work.extend(top[m])
    return seen


def layer_violations() -> set[tuple[str, str]]:
    """(importer, imported) pairs of LAYER_CONTRACTS' layers that reach a forbidden module or package; `imported` is
    the vstream module the importer names, or the outside package (`av`) when it imports it itself."""
    top, deferred = import_graph()
    ext_top, ext_deferred = external_imports()
    found = set()
    for layer, banned in LAYER_CONTRACTS.items():
        for module in (m for m in top if _under(m, layer)):
            found |= {(module, e) for e in (ext_top[module] | ext_deferred[module]) & banned}
            for target in top[module] | deferred[module]:
                loaded = _loaded(target, top)
                if any(_under(m, b) for m in loaded for b in banned) or any(ext_top[m] & banned for m in loaded):
                    found.add((module, target))
    return found


def test_layer_contracts_find_what_they_forbid():
    top, _ = import_graph()
    assert "vstream.video" in _loaded("vstream.sources", top) and "vstream" in _loaded("vstream.sources", top)
    assert "av" in external_imports()[0]["vstream.video"]


def test_no_layer_imports_what_its_contract_forbids():
    found = layer_violations()
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports across layers (tests/test_imports.py LAYER_CONTRACTS): " + "; ".join(
        f"{a} imports {b}" for a, b in new)
    gone = KNOWN_VIOLATIONS - found
    assert not gone, f"known violations that no longer exist (remove them from KNOWN_VIOLATIONS): {sorted(gone)}"
