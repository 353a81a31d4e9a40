"""The weighted sum of reward components that online RL and best-of-N call."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from alignkit.rewards.base import REWARD_KINDS, RewardError, RewardSource, RewardSpec, check_scores
from alignkit.rewards.deadline import DEFAULT_TIMEOUT_S, RewardTimeout, call_with_deadline
from alignkit.rewards.pyfunc import where_raised

SpecLike = Union[RewardSpec, str, Mapping[str, Any]]


class CompositeReward:
    """``total[i] = sum_c weight_c * score_c[i]`` over the components.

    After each call ``last_components`` maps each component's name to its *unweighted* scores
    (log them as ``rewards/<name>``; see :meth:`metrics`). A component with weight 0 is still
    computed and logged, which is how to monitor a signal without optimizing it. Names default to
    the kind (the function's name for ``python:``/``trl:`` functions); a name used twice gets
    ``<name>_0``, ``<name>_1``, ... unless the spec sets ``name``.

    A reward function may give ``None`` (NaN) for a completion it does not apply to (TRL's contract):
    the total is the weighted sum over the components that apply (0 when none does).

    Components that run user code (``python:``, ``trl:``, ``judge:``; ``user_code`` on the source) run
    under ``timeout_s`` (:mod:`alignkit.rewards.deadline`); a timeout or an exception inside them is a
    :class:`~alignkit.rewards.base.RewardError` naming the function (and ``where``, the batch).
    """

    name = "total"

    def __init__(self, components: Sequence[Tuple[str, float, RewardSource]],
                 specs: Optional[Sequence[RewardSpec]] = None, timeout_s: Optional[float] = None):
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
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s

    @property
    def names(self) -> List[str]:
        return [c[0] for c in self.components]

    def check_inputs(self, columns: Iterable[str]) -> None:
        """Check every component that can be checked against the data's columns (a reward function's
        signature), before anything expensive runs; raises :class:`RewardError` (one line)."""
        columns = list(columns)
        for _, _, source in self.components:
            check = getattr(source, "check_inputs", None)
            if check is not None:
                check(columns)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 rows: Optional[Sequence[Dict[str, Any]]] = None, *, completion_ids: Optional[Sequence] = None,
                 trainer_state: Any = None, where: str = "") -> List[float]:
        """Weighted total per completion. ``completion_ids`` and ``trainer_state`` reach the reward
        functions that take them; ``where`` names the batch in errors ("at step 3 (rollout of ...)")."""
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
            scores = self._component(name, source, prompts, completions, rows, completion_ids, trainer_state, where)
            parts[name] = scores
            total = [t + weight * s if not math.isnan(s) else t for t, s in zip(total, scores)]
        self.last_components, self.last_total = parts, total
        return total

    def _component(self, name, source, prompts, completions, rows, completion_ids, trainer_state, where):
        """One component's unweighted scores; user code under the deadline, its failures one RewardError."""
        n = len(completions)
        if not getattr(source, "user_code", False):
            return check_scores(f"reward source {name!r}", source(prompts, completions, rows), n)
        what = source.describe() if hasattr(source, "describe") else f"reward {name!r}"
        at = f" {where}" if where else f" on a batch of {n} completions"
        if getattr(source, "extra_inputs", False):
            ids = [list(map(int, c)) for c in completion_ids] if completion_ids is not None else None
            call = lambda: source(prompts, completions, rows, completion_ids=ids,  # noqa: E731
                                  trainer_state=trainer_state)
        else:
            call = lambda: source(prompts, completions, rows)  # noqa: E731
        message = lambda: (f"{what} (rewards/{name}) did not return within {self.timeout_s:g} s{at}; it was "  # noqa: E731
                           f"stopped. Fix the function, or raise rewards.timeout_s if it is only slow")
        try:
            out = call_with_deadline(call, self.timeout_s, message)
            # a reward function checks its own output (None -> NaN: it does not apply there)
            return list(out) if getattr(source, "extra_inputs", False) else check_scores(what, out, n)
        except RewardTimeout:
            raise
        except RewardError as e:
            raise RewardError(f"{e}{at}") from e
        except Exception as e:  # noqa: BLE001 - user code: one line naming it (the traceback with --debug)
            line = where_raised(e, getattr(source, "fn", None))
            raise RewardError(f"{what} (rewards/{name}) raised {type(e).__name__}: {e}"
                              f"{f' at {line}' if line else ''}{at}") from e

    def metrics(self, prefix: str = "rewards/") -> Dict[str, float]:
        """Means of the last call: ``rewards/<name>`` per component and ``rewards/total``."""
        out = {}
        for k, v in self.last_components.items():
            vals = [x for x in v if not math.isnan(x)]
            if vals:
                out[f"{prefix}{k}"] = sum(vals) / len(vals)
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


def build_reward(specs: Union[SpecLike, Sequence[SpecLike]], timeout_s: Optional[float] = None) -> CompositeReward:
    """Build the weighted sum of ``specs`` (RewardSpec objects, ``KIND:ARG@WEIGHT`` strings, YAML
    mappings or callables; a single one is accepted too). ``timeout_s``: the deadline of each call of a
    component that runs user code (default :data:`~alignkit.rewards.deadline.DEFAULT_TIMEOUT_S`)."""
    if isinstance(specs, (str, RewardSpec, Mapping)) or callable(specs):
        specs = [specs]
    parsed = [RewardSpec.coerce(s) for s in specs]
    sources = [build_source(spec) for spec in parsed]
    # a function logs under its own name (TRL's rewards/<function>/mean), any other kind under the kind
    bases = [spec.name if spec.name is not None else
             (getattr(src, "name", None) if spec.kind in ("python", "trl") else None) or spec.kind
             for spec, src in zip(parsed, sources)]
    counts = Counter(b for b, spec in zip(bases, parsed) if spec.name is None)
    seen: Counter = Counter()
    components = []
    for spec, base, source in zip(parsed, bases, sources):
        if spec.name is None and counts[base] > 1:
            name = f"{base}_{seen[base]}"
            seen[base] += 1
        else:
            name = base
        components.append((name, spec.weight, source))
    return CompositeReward(components, parsed, timeout_s=timeout_s)
