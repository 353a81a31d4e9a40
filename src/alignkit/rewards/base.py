"""Reward sources: the protocol, the spec (CLI shorthand and YAML form) and the kind registry.

A reward source is any object with a ``name`` and
``__call__(prompts, completions, rows) -> list[float]``: ``prompts`` as given to the policy
(strings or chat messages), ``completions`` the decoded response texts (without the prompt),
``rows`` one dict of extra prompt-row fields per completion (e.g. a reference answer).
All three have the same length ``N`` and the result is ``N`` finite floats.

Kinds are registered once with :func:`register_reward_kind`; the CLI help, the spec validation
and the error messages all read :data:`REWARD_KINDS`, so a kind's name lives in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence,
                    runtime_checkable)

from pydantic import BaseModel, ConfigDict, Field, field_validator


@runtime_checkable
class RewardSource(Protocol):
    """What online RL and best-of-N call: N prompts/completions/rows in, N finite floats out."""

    name: str

    def __call__(self, prompts: List[Any], completions: List[str],
                 rows: List[Dict[str, Any]]) -> List[float]: ...


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class RewardKind:
    """A registry entry: the builder plus the shorthand syntax and a one-line doc (for CLI help)."""

    name: str
    builder: Callable[["RewardSpec"], RewardSource]
    syntax: str
    doc: str


class RewardKinds(Mapping[str, Callable[["RewardSpec"], RewardSource]]):
    """Kind name -> builder(spec) -> :class:`RewardSource`, filled by :meth:`register`."""

    def __init__(self) -> None:
        self._kinds: Dict[str, RewardKind] = {}

    def register(self, name: str, *, syntax: str = ""):
        """Decorator registering ``builder(spec) -> RewardSource`` under ``name``."""

        def deco(builder):
            if name in self._kinds:
                raise ValueError(f"reward kind {name!r} registered twice")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._kinds[name] = RewardKind(name, builder, syntax or f"{name}:ARG", doc[0] if doc else "")
            return builder

        return deco

    def __getitem__(self, name: str):
        return self._kinds[name].builder

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._kinds))

    def __len__(self) -> int:
        return len(self._kinds)

    def names(self) -> List[str]:
        return sorted(self._kinds)

    def entry(self, name: str) -> RewardKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise ValueError(unknown_kind_message(name)) from None

    def describe(self) -> str:
        """One line per kind: shorthand syntax and doc (CLI help text)."""
        width = max((len(k.syntax) for k in self._kinds.values()), default=0)
        return "\n".join(f"  {k.syntax:<{width}}  {k.doc}" for _, k in sorted(self._kinds.items()))


REWARD_KINDS = RewardKinds()
register_reward_kind = REWARD_KINDS.register


def unknown_kind_message(kind: str, spec: Optional[str] = None) -> str:
    where = f"bad reward spec {spec!r}: " if spec is not None else ""
    return (f"{where}unknown reward kind {kind!r}; known kinds: {', '.join(REWARD_KINDS.names())} "
            f"(shorthand KIND:ARG@WEIGHT, e.g. 'match:answer@1.0')")


# ----------------------------------------------------------------------------- spec

# A trailing "@<float>" is the weight; anything before it (including other '@') is the argument.
_WEIGHT_RE = re.compile(r"@\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class RewardSpec(BaseModel):
    """One reward component: ``kind`` (a key of :data:`REWARD_KINDS`), its ``arg``, ``weight``
    and kind-specific ``options``.

    CLI shorthand ``KIND:ARG@WEIGHT`` (see :meth:`parse`); YAML form is a list of mappings with
    the same fields, e.g. ``- {kind: match, arg: answer, weight: 1.0}``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="Reward kind; one of the registered kinds (model, ensemble, "
                                  "match, regex, length, python, ...).")
    arg: str = Field("", description="Kind argument: a path, a field name, a regex, key=value "
                                     "pairs or module:function, depending on the kind.")
    weight: float = Field(1.0, description="Multiplier in the weighted sum; 0 computes and logs "
                                           "the component without rewarding it.")
    options: Dict[str, Any] = Field(default_factory=dict,
                                    description="Kind-specific options (e.g. combine/k for "
                                                "ensemble, full_match for regex, unit for length).")
    name: Optional[str] = Field(None, description="Name used for logging as rewards/<name>; "
                                                  "defaults to the kind.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        v = v.strip()
        if v not in REWARD_KINDS:
            raise ValueError(unknown_kind_message(v))
        return v

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"reward weight must be finite, got {v}")
        return v

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """Parse the CLI shorthand ``KIND:ARG@WEIGHT``.

        * ``KIND`` is everything before the first ``:``; ``ARG`` everything after it, so ARG may
          itself contain ``:`` (``python:my.module:fn``).
        * ``@WEIGHT`` is optional and recognised only as a trailing ``@<float>``
          (``match:answer@0.5``, ``length:max=100@-1e-1``); any other ``@`` stays in ARG
          (``regex:\\w+@\\w+``). A regex that itself ends in ``@<digits>`` needs an explicit
          weight: ``regex:v@2@1`` is pattern ``v@2`` with weight 1.
        """
        if not isinstance(text, str):
            raise TypeError(f"reward spec must be a string, got {type(text).__name__}")
        s = text.strip()
        if not s:
            raise ValueError(f"empty reward spec; expected KIND:ARG@WEIGHT with KIND one of: "
                             f"{', '.join(REWARD_KINDS.names())}")
        weight = 1.0
        m = _WEIGHT_RE.search(s)
        if m:
            weight = float(m.group(1))
            s = s[:m.start()]
        kind, _, arg = s.partition(":")
        kind = kind.strip()
        if kind not in REWARD_KINDS:
            raise ValueError(unknown_kind_message(kind, text))
        return cls(kind=kind, arg=arg, weight=weight)

    @classmethod
    def coerce(cls, value: "RewardSpec | str | Mapping[str, Any] | Callable") -> "RewardSpec":
        """Accept a spec, its shorthand string, its YAML mapping, or a Python callable (the Python API's
        ``reward_funcs=[fn]``: a ``trl`` spec named after the function, see :func:`register_callable`)."""
        if isinstance(value, RewardSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            return cls.model_validate(dict(value))
        if callable(value):
            return cls(kind="trl", arg=register_callable(value), name=callable_name(value))
        raise TypeError(f"cannot make a RewardSpec from {type(value).__name__}: {value!r}")

    @classmethod
    def coerce_list(cls, value: Any) -> "List[RewardSpec]":
        """A list of specs from strings (shorthand), mappings or specs; one item may be given bare,
        None gives an empty list. Config fields holding reward lists validate through this."""
        if value is None:
            return []
        if isinstance(value, (str, Mapping, RewardSpec)):
            value = [value]
        return [cls.coerce(v) for v in value]

    def shorthand(self) -> str:
        return f"{self.kind}:{self.arg}@{self.weight:g}"


# ----------------------------------------------------------------------------- callables

#: reward callables handed over in-process (Python API), by the reference their spec records
CALLABLES: Dict[str, Callable] = {}


def callable_name(fn: Callable) -> str:
    """The name a reward callable logs under (``rewards/<name>/mean``): its ``__name__`` as in TRL."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name if name != "<lambda>" else "lambda"


def register_callable(fn: Callable) -> str:
    """Keep ``fn`` for the ``trl``/``python`` kinds and return the reference its spec records
    (``module:qualname``, which config.yaml shows); a different callable with the same reference
    gets a ``#N`` suffix."""
    ref = f"{getattr(fn, '__module__', None) or 'callable'}:{getattr(fn, '__qualname__', None) or callable_name(fn)}"
    base, n = ref, 1
    while ref in CALLABLES and CALLABLES[ref] is not fn:
        n += 1
        ref = f"{base}#{n}"
    CALLABLES[ref] = fn
    return ref


# ----------------------------------------------------------------------------- helpers

class RewardError(ValueError):
    """A reward source returned something unusable; the message names the source and the value."""


def check_scores(source: str, scores: Any, n: int, allow_none: bool = False) -> List[float]:
    """Validate a source's output: a sequence of ``n`` finite numbers. ``source`` names the culprit.
    ``allow_none``: ``None`` entries (TRL's "this function does not apply to this completion") become NaN."""
    fix = f"; it must return a list of {n} finite floats, one per completion"
    if isinstance(scores, (str, bytes, Mapping)):
        raise RewardError(f"{source} returned a {type(scores).__name__}{fix}")
    try:
        vals = list(scores)
    except TypeError:
        raise RewardError(f"{source} returned a {type(scores).__name__}{fix}") from None
    if len(vals) != n:
        raise RewardError(f"{source} returned {len(vals)} scores for {n} completions{fix}")
    out = []
    for i, v in enumerate(vals):
        if v is None and allow_none:
            out.append(math.nan)
            continue
        if isinstance(v, (str, bytes)):
            raise RewardError(f"{source} returned a non-number at index {i}: {v!r}{fix}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{source} returned a non-number at index {i}: {v!r}{fix}") from None
        if not math.isfinite(f):
            raise RewardError(f"{source} returned a non-finite score at index {i}: {f}{fix}")
        out.append(f)
    return out


def merge_options(spec: RewardSpec, shorthand: Mapping[str, Any]) -> Dict[str, Any]:
    """Options given in the ARG shorthand plus ``spec.options``; a key given differently in both is
    an error rather than a silent override."""
    merged = dict(shorthand)
    for k, v in spec.options.items():
        if k in merged and str(merged[k]) != str(v):
            raise ValueError(f"reward spec {spec.shorthand()!r}: option {k!r} given twice "
                             f"({merged[k]!r} in the argument, {v!r} in options)")
        merged[k] = v
    return merged


def require_arg(spec: RewardSpec, what: str) -> str:
    arg = spec.arg.strip()
    if not arg:
        raise ValueError(f"reward spec {spec.shorthand()!r}: kind {spec.kind!r} needs {what} "
                         f"(syntax: {REWARD_KINDS.entry(spec.kind).syntax})")
    return arg


class FunctionSource:
    """Wrap ``fn(prompts, completions, rows) -> list[float]`` as a named :class:`RewardSource`."""

    def __init__(self, name: str, fn: Callable[[List[Any], List[str], List[Dict[str, Any]]], Sequence[float]]):
        self.name = name
        self._fn = fn

    def __call__(self, prompts, completions, rows):
        return check_scores(f"reward source {self.name!r}", self._fn(prompts, completions, rows),
                            len(completions))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
