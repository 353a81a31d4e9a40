"""The package's module-level import graph has no cycle, and every module imports on its own.

The graph is read from the source with ``ast``: each module's top-level ``import`` / ``from ... import``
statements (also inside top-level ``if`` / ``try`` / ``with`` blocks), without those under
``if TYPE_CHECKING:`` and without imports inside functions or classes (they run later, at call time).
An edge goes to the module an import statement names: ``from alignkit.x import y`` points at
``alignkit.x.y`` when that is a module, else at ``alignkit.x``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import alignkit

SRC = Path(alignkit.__file__).resolve().parent.parent
# importing ``alignkit.__main__`` runs the CLI; it is ``python -m alignkit``, not a library module
NOT_IMPORTABLE = {"alignkit.__main__"}


def modules() -> Dict[str, Path]:
    out = {}
    for p in sorted((SRC / "alignkit").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def top_level_imports(tree: ast.Module) -> List[ast.stmt]:
    found: List[ast.stmt] = []

    def walk(body):
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found.append(n)
            elif isinstance(n, ast.If):
                if not _type_checking(n):
                    walk(n.body)
                walk(n.orelse)
            elif isinstance(n, ast.Try):
                walk(n.body)
                for h in n.handlers:
                    walk(h.body)
                walk(n.orelse)
                walk(n.finalbody)
            elif isinstance(n, ast.With):
                walk(n.body)

    walk(tree.body)
    return found


def import_graph(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: Set[str] = set()
        for node in top_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:  # relative: from . import x / from ..y import z
                    base = package[:len(package) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:  # the innermost module of ours that the name lies in
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle_and_reads_imports():
    # the checker itself: a hand-made graph with one 3-cycle and a tail, and a parsed module
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import json\n"
                     "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
                     "def f():\n    import re\n")
    names = [a.name for n in top_level_imports(tree) for a in n.names]
    assert names == ["os", "TYPE_CHECKING", "yaml"]


def test_module_level_import_graph_has_no_cycle():
    mods = modules()
    assert len(mods) > 100 and "alignkit.pipeline" in mods
    graph = import_graph(mods)
    # known edges are found (a sanity check that the parser follows the package's import styles)
    assert "alignkit.rollout.generate" in graph["alignkit.rollout.sampling"]
    assert cycles(graph) == [], "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles(graph))


def test_every_module_imports_in_a_fresh_interpreter():
    """``python -c "import alignkit.X"`` for every module X. One subprocess keeps it fast: before each
    module it drops every ``alignkit`` module from ``sys.modules``, so each import starts from nothing of
    ours (third-party packages such as torch stay loaded; they are not what could break the order)."""
    names = [m for m in modules() if m not in NOT_IMPORTABLE]
    script = (
        "import importlib, sys, traceback\n"
        "bad = []\n"
        f"for m in {names!r}:\n"
        "    for k in [k for k in sys.modules if k == 'alignkit' or k.startswith('alignkit.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
