"""Uncertainty for every number a user compares: intervals, paired tests, verdicts.

One implementation, pure Python (no SciPy), used by ``eval``, ``compare``, the demo's summary, the
held-out alerts, probes and red-teaming. Everything returns plain floats so results go straight
into JSON.

Samples from one prompt are not independent (eight answers to the same prompt share its
difficulty), so the unit of every interval here is the *group* (the prompt): values are first
averaged within their group, and the interval is taken over the group means (a cluster-level
t interval). With one value per group this is the ordinary t interval. Comparisons of two models
on the same prompts are *paired*: the per-prompt difference of the group means, then a t interval
and a two-sided t test over prompts, which removes the between-prompt variance both models share.

Formulas:
- t interval: ``mean ± t_{n-1, 1-α/2} · s / sqrt(n)``, ``s`` the sample standard deviation
  (Student 1908); ``n`` is the number of groups.
- Wilson score interval for a proportion ``k / n`` (Wilson 1927), better than the normal
  approximation near 0 and 1 and for small ``n``.
- Student-t CDF through the regularized incomplete beta function,
  ``P(|T| > t) = I_{ν/(ν+t²)}(ν/2, 1/2)``, evaluated by its continued fraction (modified Lentz).
- Percentile bootstrap over groups (Efron & Tibshirani 1993, ch. 13) for statistics with no
  closed-form interval (a win rate with ties, a correlation).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

__all__ = [
    "Interval",
    "PairedComparison",
    "binomial_interval",
    "bootstrap_interval",
    "format_pm",
    "gain_text",
    "group_means",
    "interval_keys",
    "mean_interval",
    "paired_comparison",
    "read_interval",
    "is_interval_key",
    "verdict_of",
    "t_quantile",
    "t_sf_two_sided",
]

NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its standard error and a two-sided interval at ``level``.

    ``n`` counts the independent units (groups) the interval rests on; ``method`` says how it was
    computed (``t``, ``wilson``, ``bootstrap``). With ``n < 2`` the spread is unknown: ``se``,
    ``lo`` and ``hi`` are nan."""

    mean: float
    se: float
    lo: float
    hi: float
    n: int
    level: float = 0.95
    method: str = "t"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def format(self, digits: Optional[int] = None) -> str:
        """``0.512 ± 0.041`` (the half-width of the interval), or the mean alone when unknown. Without
        ``digits``, the half-width gets two significant digits and the mean as many decimals
        (:func:`format_pm`)."""
        if math.isnan(self.lo):
            return f"{self.mean:.{digits}f}" if digits is not None else f"{self.mean:.4g}"
        if digits is None:
            return format_pm(self.mean, self.half_width)
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


@dataclass(frozen=True)
class PairedComparison:
    """``b - a`` over paired groups: the interval of the mean difference, a two-sided t test, and
    a verdict: ``better`` (the interval lies above 0), ``worse`` (below 0) or ``not
    distinguishable`` (it holds 0, or fewer than 2 groups)."""

    diff: Interval
    p_value: float
    verdict: str

    def to_dict(self) -> Dict[str, Any]:
        return {**{f"diff_{k}": v for k, v in self.diff.to_dict().items()},
                "p_value": self.p_value, "verdict": self.verdict}

    def text(self, than: str = "the starting model", digits: Optional[int] = None) -> str:
        """The gain as one line with its interval and verdict (:func:`gain_text`)."""
        return gain_text(self.diff, self.p_value, digits, than)


def format_pm(mean: float, half: float, sign: bool = False) -> str:
    """``mean ± half`` with two significant digits of ``half`` and the mean to the same decimal place
    (at most 6 decimals): ``format_pm(0.33921, 0.2317)`` is ``0.34 ± 0.23``, ``format_pm(2.975, 0.0402)``
    is ``2.975 ± 0.040``. A zero or non-finite half-width prints the mean to 4 significant digits."""
    plus = "+" if sign else ""
    if not math.isfinite(half) or half <= 0 or not math.isfinite(mean):
        return f"{mean:{plus}.4g}" + (" ± 0" if half == 0 else "")
    decimals = _decimals(half)
    return f"{mean:{plus}.{decimals}f} ± {half:.{decimals}f}"


def _decimals(half: float) -> int:
    """Decimal places that give ``half`` two significant digits (0 to 6)."""
    return min(6, max(0, 1 - math.floor(math.log10(half)))) if math.isfinite(half) and half > 0 else 3


def _floats(values: Any) -> List[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v) for v in values]


