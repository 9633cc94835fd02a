"""The import graph of src/resnetlab: no circles, and layers that import only downward (docs/architecture.md).

Every module is parsed with ``ast``; module-level and function-level imports alike become edges (a function-level
import is a circle deferred to run time, not removed). Importing an enclosing package (``from resnetlab import
__version__``) is not an edge: a package's ``__init__`` runs before any of its modules anyway.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "resnetlab"

# Layers from the bottom up; a module may import its own layer's modules (without a circle) and lower layers'.
LAYERS = [
    ("base", ("resnetlab.fileio", "resnetlab.data", "resnetlab.models")),
    ("training", ("resnetlab.training",)),
    ("applications", ("resnetlab.deploy", "resnetlab.explain", "resnetlab.report")),
    ("api", ("resnetlab.api", "resnetlab.experiments", "resnetlab.demo")),
    ("cli", ("resnetlab.cli", "resnetlab.__main__")),
]


def _modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in (src / PACKAGE).rglob("*.py"):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


@functools.lru_cache(maxsize=4)
def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """``module -> modules it imports`` (inside the package), relative imports resolved. (Cached: callers must
    not change the result.)"""
    mods = _modules(src)

    def resolve(name: str) -> str | None:  # the module named, or the nearest enclosing one that exists
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]  # `from pkg import module` too
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != mod and not (mods[r][1] and mod.startswith(r + ".")):
                    graph[mod].add(r)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    circles.append(sorted(comp))
    return circles


def layer_of(module: str) -> int | None:
    for level, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None  # the package itself


def test_the_checker_finds_a_circle_and_a_function_level_import(tmp_path):
    """The walk must see what it is meant to catch: a circle closed by an import inside a function, written as a
    relative import."""
    pkg = tmp_path / PACKAGE / "data"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from resnetlab.data.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["resnetlab.data.b"] == {"resnetlab.data.a"}
    assert graph["resnetlab.data.c"] == {"resnetlab.data.a"}  # `from . import a`: the module, not the package
    assert import_circles(graph) == [["resnetlab.data.a", "resnetlab.data.b"]]


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    circles = import_circles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_layers_import_only_downward():
    """data/ and models/ import no training, deploy, explain, report, api or cli; training/ none of
    deploy/explain/report/api/cli; deploy/explain/report not api or cli."""
    wrong = []
    for mod, targets in import_graph().items():
        level = layer_of(mod)
        for t in sorted(targets):
            up = layer_of(t)
            if level is not None and up is not None and up > level:
                wrong.append(f"{mod} ({LAYERS[level][0]}) imports {t} ({LAYERS[up][0]})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["resnetlab.fileio"])
def test_the_lowest_modules_import_nothing_of_resnetlab(module):
    assert import_graph()[module] == set()
