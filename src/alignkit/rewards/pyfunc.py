"""Reward functions written in Python: alignkit's ``python:`` kind and TRL's reward functions (``trl:``).

Both kinds call a user function with keyword arguments and take one number per completion back:

* ``python:MODULE:FN`` or ``python:path/to/file.py:FN`` (alignkit's contract):
  ``fn(prompts, completions, **row_fields, **options)``: ``completions`` are the response strings,
  ``row_fields`` the data rows transposed to lists (field -> one value per completion; ``None`` where a
  row lacks the field), ``options`` the spec's options as constant keyword arguments.
* ``trl:MODULE:FN`` / ``trl:MODULE.FN`` (TRL's contract, what ``reward_funcs`` in a TRL config or a
  callable in the Python API become): ``fn(prompts=..., completions=..., completion_ids=...,
  trainer_state=..., **every_dataset_column)``. For conversational prompts (message lists) each
  completion is a message list ``[{"role": "assistant", "content": text}]``, as TRL passes it, so
  ``completion[0]["content"]`` works; ``completion_ids`` are the sampled token ids (EOS included when the
  response ended); ``trainer_state`` is a ``transformers.TrainerState`` with ``global_step`` and
  ``max_steps``. The function may return ``None`` for a completion it does not apply to: that entry is
  left out of the total (the other functions' weighted sum remains, 0 if none applies) and of the
  component's mean and std.

Both kinds offer every argument by keyword and pass those the function accepts (all of them when it
takes ``**kwargs``; under ``python:``, ``completion_ids`` and ``trainer_state`` only when the function
names them, so its ``**row_fields`` stay the row fields), so TRL's ``def reward_len(completions, **kwargs)`` works under ``python:`` too
(with string completions), and alignkit's ``def fn(prompts, completions, answer, **kw)`` under ``trl:``.
A function that names none of the reward arguments gets prompts and completions positionally in its
first two parameters (alignkit's older contract, ``fn(p, c, **kw)``). :meth:`PythonReward.check_inputs` checks the signature against the
data's columns before the model loads: a required parameter that no argument fills is one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from alignkit.rewards.base import (CALLABLES, RewardError, RewardSpec, callable_name, check_scores,
                                   register_reward_kind, require_arg)

#: arguments every reward function may name besides the dataset's columns
TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")


def load_callable(ref: str) -> Callable:
    """Resolve ``module:function``, ``path/to/file.py:function`` (function may be dotted) or TRL's
    ``module.function``; a callable handed over by the Python API is found by its recorded reference."""
    if ref in CALLABLES:
        return CALLABLES[ref]
    target, sep, attr = ref.rpartition(":")  # rpartition: a Windows drive "C:" stays in the path
    target, attr = target.strip(), attr.strip()
    if not sep and "." in ref and "/" not in ref and not ref.endswith(".py"):  # TRL's module.function
        target, _, attr = ref.strip().rpartition(".")
        sep = ":"
    if not sep or not target or not attr:
        raise ValueError(f"reward function {ref!r}: expected 'module:function', 'module.function' or "
                         "'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function {ref!r}: file {str(path)!r} not found")
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
            raise ImportError(f"reward function {ref!r}: cannot import module {target!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {ref!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {ref!r}: {attr!r} is not callable")
    return obj


def transpose_rows(rows: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """``[{"a": 1}, {"a": 2, "b": 3}]`` -> ``{"a": [1, 2], "b": [None, 3]}`` (key order kept)."""
    keys: Dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


class _Signature:
    """How to call a function: which keywords it takes, whether prompts/completions go positionally."""

    def __init__(self, fn: Callable):
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: offer everything
            params = []
            self.var_kw, self.names, self.positional, self.required, self.bad = True, set(), False, [], None
            return
        P = inspect.Parameter
        self.var_kw = any(p.kind is P.VAR_KEYWORD for p in params)
        var_pos = any(p.kind is P.VAR_POSITIONAL for p in params)
        pos = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        named = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        # alignkit's older contract: fn(p, c, ...) with other names for the first two parameters
        self.positional = not (named & set(TRL_ARGS)) and (len(pos) >= 2 or var_pos)
        first = {p.name for p in pos[:2]} if self.positional else set()
        self.names = named - first
        self.required = [p.name for p in params if p.default is P.empty and p.name not in first
                         and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
        only = [p.name for p in params if p.kind is P.POSITIONAL_ONLY and p.name not in first]
        self.bad = (f"positional-only parameter(s) {only} cannot be passed by name" if only else
                    None if (self.positional or named & set(TRL_ARGS) or self.var_kw) else
                    "it takes none of prompts, completions, completion_ids, trainer_state, nor two positional "
                    "parameters (prompts, completions)")

    def accepts(self, name: str) -> bool:
        return self.var_kw or name in self.names


class PythonReward:
    """A user reward function called with TRL's keywords or alignkit's (see the module docstring).

    ``contract``: ``"alignkit"`` (``python:``; completions are strings) or ``"trl"`` (completions are
    message lists for conversational prompts). Call it as ``reward(prompts, completions, rows,
    completion_ids=..., trainer_state=...)``; it returns one float per completion (NaN for ``None``)."""

    #: the composite reward passes completion_ids and trainer_state, and runs it under rewards.timeout_s
    extra_inputs = True
    user_code = True

    def __init__(self, ref: str, fn: Callable, options: Optional[Dict[str, Any]] = None, name: str = "python",
                 contract: str = "alignkit"):
        self.name, self.ref, self.fn, self.options, self.contract = name, ref, fn, dict(options or {}), contract
        for reserved in TRL_ARGS:
            if reserved in self.options:
                raise ValueError(f"reward function {ref!r}: option {reserved!r} clashes with the argument of that name")
        self.sig = _Signature(fn)

    def describe(self) -> str:
        return f"reward function {self.ref!r}"

    def check_inputs(self, columns: Iterable[str]) -> None:
        """Raise :class:`RewardError` (one line) when the function cannot be called with this data: a
        required parameter that is neither a reward argument, an option nor a data column."""
        columns = set(columns)
        if self.sig.bad:
            raise RewardError(f"{self.describe()} fits neither TRL's reward signature fn(prompts, completions, "
                              f"completion_ids, **kwargs) nor alignkit's fn(prompts, completions, **row_fields): "
                              f"{self.sig.bad}")
        supplied = set(TRL_ARGS) | set(self.options) | columns
        missing = [p for p in self.sig.required if p not in supplied]
        if missing:
            cols = ", ".join(sorted(columns)) or "none besides the prompt"
            raise RewardError(f"{self.describe()} needs argument(s) {missing}, which are neither reward arguments "
                              f"({', '.join(TRL_ARGS)}), options nor columns of the data (columns: {cols})")

    def __call__(self, prompts, completions, rows=None, *, completion_ids=None, trainer_state=None) -> List[float]:
        n = len(completions)
        rows = [{} for _ in range(n)] if rows is None else rows
        if len(rows) != n:
            raise ValueError(f"{self.describe()}: got {len(rows)} rows for {n} completions")
        fields = transpose_rows(rows)
        clash = sorted((set(fields) & set(self.options)) | (set(fields) & set(TRL_ARGS)))
        if clash:
            raise ValueError(f"{self.describe()}: row fields {clash} clash with options or the reward arguments; "
                             f"rename them")
        prompts, completions = list(prompts), list(completions)
        if self.contract == "trl":
            completions = [[{"role": "assistant", "content": c}] if is_conversational(p) else c
                           for p, c in zip(prompts, completions)]
        extra = {"completion_ids": completion_ids, "trainer_state": trainer_state}
        if self.contract == "alignkit":  # **row_fields stays just the rows (and options), as before
            extra = {k: v for k, v in extra.items() if k in self.sig.names}
        offered = {**extra, **fields, **self.options}
        kwargs = {k: v for k, v in offered.items() if self.sig.accepts(k)}
        if self.sig.positional:
            out = self.fn(prompts, completions, **kwargs)
        else:
            kwargs.update({k: v for k, v in (("prompts", prompts), ("completions", completions))
                           if self.sig.accepts(k)})
            out = self.fn(**kwargs)
        return check_scores(self.describe(), out, n, allow_none=True)

    def __repr__(self) -> str:
        return f"PythonReward({self.ref!r}, contract={self.contract!r})"


def where_raised(e: BaseException, fn: Optional[Callable] = None) -> str:
    """``file.py:LINE`` where ``e`` was raised: the innermost frame in ``fn``'s own file (the user's line,
    not the library it called), else the innermost frame ('' without a traceback)."""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else []
    own = getattr(getattr(fn, "__code__", None), "co_filename", None)
    mine = [f for f in tb if own is not None and f.filename == own]
    frame = (mine or tb or [None])[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame is not None else ""


@register_reward_kind("python", syntax="python:MODULE:FN | python:FILE.py:FN")
def build_python(spec: RewardSpec) -> PythonReward:
    """fn(prompts, completions, **row_fields, **options) -> list[float] (completions as strings)."""
    ref = require_arg(spec, "module:function or path/to/file.py:function")
    fn = load_callable(ref)
    return PythonReward(ref, fn, spec.options, name=callable_name(fn), contract="alignkit")


@register_reward_kind("trl", syntax="trl:MODULE:FN | trl:MODULE.FN")
def build_trl(spec: RewardSpec) -> PythonReward:
    """TRL reward function: fn(prompts=, completions=, completion_ids=, trainer_state=, **columns)."""
    ref = require_arg(spec, "module:function, module.function or path/to/file.py:function")
    fn = load_callable(ref)
    return PythonReward(ref, fn, spec.options, name=callable_name(fn), contract="trl")