# ---------------------------------------------------------------- Student t, written out
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))          # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):       # the fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return NAN
    if math.isinf(t):
        return 0.0
    return _betai(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``0 < p < 1``), by bisection on the CDF.

    Accurate to ~1e-10; called a handful of times per report, so speed does not matter."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    upper = p > 0.5
    tail = (1.0 - p) if upper else p             # one-sided tail mass beyond the quantile
    lo, hi = 0.0, 1.0
    while t_sf_two_sided(hi, df) / 2 > tail:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf_two_sided(mid, df) / 2 > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    q = (lo + hi) / 2
    return q if upper else -q


# ---------------------------------------------------------------- intervals
def group_means(values: Sequence[float], groups: Optional[Sequence[Hashable]] = None) -> List[float]:
    """Mean of ``values`` within each group, in order of first appearance; one value per group
    when ``groups`` is None."""
    vals = _floats(values)
    if groups is None:
        return vals
    if len(groups) != len(vals):
        raise ValueError(f"group_means: {len(vals)} values but {len(groups)} group labels")
    sums: Dict[Hashable, List[float]] = {}
    for v, g in zip(vals, groups):
        s = sums.setdefault(g, [0.0, 0.0])
        s[0] += v
        s[1] += 1.0
    return [s / c for s, c in sums.values()]


