"""The ``python`` reward kind: any user callable.

``python:my.module:fn`` or ``python:path/to/file.py:fn``. The function is called as
``fn(prompts, completions, **row_fields, **options)`` where ``row_fields`` are the rows transposed
to lists (field -> one value per completion; ``None`` where a row lacks the field) and
``options`` are the spec's options passed as constant keyword arguments. It must return one finite
number per completion. Accept ``**kwargs`` so new row fields don't break the function.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from alignkit.rewards.base import RewardSpec, check_scores, register_reward_kind, require_arg


def load_callable(ref: str) -> Callable:
    """Resolve ``module:function`` or ``path/to/file.py:function`` (function may be dotted)."""
    target, sep, attr = ref.rpartition(":")  # rpartition: a Windows drive "C:" stays in the path
    target, attr = target.strip(), attr.strip()
    if not sep or not target or not attr:
        raise ValueError(f"python reward {ref!r}: expected 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"python reward {ref!r}: file {str(path)!r} not found")
        modname = "_alignkit_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(modname)
        if module is None:
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module  # so pickling / dataclasses inside the file work
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[modname]
                raise
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ImportError(f"python reward {ref!r}: cannot import module {target!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"python reward {ref!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"python reward {ref!r}: {attr!r} is not callable")
    return obj


def transpose_rows(rows: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """``[{"a": 1}, {"a": 2, "b": 3}]`` -> ``{"a": [1, 2], "b": [None, 3]}`` (key order kept)."""
    keys: Dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


class PythonReward:
    """A user callable ``fn(prompts, completions, **row_fields, **options) -> list[float]``."""

    def __init__(self, ref: str, fn: Callable, options: Optional[Dict[str, Any]] = None, name: str = "python"):
        self.name, self.ref, self.fn, self.options = name, ref, fn, dict(options or {})
        for reserved in ("prompts", "completions"):
            if reserved in self.options:
                raise ValueError(f"python reward {ref!r}: option {reserved!r} clashes with the positional argument")

    def __call__(self, prompts, completions, rows=None) -> List[float]:
        n = len(completions)
        rows = [{} for _ in range(n)] if rows is None else rows
        if len(rows) != n:
            raise ValueError(f"python reward {self.ref!r}: got {len(rows)} rows for {n} completions")
        fields = transpose_rows(rows)
        clash = sorted((set(fields) & set(self.options)) | (set(fields) & {"prompts", "completions"}))
        if clash:
            raise ValueError(f"python reward {self.ref!r}: row fields {clash} clash with options or "
                             f"the positional arguments; rename them")
        out = self.fn(list(prompts), list(completions), **fields, **self.options)
        return check_scores(f"python reward function {self.ref!r}", out, n)

    def __repr__(self) -> str:
        return f"PythonReward({self.ref!r})"


@register_reward_kind("python", syntax="python:MODULE:FN | python:FILE.py:FN")
def build_python(spec: RewardSpec) -> PythonReward:
    """fn(prompts, completions, **row_fields, **options) -> list[float]."""
    ref = require_arg(spec, "module:function or path/to/file.py:function")
    return PythonReward(ref, load_callable(ref), spec.options)
