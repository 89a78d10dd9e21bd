"""The package's shape: no import cycles among its modules, and a light ``import influencekit``.

The import graph is read from the source with ``ast``, not by importing anything: every
``import`` statement at any depth (module level, and inside functions, methods, ``if`` and
``try`` blocks) counts, since a function-level import is a cycle deferred, not removed. Only
imports under ``if TYPE_CHECKING:`` are left out (they never run).

Nodes are the package's modules; a package's ``__init__`` is a facade, not a node: a name
imported from a package resolves to the submodule that defines it (following the
``__init__``'s own ``from .x import name``), ``from pkg import submodule`` to that submodule,
and importing a subpackage as a whole to every module its ``__init__`` imports when it runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


# -- the package's modules ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One ``.py`` file of the package: its module name and where it is."""

    module: str
    path: Path
    is_package: bool  # an __init__.py: `module` is the package itself

    @property
    def package(self) -> str:
        """The package relative imports in this file start from."""
        return self.module if self.is_package else self.module.rpartition(".")[0]


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """``[tool.setuptools] package-dir`` of ``pyproject``: package name -> folder."""
    with open(pyproject, "rb") as file:
        mapping = tomllib.load(file)["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in mapping.items()}


def find_sources(mapping: dict[str, Path]) -> dict[str, Source]:
    """Every module of the packages in ``mapping``, by name.

    A folder is a (sub)package if it has an ``__init__.py``; one that another entry of
    ``mapping`` claims is left to that entry.
    """
    claimed = {folder.resolve() for folder in mapping.values()}
    sources: dict[str, Source] = {}
    for name, folder in mapping.items():
        stack = [(name, folder)]
        while stack:
            package, here = stack.pop()
            for path in sorted(here.iterdir()):
                if path.is_dir():
                    if (path / "__init__.py").is_file() and path.resolve() not in claimed:
                        stack.append((f"{package}.{path.name}", path))
                elif path.suffix == ".py":
                    is_package = path.name == "__init__.py"
                    module = package if is_package else f"{package}.{path.stem}"
                    sources[module] = Source(module, path, is_package)
    return sources


# -- import statements -------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """``from <base> import <names>`` (``names`` empty for ``import <base>``), absolute."""

    base: str
    names: tuple[str, ...]
    aliases: tuple[str, ...]  # what each name is bound to in the importing module
    line: int
    nested: bool  # inside a function: runs when it is called, not on import


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(source: Source, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = source.package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def statements(source: Source) -> list[Statement]:
    """Every import statement of ``source`` at any depth, bar ``if TYPE_CHECKING:`` bodies."""
    tree = ast.parse(source.path.read_text(encoding="utf-8"), filename=str(source.path))
    found: list[Statement] = []

    def visit(node: ast.AST, nested: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, nested)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                found.append(Statement(alias.name, (), (bound,), node.lineno, nested))
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            aliases = tuple(alias.asname or alias.name for alias in node.names)
            found.append(Statement(_absolute(source, node), names, aliases, node.lineno, nested))
        inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


# -- the graph ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown.as_posix()}:{self.line}"


class Resolver:
    """Resolves import statements to the package's modules (package ``__init__`` files are
    looked through, never nodes)."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self.sources = sources
        self.statements = {name: statements(source) for name, source in sources.items()}
        self._expanding: set[str] = set()
        self._expanded: dict[str, frozenset[str]] = {}

    def is_module(self, name: str) -> bool:
        return name in self.sources and not self.sources[name].is_package

    def is_package(self, name: str) -> bool:
        return name in self.sources and self.sources[name].is_package

    def whole(self, name: str) -> frozenset[str]:
        """What importing ``name`` loads among the nodes: the module itself, or for a package
        every module its ``__init__`` imports when it runs (recursively)."""
        if self.is_module(name):
            return frozenset({name})
        if not self.is_package(name) or name in self._expanding:
            return frozenset()
        if name not in self._expanded:
            self._expanding.add(name)
            loaded: set[str] = set()
            for statement in self.statements[name]:
                if not statement.nested:
                    loaded |= self.targets(statement)
            self._expanding.discard(name)
            if self._expanding:  # part of an outer expansion that may not be complete yet
                return frozenset(loaded)
            self._expanded[name] = frozenset(loaded)
        return self._expanded[name]

    def name_from(self, package: str, name: str, seen: frozenset = frozenset()) -> frozenset[str]:
        """The modules ``from package import name`` depends on."""
        if self.is_module(f"{package}.{name}") or self.is_package(f"{package}.{name}"):
            return self.whole(f"{package}.{name}")
        if self.is_module(package):
            return frozenset({package})
        if not self.is_package(package) or (package, name) in seen:
            return frozenset()
        seen = seen | {(package, name)}
        for statement in self.statements[package]:  # the __init__'s re-exports, at any depth
            if name not in statement.aliases:
                continue
            if not self._inside(statement.base):
                return frozenset()  # re-exported from outside the package
            if not statement.names:  # import x.y as name
                return self.whole(statement.base)
            imported = statement.names[statement.aliases.index(name)]
            return self.name_from(statement.base, imported, seen)
        return self.whole(package)  # defined in the __init__ itself: it all runs

    def targets(self, statement: Statement) -> frozenset[str]:
        """The modules one import statement depends on."""
        if not self._inside(statement.base):
            return frozenset()
        if not statement.names:  # import a.b.c
            return self.whole(statement.base)
        found: set[str] = set()
        for name in statement.names:
            found |= (
                self.whole(statement.base) if name == "*" else self.name_from(statement.base, name)
            )
        return frozenset(found)

    def _inside(self, name: str) -> bool:
        return any(name == top or name.startswith(top + ".") for top in self._tops())

    def _tops(self) -> set[str]:
        return {name.partition(".")[0] for name in self.sources}

    def edges(self) -> list[Edge]:
        """One edge per (importer, imported module) pair: the first import line."""
        first: dict[tuple[str, str], Edge] = {}
        for name, source in self.sources.items():
            if source.is_package:
                continue
            for statement in self.statements[name]:
                for target in sorted(self.targets(statement)):
                    key = (name, target)
                    if target != name and key not in first:
                        first[key] = Edge(name, target, source.path, statement.line)
        return sorted(first.values(), key=lambda edge: (edge.source, edge.target))


def strongly_connected(nodes: Iterable[str], edges: Iterable[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node, each sorted."""
    after: dict[str, list[str]] = {node: [] for node in nodes}
    for edge in edges:
        after.setdefault(edge.source, []).append(edge.target)
        after.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    for start in sorted(after):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(after[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(after[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Per strongly connected component, the shortest cycle through each of its modules
    (duplicates dropped): every module caught in a cycle appears in one."""
    nodes = {edge.source for edge in edges} | {edge.target for edge in edges}
    by_pair = {(edge.source, edge.target): edge for edge in edges}
    found: list[list[Edge]] = []
    seen: set[frozenset] = set()
    for component in strongly_connected(nodes, edges):
        members = set(component)
        for start in component:
            path = _shortest_cycle(start, members, by_pair)
            key = frozenset((edge.source, edge.target) for edge in path)
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def _shortest_cycle(start: str, members: set[str], by_pair: dict) -> list[Edge]:
    """Breadth-first from ``start`` back to it, inside one component."""
    after: dict[str, list[str]] = {}
    for source, target in sorted(by_pair):
        if source in members and target in members:
            after.setdefault(source, []).append(target)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in after.get(node, []):
                if child == start:
                    route = [node]
                    while route[-1] != start:
                        route.append(previous[route[-1]])
                    route.reverse()
                    route.append(start)
                    return [by_pair[pair] for pair in pairwise(route)]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return []


def describe(cycle: list[Edge], root: Path) -> str:
    """``a -> b -> a`` and, indented, where each import is."""
    names = " -> ".join([edge.source for edge in cycle] + [cycle[0].source])
    lines = [f"  {edge.source} -> {edge.target}  ({edge.where(root)})" for edge in cycle]
    return "\n".join([names, *lines])


def import_cycles(mapping: dict[str, Path]) -> list[list[Edge]]:
    return cycles(Resolver(find_sources(mapping)).edges())


# -- tests -------------------------------------------------------------------------------------


def test_the_package_has_no_import_cycles():
    mapping = package_dirs(ROOT / "pyproject.toml")
    sources = find_sources(mapping)
    assert "influencekit.store.reader" in sources and "influencekit.widgets.explorer" in sources
    found = import_cycles(mapping)
    report = "\n\n".join(describe(cycle, ROOT) for cycle in found)
    assert not found, f"{len(found)} import cycle(s) among the package's modules:\n\n{report}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_planted_cycle_is_found_through_facades_and_function_level_imports(tmp_path):
    """A toy package in two folders (mapped like ours): ``toy.a`` imports ``helper`` from the
    ``toy.sub`` facade inside a function; ``toy.sub.b`` (which defines it) imports ``A`` from
    the ``toy`` facade, which re-exports it from ``toy.a``: a cycle. A ``TYPE_CHECKING``-only
    import back from ``toy.c`` and imports of outside packages are not edges."""
    _write(
        tmp_path,
        {
            "core/__init__.py": "from .a import A\n__version__ = '1'\n",
            "core/a.py": (
                "import os\n\n\nclass A:\n    def run(self):\n"
                "        from toy.sub import helper\n        return helper()\n"
            ),
            "core/c.py": (
                "from typing import TYPE_CHECKING\n\nfrom . import a\n\n"
                "if TYPE_CHECKING:\n    from .sub.b import helper\n"
            ),
            "core/data/readme.py": "import toy.a\n",  # not a package: no __init__.py
            "subdir/__init__.py": "from .b import helper as helper\n",
            "subdir/b.py": (
                "try:\n    from .. import A\nexcept ImportError:\n    A = None\n\n\n"
                "def helper():\n    return A\n"
            ),
        },
    )
    mapping = {"toy": tmp_path / "core", "toy.sub": tmp_path / "subdir"}
    sources = find_sources(mapping)
    assert sorted(sources) == ["toy", "toy.a", "toy.c", "toy.sub", "toy.sub.b"]
    edges = {(edge.source, edge.target): edge for edge in Resolver(sources).edges()}
    assert sorted(edges) == [("toy.a", "toy.sub.b"), ("toy.c", "toy.a"), ("toy.sub.b", "toy.a")]
    assert edges["toy.a", "toy.sub.b"].line == 6 and edges["toy.sub.b", "toy.a"].line == 2

    (cycle,) = import_cycles(mapping)
    text = describe(cycle, tmp_path)
    assert text.splitlines()[0] == "toy.a -> toy.sub.b -> toy.a"
    assert "(core/a.py:6)" in text and "(subdir/b.py:2)" in text


def test_resolver_follows_whole_package_imports_and_names_defined_in_the_init(tmp_path):
    _write(
        tmp_path,
        {
            "p/__init__.py": "from . import x\nVERSION = 1\n\n\ndef __getattr__(n):\n"
            "    from . import y\n    return y\n",
            "p/x.py": "",
            "p/y.py": "from p import z\n",
            "p/z.py": "import p\nfrom p import VERSION, y\n",
        },
    )
    sources = find_sources({"p": tmp_path / "p"})
    edges = sorted((edge.source, edge.target) for edge in Resolver(sources).edges())
    # `import p` and `from p import VERSION` run p's __init__, which imports p.x at once; its
    # __getattr__ imports p.y only when asked, which `from p import y` finds as a submodule.
    assert edges == [("p.y", "p.z"), ("p.z", "p.x"), ("p.z", "p.y")]
    (cycle,) = import_cycles({"p": tmp_path / "p"})
    assert describe(cycle, tmp_path).splitlines()[0] == "p.y -> p.z -> p.y"


def test_widgets_and_validate_are_attributes_of_the_package():
    import influencekit as ik

    assert ik.widgets.InfluenceExplorer.__name__ == "InfluenceExplorer"
    assert ik.validate.__name__ == "influencekit.validate"


def test_importing_the_package_does_not_import_ipywidgets():
    code = "import influencekit, sys; print('ipywidgets' in sys.modules)"
    env = {**os.environ, "INFLUENCEKIT_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