def mean_interval(values: Sequence[float], groups: Optional[Sequence[Hashable]] = None,
                  level: float = 0.95) -> Interval:
    """The mean of ``values`` with a t interval over groups (prompts).

    The point estimate is the mean of the group means (each prompt weighs the same; with equal
    samples per prompt it equals the plain mean). Example: values [1, 2, 3, 4], no groups:
    mean 2.5, s = 1.291, se = 0.6455, t_{3, 0.975} = 3.182, interval 2.5 ± 2.054."""
    xs = group_means(values, groups)
    n = len(xs)
    if n == 0:
        return Interval(NAN, NAN, NAN, NAN, 0, level)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, NAN, NAN, NAN, n, level)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    se = math.sqrt(var / n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return Interval(mean, se, mean - half, mean + half, n, level)


def binomial_interval(k: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a proportion ``k / n`` (Wilson 1927).

    Example: 8 of 10 at 95%: 0.8, interval [0.490, 0.943]."""
    if n <= 0:
        return Interval(NAN, NAN, NAN, NAN, 0, level, "wilson")
    p = k / n
    z = NormalDist().inv_cdf(0.5 + level / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, math.sqrt(p * (1 - p) / n), max(0.0, centre - half), min(1.0, centre + half),
                    n, level, "wilson")


def bootstrap_interval(statistic: Callable[[List[int]], float], n_groups: int,
                       level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap over groups (Efron & Tibshirani 1993).

    ``statistic(indices)`` computes the statistic on the groups at ``indices`` (a resample with
    replacement of ``range(n_groups)``); the point estimate is ``statistic(range(n_groups))``.
    Seeded, so a report is reproducible."""
    full = statistic(list(range(n_groups)))
    if n_groups < 2:
        return Interval(full, NAN, NAN, NAN, n_groups, level, "bootstrap")
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        v = statistic([rng.randrange(n_groups) for _ in range(n_groups)])
        if not math.isnan(v):
            draws.append(v)
    if len(draws) < 2:
        return Interval(full, NAN, NAN, NAN, n_groups, level, "bootstrap")
    draws.sort()
    alpha = (1 - level) / 2
    lo = draws[int(math.floor(alpha * (len(draws) - 1)))]
    hi = draws[int(math.ceil((1 - alpha) * (len(draws) - 1)))]
    m = sum(draws) / len(draws)
    se = math.sqrt(sum((d - m) ** 2 for d in draws) / (len(draws) - 1))
    return Interval(full, se, lo, hi, n_groups, level, "bootstrap")


def paired_comparison(a: Sequence[float], b: Sequence[float],
                      groups: Optional[Sequence[Hashable]] = None,
                      groups_b: Optional[Sequence[Hashable]] = None,
                      level: float = 0.95) -> PairedComparison:
    """``b`` against ``a`` on the same prompts: per-prompt mean difference, t interval, t test.

    ``a`` and ``b`` may hold several samples per prompt (``groups`` labels ``a``'s values and
    ``groups_b`` ``b``'s; ``groups_b`` defaults to ``groups``, which needs equal lengths). Only
    prompts present on both sides are compared. Verdict ``better`` / ``worse`` when the interval
    of ``mean(b - a)`` excludes 0, else ``not distinguishable``."""
    va, vb = _floats(a), _floats(b)
    if groups is None:
        if len(va) != len(vb):
            raise ValueError(f"paired_comparison: {len(va)} and {len(vb)} values do not pair up; "
                             "pass group labels (prompts)")
        groups = list(range(len(va)))
    gb = groups if groups_b is None else groups_b
    if len(groups) != len(va) or len(gb) != len(vb):
        raise ValueError("paired_comparison: every value needs a group label")
    ma = dict(zip(_order(groups), group_means(va, groups)))
    mb = dict(zip(_order(gb), group_means(vb, gb)))
    diffs = [mb[g] - ma[g] for g in ma if g in mb]
    iv = mean_interval(diffs, level=level)
    if iv.n < 2 or math.isnan(iv.se):
        return PairedComparison(iv, NAN, "not distinguishable")
    if iv.se == 0.0:
        p = 1.0 if iv.mean == 0 else 0.0
    else:
        p = t_sf_two_sided(iv.mean / iv.se, iv.n - 1)
    return PairedComparison(iv, p, verdict_of(iv))


def _order(groups: Sequence[Hashable]) -> List[Hashable]:
    """Distinct labels in order of first appearance (the order ``group_means`` uses)."""
    seen: Dict[Hashable, None] = {}
    for g in groups:
        seen.setdefault(g, None)
    return list(seen)


# ---------------------------------------------------------------- flat keys (summary.json, metrics.jsonl)
# An interval travels in a flat metric dict as KEY (the mean, unchanged), KEY_se, KEY_lo, KEY_hi and
# KEY_n (the number of groups it rests on); a paired comparison adds KEY_p (two-sided p value).
INTERVAL_SUFFIXES = ("_se", "_lo", "_hi", "_n", "_p")


def interval_keys(key: str, iv: Interval, p_value: Optional[float] = None) -> Dict[str, float]:
    """``{KEY_se, KEY_lo, KEY_hi, KEY_n}`` (and ``KEY_p`` when given) of ``iv``; the mean stays
    under ``KEY`` itself, written by the caller."""
    out = {f"{key}_se": iv.se, f"{key}_lo": iv.lo, f"{key}_hi": iv.hi, f"{key}_n": float(iv.n)}
    if p_value is not None:
        out[f"{key}_p"] = p_value
    return out


def read_interval(metrics: Dict[str, Any], key: str, level: float = 0.95) -> Optional[Interval]:
    """The :class:`Interval` stored under ``KEY``/``KEY_lo``/``KEY_hi`` (see :func:`interval_keys`), or
    None when the dict lacks any of the three."""
    try:
        mean, lo, hi = (float(metrics[k]) for k in (key, f"{key}_lo", f"{key}_hi"))
    except (KeyError, TypeError, ValueError):
        return None
    se = float(metrics.get(f"{key}_se", NAN))
    return Interval(mean, se, lo, hi, int(metrics.get(f"{key}_n", 0) or 0), level)


def is_interval_key(key: str, keys: Any) -> bool:
    """Whether ``key`` is the ``_se``/``_lo``/``_hi``/``_n``/``_p`` companion of another key in ``keys``."""
    return any(key.endswith(s) and key[:-len(s)] in keys for s in INTERVAL_SUFFIXES)


def verdict_of(iv: Interval) -> str:
    """``better`` / ``worse`` / ``not distinguishable`` for the interval of a difference (b - a)."""
    if math.isnan(iv.lo) or math.isnan(iv.hi):
        return "not distinguishable"
    return "better" if iv.lo > 0 else "worse" if iv.hi < 0 else "not distinguishable"


def gain_text(diff: Interval, p_value: float = NAN, digits: Optional[int] = None,
              than: str = "the starting model") -> str:
    """One line for a paired gain: ``+0.31 ± 0.12 (95% CI 0.19 to 0.43, p=0.0004, 16 prompts): better
    than the starting model`` (``digits``: decimals; default two significant digits of the half-width)."""
    if digits is None:
        digits = _decimals(diff.half_width)
    if math.isnan(diff.lo):
        return (f"{diff.mean:+.{digits}f} (no interval: {diff.n} paired prompt(s)): not distinguishable "
                f"from {than}")
    verdict = verdict_of(diff)
    tail = f"{verdict} than {than}" if verdict != "not distinguishable" else f"not distinguishable from {than}"
    p = "" if math.isnan(p_value) else f", p={p_value:.2g}"
    return (f"{diff.mean:+.{digits}f} ± {diff.half_width:.{digits}f} ({diff.level:.0%} CI {diff.lo:.{digits}f} "
            f"to {diff.hi:.{digits}f}{p}, {diff.n} prompts): {tail}")
