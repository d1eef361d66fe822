"""The package's one-way arrows, checked on the source (``ast``), never by importing anything.

``commands -> daemon -> {detectors, streams}``: detectors and streams never import daemon or commands, nor
each other; streams never imports torch; no import cycle among inspectd modules. Imports inside functions
count (a lazy import is still an arrow). Only for the cycle check are imports under ``if TYPE_CHECKING:``
left out (they never run, so they cannot close a cycle at import time); the layering checks count them too.
What is not seen: modules found at run time by name (``pkgutil.iter_modules`` + ``importlib.import_module``
on an f-string), and the implicit import of parent packages' ``__init__`` (today none of them imports anything).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "inspectd"

# (importer package, imported package): importing the second from the first breaks the layering
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("inspectd.detectors", "inspectd.daemon"),
    ("inspectd.detectors", "inspectd.commands"),
    ("inspectd.streams", "inspectd.daemon"),
    ("inspectd.streams", "inspectd.commands"),
    ("inspectd.detectors", "inspectd.streams"),
    ("inspectd.streams", "inspectd.detectors"),
    ("inspectd.streams", "torch"),
)
# Known violations kept on purpose, each as (importer module, imported module) with the reason. Empty today:
# every rule above holds; add an edge here only with a comment saying why and what will remove it.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Edge:
    importer: str
    target: str  # a module (inspectd.x.y) or an external top-level-qualified name (torch, torch.nn, ...)
    lineno: int
    type_checking: bool  # only under ``if TYPE_CHECKING:``


# ------------------------------------------------------------------------------------------------ the checker
def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    """(dotted module name, is_package) of a file under ``root`` (the ``inspectd`` directory)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(source: str, module: str, is_package: bool = False, known: Iterable[str] = ()) -> list[Edge]:
    """Every import written in ``source`` (the text of ``module``), at any depth, with TYPE_CHECKING marked.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a known module, else to ``pkg``.
    ``importlib.import_module("literal")`` counts as an import too.
    """
    known = set(known)
    tree = ast.parse(source, filename=module)
    edges: list[Edge] = []

    def add(target: str, node: ast.AST, tc: bool) -> None:
        if target:
            edges.append(Edge(module, target, getattr(node, "lineno", 0), tc))

    def visit(node: ast.AST, tc: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, tc)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, tc)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                add(sub if sub in known else base, node, tc)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            add(node.args[0].value, node, tc)
        for child in ast.iter_child_nodes(node):
            visit(child, tc)

    visit(tree, False)
    return edges


