"""Reward-model kinds: ``model`` (one trained reward model) and ``ensemble`` (several, combined).

Both score *text* through :func:`alignkit.models.reward.load_reward_scorer`, which applies the
reward model's own tokenizer and chat template, so a reward model whose tokenizer differs from
the policy's just works.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

from alignkit.rewards.base import RewardSpec, check_scores, merge_options, register_reward_kind, require_arg

Scorer = Callable[[List[Any], List[str]], List[float]]

COMBINE_MODES = ("mean", "min", "mean_minus_std")


def _load_scorer(path: str, **options: Any) -> Scorer:
    """Indirection (looked up at call time) so tests can monkeypatch either this hook or
    ``alignkit.models.reward.load_reward_scorer``; the import is lazy because it pulls in torch
    and transformers."""
    # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
    from alignkit.models import reward as reward_models

    return reward_models.load_reward_scorer(path, **options)


class ModelReward:
    """A trained reward model's score at the last real token of prompt+completion."""

    def __init__(self, path: str, scorer: Scorer, name: str = "model"):
        self.name = name
        self.path = path
        self.scorer = scorer

    def __call__(self, prompts, completions, rows=None) -> List[float]:
        return check_scores(f"reward model {self.path!r}", self.scorer(list(prompts), list(completions)),
                            len(completions))

    def __repr__(self) -> str:
        return f"ModelReward({self.path!r})"


@register_reward_kind("model", syntax="model:PATH")
def build_model(spec: RewardSpec) -> ModelReward:
    """A trained reward model (options are passed to load_reward_scorer: device, batch_size, ...)."""
    path = require_arg(spec, "the reward model's path")
    return ModelReward(path, _load_scorer(path, **spec.options))


def combine_scores(member_scores: Sequence[Sequence[float]], combine: str = "mean",
                   k: float = 1.0) -> List[float]:
    """Combine ``(M, N)`` member scores into ``(N,)``.

    ``mean``; ``min`` (worst case); ``mean_minus_std``: ``mean - k * std`` with the population std
    over members, an uncertainty penalty against reward hacking (Coste et al. 2023, "Reward Model
    Ensembles Help Mitigate Overoptimization"). E.g. members (1, 3): mean 2, std 1, k=0.5 -> 1.5.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"unknown ensemble combine {combine!r}; choose one of: {', '.join(COMBINE_MODES)}")
    out = []
    for column in zip(*member_scores):  # the M scores of one completion
        mean, std = mean_std(column)
        out.append(mean if combine == "mean" else min(column) if combine == "min" else mean - k * std)
    return out


def mean_std(values: Sequence[float]) -> "tuple[float, float]":
    """Mean and population std (divide by M, not M-1)."""
    m = len(values)
    mean = sum(values) / m
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / m)


class EnsembleReward:
    """Several reward models combined per completion (see :func:`combine_scores`).

    After each call ``last_members`` holds each member's scores and ``last_std`` the per-completion
    std over members (a disagreement signal worth logging).
    """

    def __init__(self, paths: List[str], scorers: List[Scorer], combine: str = "mean", k: float = 1.0,
                 name: str = "ensemble"):
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown ensemble combine {combine!r}; choose one of: {', '.join(COMBINE_MODES)}")
        self.name, self.paths, self.scorers, self.combine, self.k = name, paths, scorers, combine, k
        self.last_members: Dict[str, List[float]] = {}
        self.last_std: List[float] = []

    def __call__(self, prompts, completions, rows=None) -> List[float]:
        n = len(completions)
        members = [check_scores(f"ensemble member {p!r}", s(list(prompts), list(completions)), n)
                   for p, s in zip(self.paths, self.scorers)]
        self.last_members = dict(zip(self.paths, members))
        self.last_std = [mean_std(column)[1] for column in zip(*members)]
        return combine_scores(members, self.combine, self.k)

    def __repr__(self) -> str:
        return f"EnsembleReward({self.paths!r}, combine={self.combine!r}, k={self.k})"


def parse_ensemble_arg(arg: str) -> Dict[str, Any]:
    """``"a,b;mean_minus_std=0.5"`` -> ``{"paths": ["a", "b"], "combine": "mean_minus_std", "k": 0.5}``."""
    paths_part, _, mode_part = arg.partition(";")
    out: Dict[str, Any] = {}
    paths = [p.strip() for p in paths_part.split(",") if p.strip()]
    if paths:
        out["paths"] = paths
    mode, eq, k = (s.strip() for s in mode_part.partition("="))
    if mode:
        out["combine"] = mode
    if eq:
        out["k"] = k
    return out


@register_reward_kind("ensemble", syntax="ensemble:PATH1,PATH2[;mean|min|mean_minus_std[=K]]")
def build_ensemble(spec: RewardSpec) -> EnsembleReward:
    """Several reward models combined by mean, min or mean - K*std (K default 1)."""
    where = f"reward spec {spec.shorthand()!r}"
    opts = merge_options(spec, parse_ensemble_arg(spec.arg))
    paths = opts.pop("paths", None)
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        require_arg(spec, "comma-separated reward model paths")
    combine = str(opts.pop("combine", "mean"))
    if combine not in COMBINE_MODES:
        raise ValueError(f"{where}: unknown combine {combine!r}; choose one of: {', '.join(COMBINE_MODES)}")
    try:
        k = float(opts.pop("k", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: k must be a number") from None
    if not math.isfinite(k):
        raise ValueError(f"{where}: k must be finite, got {k}")
    scorers = [_load_scorer(p, **opts) for p in paths]  # remaining options go to every member
    return EnsembleReward(list(paths), scorers, combine, k)
