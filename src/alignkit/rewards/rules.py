"""Rule-based reward kinds: ``match`` (verifiable answers), ``regex`` (format) and ``length``."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional

from alignkit.rewards.answer import is_correct, reference_answer
from alignkit.rewards.base import (FunctionSource, RewardSpec, merge_options, register_reward_kind,
                                   require_arg)

_TRUE = {"1", "true", "yes", "on"}


def _flag(value: Any) -> bool:
    return value.strip().lower() in _TRUE if isinstance(value, str) else bool(value)


# ----------------------------------------------------------------------------- match

def _math_verify_equal(completion: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("match option use_math_verify=true needs the math-verify package "
                          "(pip install 'alignkit[math]')") from None
    try:
        return bool(verify(parse(reference), parse(completion)))
    except Exception:  # its parser raises on odd LaTeX; an unparseable answer is a wrong answer
        return False


@register_reward_kind("match", syntax="match:FIELD")
def build_match(spec: RewardSpec) -> FunctionSource:
    """1.0 if the completion's final answer equals row[FIELD] (numeric-aware), else 0.0."""
    field = require_arg(spec, "the name of the row field holding the reference answer")
    unknown = set(spec.options) - {"use_math_verify"}
    if unknown:
        raise ValueError(f"reward spec {spec.shorthand()!r}: unknown match options {sorted(unknown)}")
    use_mv = _flag(spec.options.get("use_math_verify", False))

    def score(prompts, completions, rows: List[Dict[str, Any]]) -> List[float]:
        if len(rows) != len(completions):
            raise ValueError(f"match:{field}: got {len(rows)} rows for {len(completions)} completions")
        out = []
        for i, (completion, row) in enumerate(zip(completions, rows)):
            if field not in row or row[field] is None:
                raise KeyError(f"match:{field}: row {i} has no field {field!r} "
                               f"(fields: {sorted(row) or 'none'})")
            ok = is_correct(completion, row[field])
            if not ok and use_mv:
                ok = _math_verify_equal(completion, reference_answer(row[field]))
            out.append(1.0 if ok else 0.0)
        return out

    return FunctionSource("match", score)


# ----------------------------------------------------------------------------- regex

@register_reward_kind("regex", syntax="regex:PATTERN")
def build_regex(spec: RewardSpec) -> FunctionSource:
    """1.0 if re.search(PATTERN, completion, DOTALL) matches, else 0.0 (options.full_match: bool).

    ``full_match: true`` uses re.fullmatch on the stripped completion instead.
    """
    pattern = spec.arg
    if not pattern:
        require_arg(spec, "a regular expression")
    unknown = set(spec.options) - {"full_match"}
    if unknown:
        raise ValueError(f"reward spec {spec.shorthand()!r}: unknown regex options {sorted(unknown)}")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"reward spec regex:{pattern}: invalid regular expression: {e}") from None
    full = _flag(spec.options.get("full_match", False))

    def score(prompts, completions, rows) -> List[float]:
        if full:
            return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]
        return [1.0 if rx.search(c) else 0.0 for c in completions]

    return FunctionSource("regex", score)


# ----------------------------------------------------------------------------- length

_LENGTH_KEYS = {"target": "target", "max": "upper", "min": "lower"}  # shorthand key -> argument


def parse_key_values(arg: str, where: str) -> Dict[str, str]:
    """``"target=50,unit=chars"`` -> ``{"target": "50", "unit": "chars"}``."""
    out: Dict[str, str] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"{where}: expected key=value, got {part!r}")
        if key.strip() in out:
            raise ValueError(f"{where}: key {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out


def length_penalty(length: float, target: Optional[float] = None, upper: Optional[float] = None,
                   lower: Optional[float] = None) -> float:
    """Sum of the active terms: ``-|L - target|/target``, ``-max(0, L - upper)/upper``,
    ``-max(0, lower - L)/lower`` (each 0 at the ideal, -1 one full scale away)."""
    r = 0.0
    if target is not None:
        r -= abs(length - target) / target
    if upper is not None:
        r -= max(0.0, length - upper) / upper
    if lower is not None:
        r -= max(0.0, lower - length) / lower
    return r


@register_reward_kind("length", syntax="length:target=N|max=N|min=N[,unit=words|chars]")
def build_length(spec: RewardSpec) -> FunctionSource:
    """Length shaping: target -> -|L-N|/N, max -> -max(0,L-N)/N, min -> -max(0,N-L)/N (terms add)."""
    where = f"reward spec {spec.shorthand()!r}"
    opts = merge_options(spec, parse_key_values(spec.arg, where))
    unknown = set(opts) - set(_LENGTH_KEYS) - {"unit"}
    if unknown:
        raise ValueError(f"{where}: unknown length keys {sorted(unknown)}; use target, max, min, unit")
    unit = str(opts.get("unit", "words"))
    if unit not in ("words", "chars"):
        raise ValueError(f"{where}: unit must be 'words' or 'chars', got {unit!r}")
    bounds: Dict[str, float] = {}
    for key, arg in _LENGTH_KEYS.items():
        if key in opts:
            try:
                bounds[arg] = float(opts[key])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {key} must be a number, got {opts[key]!r}") from None
            if not (math.isfinite(bounds[arg]) and bounds[arg] > 0):
                raise ValueError(f"{where}: {key} must be a finite number > 0, got {opts[key]!r}")
    if not bounds:
        raise ValueError(f"{where}: give at least one of target=N, max=N, min=N "
                         f"(e.g. length:max=200,unit=words)")
    measure = (lambda t: len(t.split())) if unit == "words" else len

    def score(prompts, completions, rows) -> List[float]:
        return [length_penalty(measure(c), **bounds) for c in completions]

    return FunctionSource("length", score)


__all__ = ["build_match", "build_regex", "build_length", "length_penalty", "parse_key_values"]