def scan(root: Path = ROOT) -> dict[str, list[Edge]]:
    """Module name -> its import edges, for every ``.py`` file under ``root``."""
    files = {path: module_name(path, root) for path in sorted(root.rglob("*.py"))}
    known = {name for name, _ in files.values()}
    return {name: imports_of(path.read_text(encoding="utf-8"), name, is_package, known)
            for path, (name, is_package) in files.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layering_violations(graph: dict[str, list[Edge]], forbidden: Iterable[tuple[str, str]] = FORBIDDEN,
                        allowed: Iterable[tuple[str, str]] = ALLOWED) -> list[str]:
    """One line per import that crosses a forbidden arrow and is not in ``allowed``."""
    allowed = set(allowed)
    out = []
    for module, edges in sorted(graph.items()):
        for edge in edges:
            for src, dst in forbidden:
                if _within(module, src) and _within(edge.target, dst) and (module, edge.target) not in allowed:
                    where = " (under TYPE_CHECKING)" if edge.type_checking else ""
                    out.append(f"{module}:{edge.lineno} imports {edge.target}{where}: {src} must not import {dst}")
    return out


def internal_graph(graph: dict[str, list[Edge]], include_type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the inspectd modules it imports (runtime imports only unless told otherwise)."""
    return {module: {e.target for e in edges if e.target in graph and e.target != module
                     and (include_type_checking or not e.type_checking)}
            for module, edges in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def _describe(cycles: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for component in cycles:
        members = set(component)
        arrows = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append("cycle: " + "; ".join(arrows))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the repo
@pytest.fixture(scope="module")
def repo_graph() -> dict[str, list[Edge]]:
    graph = scan()
    assert "inspectd.detectors.winclip" in graph and "inspectd.streams.schema" in graph  # the scan saw the tree
    return graph


def test_layers_point_one_way(repo_graph: dict[str, list[Edge]]) -> None:
    violations = layering_violations(repo_graph)
    assert not violations, "\n".join(violations)


def test_allow_list_has_no_stale_entries(repo_graph: dict[str, list[Edge]]) -> None:
    present = {(m, e.target) for m, edges in repo_graph.items() for e in edges}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"ALLOWED lists edges the code no longer has (remove them): {stale}"


def test_no_import_cycles(repo_graph: dict[str, list[Edge]]) -> None:
    graph = internal_graph(repo_graph)
    cycles = find_cycles(graph)
    assert not cycles, _describe(cycles, graph)


# ------------------------------------------------------------------------------------------------ the checker can fail
KNOWN = {"inspectd", "inspectd.daemon", "inspectd.daemon.app", "inspectd.daemon.http", "inspectd.commands",
         "inspectd.commands.run", "inspectd.detectors", "inspectd.detectors.winclip", "inspectd.detectors.base",
         "inspectd.streams", "inspectd.streams.codec", "inspectd.streams.schema"}


PACKAGES = {"inspectd", "inspectd.daemon", "inspectd.commands", "inspectd.detectors", "inspectd.streams"}


def _graph(sources: dict[str, str]) -> dict[str, list[Edge]]:
    """A synthetic import graph from module sources (none of these modules need exist)."""
    known = KNOWN | set(sources)
    return {name: imports_of(text, name, name in PACKAGES, known) for name, text in sources.items()}


@pytest.mark.parametrize(("module", "source", "rule"), [
    ("inspectd.detectors.winclip", "from inspectd.daemon.app import InspectDaemon\n",
     "inspectd.detectors must not import inspectd.daemon"),
    ("inspectd.detectors.winclip", "def f():\n    import inspectd.commands.run\n",
     "inspectd.detectors must not import inspectd.commands"),
    ("inspectd.streams.codec", "from ..daemon import http\n", "inspectd.streams must not import inspectd.daemon"),
    ("inspectd.streams.codec", "from inspectd.commands import run\n",
     "inspectd.streams must not import inspectd.commands"),
    ("inspectd.detectors.winclip", "from inspectd.streams.schema import Frame\n",
     "inspectd.detectors must not import inspectd.streams"),
    ("inspectd.streams.codec", "from ..detectors import base\n",
     "inspectd.streams must not import inspectd.detectors"),
    ("inspectd.streams.codec", "def decode():\n    import torch.nn.functional as F\n",
     "inspectd.streams must not import torch"),
    ("inspectd.streams.codec", "from torch import Tensor\n", "inspectd.streams must not import torch"),
    ("inspectd.streams.codec", "import importlib\nm = importlib.import_module('torch')\n",
     "inspectd.streams must not import torch"),
    ("inspectd.streams.codec", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
     "inspectd.streams must not import torch"),
])
def test_layering_check_reports_a_violation(module: str, source: str, rule: str) -> None:
    violations = layering_violations(_graph({module: source}))
    assert len(violations) == 1 and violations[0].startswith(module) and violations[0].endswith(rule), violations
    # an explicit allow-list entry silences exactly that edge
    edge = _graph({module: source})[module][-1]
    assert layering_violations(_graph({module: source}), allowed={(module, edge.target)}) == []


def test_layering_check_accepts_the_allowed_arrows() -> None:
    graph = _graph({
        "inspectd.daemon.app": "from inspectd.detectors.base import X\nfrom inspectd.streams import codec\n",
        "inspectd.commands.run": "from inspectd.daemon.app import InspectDaemon\nimport torch\n",
        "inspectd.detectors.winclip": "import torch\nfrom . import base\nfrom inspectd.streamsx import y\n",
        "inspectd.streams.codec": "import numpy\nfrom .schema import Frame\nimport torchvision_like\n",
    })
    assert layering_violations(graph) == []


def test_relative_imports_resolve() -> None:
    edges = imports_of("from . import base\nfrom .. import streams\nfrom ..streams.schema import F\n",
                       "inspectd.detectors.winclip", False, KNOWN)
    assert [e.target for e in edges] == ["inspectd.detectors.base", "inspectd.streams", "inspectd.streams.schema"]
    edges = imports_of("from . import winclip\n", "inspectd.detectors", True, KNOWN)
    assert [e.target for e in edges] == ["inspectd.detectors.winclip"]


def test_cycle_check_reports_a_cycle_even_through_a_function_level_import() -> None:
    graph = internal_graph(_graph({
        "inspectd.daemon.http": "def build():\n    from inspectd.daemon.app import X\n",
        "inspectd.daemon.app": "from inspectd.detectors import base\n",
        "inspectd.detectors.base": "from ..daemon.http import build\n",
        "inspectd.streams.codec": "from . import schema\n",
        "inspectd.streams.schema": "",
    }))
    cycles = find_cycles(graph)
    assert cycles == [["inspectd.daemon.app", "inspectd.daemon.http", "inspectd.detectors.base"]]
    assert "inspectd.daemon.http -> inspectd.daemon.app" in _describe(cycles, graph)


def test_cycle_check_leaves_out_type_checking_imports_and_accepts_a_dag() -> None:
    sources = {
        "inspectd.daemon.http": "from inspectd.daemon import app\n",
        "inspectd.daemon.app": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from inspectd.daemon.http import X\nelse:\n    pass\n",
    }
    assert find_cycles(internal_graph(_graph(sources))) == []
    assert find_cycles(internal_graph(_graph(sources), include_type_checking=True)) == [
        ["inspectd.daemon.app", "inspectd.daemon.http"]]
    # the else branch of ``if TYPE_CHECKING`` runs, so it counts
    sources["inspectd.daemon.app"] = ("import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n"
                                      "    from inspectd.daemon import http\n")
    assert find_cycles(internal_graph(_graph(sources))) == [["inspectd.daemon.app", "inspectd.daemon.http"]]
