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


# third-party packages slow enough to import (or optional) that an import inside a function may defer them
HEAVY_PACKAGES = {"torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "huggingface_hub",
                  "numpy", "pydantic", "starlette", "uvicorn", "sqlalchemy", "vllm", "liger_kernel", "deepspeed",
                  "flash_attn", "bitsandbytes", "trl"}


def in_function_imports(tree: ast.Module):
    """(import node, names it imports) for every import statement inside a function body."""
    found = []

    def walk(node, in_fn):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_fn:
                found.append(child)
            walk(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return found


def deferred_reason(lines: List[str], node: ast.stmt) -> bool:
    """A ``# deferred: <reason>`` comment on the import's own lines, or above it: on the comment lines
    and import statements directly above (a group of deferred imports shares one comment)."""
    if any("# deferred:" in lines[i] for i in range(node.lineno - 1, node.end_lineno)):
        return True
    indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
    i = node.lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if not text or len(lines[i]) - len(lines[i].lstrip()) < indent:
            return False
        if "# deferred:" in text:
            return True
        if not (text.startswith(("#", "from ", "import ")) or len(lines[i]) - len(lines[i].lstrip()) > indent):
            return False
        i -= 1
    return False


def undeferred_imports(mods: Dict[str, Path]) -> List[str]:
    bad = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in in_function_imports(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            else:
                tops = {"alignkit"} if node.level else {(node.module or "").split(".")[0]}
            if tops & ({"alignkit"} | HEAVY_PACKAGES) and not deferred_reason(lines, node):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_deferred_comment_finder():
    tree_text = ("import os\n"
                 "def f():\n    # deferred: import cycle\n    from alignkit import a\n    from alignkit import b\n\n"
                 "    x = 1\n    import torch\n"
                 "def g():\n    import json\n    from . import c  # deferred: CLI start-up\n    import numpy as np\n")
    tree = ast.parse(tree_text)
    lines = tree_text.splitlines()
    nodes = in_function_imports(tree)
    assert [ast.unparse(n) for n in nodes] == ["from alignkit import a", "from alignkit import b", "import torch",
                                               "import json", "from . import c", "import numpy as np"]
    assert [deferred_reason(lines, n) for n in nodes] == [True, True, False, False, True, True]


def test_every_import_inside_a_function_says_why():
    """An import inside a function is allowed only to defer something, and says what: a heavy or
    optional package, the CLI's start-up, or a true cycle. Every other import is at module level."""
    bad = undeferred_imports(modules())
    assert not bad, "imports inside functions without a '# deferred: <reason>' comment:\n" + "\n".join(bad)


# The layers, bottom up (docs/architecture.md, "Layers and imports"): a module's module-level imports
# stay on its own layer or below. Every module of data/, models/, ops/, losses/, rewards/ and rollout/ is on
# layer 3 unless named; commands/* on layer 6; any other module not named here on layer 5 (the methods,
# evaluation, annotation).
LAYERS = {
    1: {"hardware", "runtime", "refusals", "train.metric_keys", "train.disk", "train.logging", "eval.style",
        "eval.stats", "eval.markers", "ops.masked"},
    2: {"config", "aliases", "command", "commands"},
    3: {"train", "train.rundir", "train.checkpoint", "hub", "eval.metrics"},
    4: {"api", "eval", "eval.diagnostics", "stages", "train.loop", "train.optim", "train.preempt", "train.reference"},
    5: {"rollout.sampling"},  # bon / rejection-sampling: a method that lives in rollout/
    6: {"pipeline", "demo", "cli", "__main__", "redteam.repair"},
}
LAYER_3_PACKAGES = {"data", "models", "ops", "losses", "rewards", "rollout"}
# exceptions: the reward kinds that live with their method register themselves through rewards/__init__
# (judge:, redteam:), so that every reward consumer sees them
UPWARD_OK = {("alignkit.rewards", "alignkit.feedback"), ("alignkit.rewards", "alignkit.feedback.judge_reward"),
             ("alignkit.rewards", "alignkit.redteam"), ("alignkit.rewards", "alignkit.redteam.reward")}


def layer(module: str) -> int:
    if module == "alignkit":
        return 0
    name = module[len("alignkit."):]
    for n, names in LAYERS.items():
        if name in names:
            return n
    if name.startswith("commands."):
        return 6
    return 3 if name.split(".")[0] in LAYER_3_PACKAGES else 5


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in sorted(graph.items())
            for d in sorted(deps) if layer(d) > layer(m) and (m, d) not in UPWARD_OK]


def test_imports_point_down_the_layers():
    assert [layer(f"alignkit.{m}") for m in ("train.disk", "config", "data.load", "rollout.sampling", "stages",
                                             "feedback.spin", "commands.core", "cli")] == [1, 2, 3, 5, 4, 5, 6, 6]
    made_up = {"alignkit.data.load": {"alignkit.train.loop", "alignkit.config"},
               "alignkit.rewards": {"alignkit.feedback"}}
    assert upward_imports(made_up) == ["alignkit.data.load (layer 3) imports alignkit.train.loop (layer 4)"]
    up = upward_imports(import_graph(modules()))
    assert not up, "imports that point up:\n" + "\n".join(up)
