"""The weighted sum of reward components that online RL and best-of-N call."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from alignkit.rewards.base import REWARD_KINDS, RewardSource, RewardSpec, check_scores

SpecLike = Union[RewardSpec, str, Mapping[str, Any]]


class CompositeReward:
    """``total[i] = sum_c weight_c * score_c[i]`` over the components.

    After each call ``last_components`` maps each component's name to its *unweighted* scores
    (log them as ``rewards/<name>``; see :meth:`metrics`). A component with weight 0 is still
    computed and logged, which is how to monitor a signal without optimizing it. Names default to
    the kind; a kind used twice gets ``<kind>_0``, ``<kind>_1``, ... unless the spec sets ``name``.
    """

    name = "total"

    def __init__(self, components: Sequence[Tuple[str, float, RewardSource]],
                 specs: Optional[Sequence[RewardSpec]] = None):
        if not components:
            raise ValueError("a reward needs at least one component; known kinds: "
                             + ", ".join(REWARD_KINDS.names()))
        names = [c[0] for c in components]
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise ValueError(f"duplicate reward component names {dup}; set distinct `name`s")
        self.components = list(components)
        self.specs = list(specs or [])
        self.last_components: Dict[str, List[float]] = {}
        self.last_total: List[float] = []

    @property
    def names(self) -> List[str]:
        return [c[0] for c in self.components]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 rows: Optional[Sequence[Dict[str, Any]]] = None) -> List[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward: got {len(prompts)} prompts for {n} completions "
                             f"(repeat each prompt once per completion)")
        rows = [{} for _ in range(n)] if rows is None else list(rows)
        if len(rows) != n:
            raise ValueError(f"reward: got {len(rows)} rows for {n} completions")
        prompts, completions = list(prompts), list(completions)
        total = [0.0] * n
        parts: Dict[str, List[float]] = {}
        for name, weight, source in self.components:
            scores = check_scores(f"reward source {name!r}", source(prompts, completions, rows), n)
            parts[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        self.last_components, self.last_total = parts, total
        return total

    def metrics(self, prefix: str = "rewards/") -> Dict[str, float]:
        """Means of the last call: ``rewards/<name>`` per component and ``rewards/total``."""
        out = {f"{prefix}{k}": sum(v) / len(v) for k, v in self.last_components.items() if v}
        if self.last_total:
            out[f"{prefix}total"] = sum(self.last_total) / len(self.last_total)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}@{w:g}" for n, w, _ in self.components)
        return f"CompositeReward({inner})"


def build_source(spec: SpecLike) -> RewardSource:
    """Build one component (unweighted) from a spec, shorthand or mapping."""
    spec = RewardSpec.coerce(spec)
    source = REWARD_KINDS.entry(spec.kind).builder(spec)
    if not callable(source):
        raise TypeError(f"reward kind {spec.kind!r} built a non-callable {type(source).__name__}")
    return source


def build_reward(specs: Union[SpecLike, Sequence[SpecLike]]) -> CompositeReward:
    """Build the weighted sum of ``specs`` (RewardSpec objects, ``KIND:ARG@WEIGHT`` strings or
    YAML mappings; a single one is accepted too)."""
    if isinstance(specs, (str, RewardSpec, Mapping)):
        specs = [specs]
    parsed = [RewardSpec.coerce(s) for s in specs]
    counts = Counter(s.kind for s in parsed if s.name is None)
    seen: Counter = Counter()
    components = []
    for spec in parsed:
        if spec.name is not None:
            name = spec.name
        elif counts[spec.kind] > 1:
            name = f"{spec.kind}_{seen[spec.kind]}"
            seen[spec.kind] += 1
        else:
            name = spec.kind
        components.append((name, spec.weight, build_source(spec)))
    return CompositeReward(components, parsed)
