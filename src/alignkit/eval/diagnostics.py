"""Live failure-mode checks over a run's metric history.

Feed :class:`Diagnostics` one step of logged metrics at a time; it returns the alerts that became
true at that step. Each alert kind fires once, then stays quiet until its condition has cleared
(so a run that hacks its reward for 500 steps produces one alert, not 500).

Checks (a check whose metric keys never appear is skipped):

``kl_blowup``
    ``kl/ref`` (KL to the reference, nats per sequence), averaged over the last ``window``
    observations, exceeds ``kl_budget``, or is not finite.
``verbosity``
    ``rollout/length_mean`` rises by more than ``length_growth`` (relative) over the window while
    ``rewards/mean`` rises too: the policy is buying reward with length (reward hacking through
    the reward model's length bias).
``mode_collapse``
    ``diversity/distinct_2`` averaged over the window falls below ``(1 - diversity_drop)`` times
    its first observed value.
``overoptimization``
    Proxy reward ``rewards/mean`` rises while the gold reward ``rewards/gold`` (or
    ``eval/rewards/gold``) falls by more than ``gold_drop`` over the last ``window`` gold
    observations: Goodhart's law as measured by Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization".
``likelihood_displacement``
    DPO ``rewards/margin`` rises while ``logps/chosen`` falls by more than ``logp_drop``
    (relative) over the window:
    the preferred responses themselves lose probability (Razin et al. 2024, "Unintentional
    Unalignment: Likelihood Displacement in DPO"; Pal et al. 2024, "Smaug: Fixing Failure Modes
    of Preference Optimisation with DPO-Positive").

Trends are least-squares slopes over the window, required to be both large enough (the fitted
change across the window passes the threshold) and significant (slope / standard error >=
``trend_t``), so step-to-step noise does not trigger alerts the way first-versus-last would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Alert", "Diagnostics", "DiagnosticsConfig", "Trend", "fit_trend"]

Point = Tuple[float, float]  # (step, value)

KL_KEY = "kl/ref"
LENGTH_KEY = "rollout/length_mean"
PROXY_KEY = "rewards/mean"
GOLD_KEYS = ("rewards/gold", "eval/rewards/gold")
DIVERSITY_KEY = "diversity/distinct_2"
MARGIN_KEY = "rewards/margin"
CHOSEN_LOGP_KEY = "logps/chosen"


@dataclass(frozen=True)
class Alert:
    """One detected failure mode: at which step, which check (``kind``) and what to do about it."""

    step: int
    kind: str
    message: str

    def to_dict(self) -> Dict[str, object]:
        """The ``alerts.jsonl`` record: ``{"step", "kind", "message"}``."""
        return asdict(self)


@dataclass
class DiagnosticsConfig:
    """Thresholds of the live checks. Defaults suit per-step logging of a typical RLHF run."""

    kl_budget: float = 10.0
    """Largest acceptable KL to the reference, in nats per sequence (``kl/ref``)."""
    window: int = 5
    """Number of most recent observations each trend / average is computed over (>= 3)."""
    length_growth: float = 0.2
    """Relative rise of ``rollout/length_mean`` over the window that counts as growth (0.2 = 20%)."""
    diversity_drop: float = 0.5
    """Relative fall of distinct-2 from its first observed value that counts as collapse."""
    gold_drop: float = 0.05
    """Absolute fall of the gold reward over the window (fitted) that counts as a decline."""
    logp_drop: float = 0.1
    """Relative fall of ``logps/chosen`` over the window that counts as displacement (0.1: a
    chosen log-prob going from -100 to below -110 nats); relative so that summed and
    length-normalized log-probs both work."""
    trend_t: float = 3.0
    """Minimum |slope / standard error| for a least-squares trend to count as real, not noise."""
    patience: int = 2
    """Consecutive updates a condition must hold before its alert fires (filters one-off noise)."""

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.window < 3:
            raise ValueError(f"window must be >= 3 to fit a trend with an error estimate, got {self.window}")


@dataclass(frozen=True)
class Trend:
    """Least-squares line through ``(step, value)`` points.

    ``start`` / ``end`` are the fitted values at the first and last step, ``change = end - start``
    and ``t`` is slope / standard error (``inf`` for a perfect non-flat line, 0 for a flat one).
    """

    slope: float
    start: float
    end: float
    t: float
    n: int

    @property
    def change(self) -> float:
        return self.end - self.start

    def _tol(self) -> float:
        # ignore float round-off: a constant series must never count as a trend
        return 1e-9 * max(1.0, abs(self.start), abs(self.end))

    def rising(self, min_change: float, min_t: float) -> bool:
        """Rose by more than ``min_change`` with slope / stderr >= ``min_t``."""
        return self.change > max(min_change, self._tol()) and self.t >= min_t

    def falling(self, min_drop: float, min_t: float) -> bool:
        """Fell by more than ``min_drop`` with slope / stderr <= -``min_t``."""
        return -self.change > max(min_drop, self._tol()) and -self.t >= min_t


def fit_trend(points: Sequence[Point]) -> Optional[Trend]:
    """Fit y = a + b·x by least squares; None with fewer than 3 distinct finite points."""
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    n = len(pts)
    if n < 3:
        return None
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0.0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    stderr = math.sqrt(ssr / (n - 2) / sxx)
    if stderr > 1e-12 * (abs(slope) + 1e-300):
        t = slope / stderr
    else:  # residuals vanish: an exact line is infinitely significant unless it is flat
        t = 0.0 if slope == 0.0 else math.copysign(math.inf, slope)
    x0, x1 = pts[0][0], pts[-1][0]
    return Trend(slope, intercept + slope * x0, intercept + slope * x1, t, n)


class Diagnostics:
    """Consume one step of metrics at a time and report newly detected failure modes.

    >>> diag = Diagnostics(DiagnosticsConfig(kl_budget=10.0))
    >>> for step, m in enumerate(history):          # doctest: +SKIP
    ...     for alert in diag.update(step, m):
    ...         print(alert.message)
    """

    def __init__(self, config: Optional[DiagnosticsConfig] = None) -> None:
        self.config = config or DiagnosticsConfig()
        self.history: Dict[str, List[Point]] = {}
        self.alerts: List[Alert] = []  # every alert emitted so far
        self._active: set = set()
        self._streak: Dict[str, int] = {}  # consecutive updates each condition has held
        self._checks: Dict[str, Callable[[], Optional[str]]] = {
            "kl_blowup": self._check_kl,
            "verbosity": self._check_verbosity,
            "mode_collapse": self._check_mode_collapse,
            "overoptimization": self._check_overoptimization,
            "likelihood_displacement": self._check_likelihood_displacement,
        }

    @property
    def active(self) -> frozenset:
        """Alert kinds whose condition held at the last evaluation (they will not fire again)."""
        return frozenset(self._active)

    def update(self, step: int, metrics: Dict[str, float]) -> List[Alert]:
        """Record ``metrics`` for ``step`` and return the alerts that are new at this step.

        A check returns a message (condition holds), ``""`` (it does not: the kind clears and may
        fire again later) or None (not enough data: the state is left as it is). An alert fires
        once its condition has held for ``patience`` consecutive evaluations.
        """
        for key, value in metrics.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.history.setdefault(key, []).append((float(step), float(value)))
        new: List[Alert] = []
        for kind, check in self._checks.items():
            message = check()
            if message is None:
                continue
            if not message:
                self._active.discard(kind)
                self._streak[kind] = 0
                continue
            self._streak[kind] = self._streak.get(kind, 0) + 1
            if kind not in self._active and self._streak[kind] >= self.config.patience:
                self._active.add(kind)
                new.append(Alert(int(step), kind, message))
        self.alerts.extend(new)
        return new

    def replay(self, records: Iterable[Dict[str, float]]) -> List[Alert]:
        """Run :meth:`update` over ``metrics.jsonl`` records (each with a ``step`` key)."""
        out: List[Alert] = []
        for i, rec in enumerate(records):
            out += self.update(int(rec.get("step", i)), rec)
        return out

    # ------------------------------------------------------------------ helpers
    def _tail(self, key: str) -> List[Point]:
        """The last ``window`` finite observations of ``key``."""
        pts = [p for p in self.history.get(key, ()) if math.isfinite(p[1])]
        return pts[-self.config.window:]

    def _span(self, key: str, lo: float, hi: float) -> List[Point]:
        """Finite observations of ``key`` with lo <= step <= hi."""
        return [p for p in self.history.get(key, ()) if lo <= p[0] <= hi and math.isfinite(p[1])]

    def _gold_key(self) -> Optional[str]:
        return next((k for k in GOLD_KEYS if k in self.history), None)

    # ------------------------------------------------------------------ checks
    def _check_kl(self) -> Optional[str]:
        pts = self.history.get(KL_KEY)
        if not pts:
            return None
        budget = self.config.kl_budget
        step, last = pts[-1]
        if not math.isfinite(last):
            return (f"KL to the reference is {last} at step {int(step)}: training diverged "
                    f"numerically; lower the learning rate, check for fp16 overflow, or resume "
                    f"from an earlier checkpoint.")
        recent = self._tail(KL_KEY)
        mean = sum(v for _, v in recent) / len(recent)
        if mean <= budget:
            return ""
        return (f"KL to the reference is {last:.1f} nats/sequence (mean {mean:.1f} over the last "
                f"{len(recent)} steps), above the budget {budget:.1f}: lower the learning rate or "
                f"raise beta (the KL coefficient).")

    def _check_verbosity(self) -> Optional[str]:
        cfg = self.config
        lengths = self._tail(LENGTH_KEY)
        if len(lengths) < cfg.window:
            return None
        lo, hi = lengths[0][0], lengths[-1][0]
        length, reward = fit_trend(lengths), fit_trend(self._span(PROXY_KEY, lo, hi))
        if length is None or reward is None or length.start <= 0:
            return None
        growth = length.change / length.start
        if not (growth > cfg.length_growth and length.t >= cfg.trend_t
                and reward.rising(0.0, cfg.trend_t)):
            return ""
        return (f"Completion length rose {growth:.0%} over steps {int(lo)}-{int(hi)} "
                f"({length.start:.0f} -> {length.end:.0f} tokens) while the reward rose by "
                f"{reward.change:.3g}: the policy may be exploiting a length bias in the reward "
                f"model (verbosity). Check the reward-length correlation, add a length penalty, "
                f"or raise the KL coefficient.")

    def _check_mode_collapse(self) -> Optional[str]:
        cfg = self.config
        pts = [p for p in self.history.get(DIVERSITY_KEY, ()) if math.isfinite(p[1])]
        if len(pts) < cfg.window:
            return None
        base_step, base = pts[0]
        if base <= 0:
            return None
        recent = pts[-cfg.window:]
        current = sum(v for _, v in recent) / len(recent)
        drop = 1.0 - current / base
        if drop <= cfg.diversity_drop:
            return ""
        return (f"Distinct-2 fell to {current:.3f} (mean of the last {len(recent)} steps) from "
                f"{base:.3f} at step {int(base_step)}, a {drop:.0%} drop: samples are collapsing "
                f"onto a few patterns (mode collapse). Raise the KL coefficient or entropy bonus, "
                f"sample at a higher temperature, or stop earlier.")

    def _check_overoptimization(self) -> Optional[str]:
        cfg = self.config
        gold_key = self._gold_key()
        if gold_key is None:
            return None
        golds = self._tail(gold_key)
        if len(golds) < cfg.window:
            return None
        lo, hi = golds[0][0], golds[-1][0]
        gold, proxy = fit_trend(golds), fit_trend(self._span(PROXY_KEY, lo, hi))
        if gold is None or proxy is None:
            return None
        if not (gold.falling(cfg.gold_drop, cfg.trend_t) and proxy.rising(0.0, cfg.trend_t)):
            return ""
        best_step, best = max(
            (p for p in self.history[gold_key] if math.isfinite(p[1])), key=lambda p: p[1])
        return (f"Proxy reward rose by {proxy.change:.3g} over steps {int(lo)}-{int(hi)} while "
                f"the gold reward fell by {-gold.change:.3g} ({gold.start:.3f} -> "
                f"{gold.end:.3f}): the policy is over-optimizing the reward model (Gao et al. "
                f"2022). Stop here or roll back to the best gold reward ({best:.3f} at step "
                f"{int(best_step)}); a larger KL penalty or a better reward model delays this.")

    def _check_likelihood_displacement(self) -> Optional[str]:
        cfg = self.config
        logps = self._tail(CHOSEN_LOGP_KEY)
        if len(logps) < cfg.window:
            return None
        lo, hi = logps[0][0], logps[-1][0]
        chosen, margin = fit_trend(logps), fit_trend(self._span(MARGIN_KEY, lo, hi))
        if chosen is None or margin is None:
            return None
        drop = cfg.logp_drop * max(abs(chosen.start), 1e-6)  # relative -> nats
        if not (chosen.falling(drop, cfg.trend_t) and margin.rising(0.0, cfg.trend_t)):
            return ""
        return (f"The preference margin rose by {margin.change:.3g} over steps {int(lo)}-{int(hi)} "
                f"while the chosen log-probability fell by {-chosen.change:.3g} nats "
                f"({chosen.start:.1f} -> {chosen.end:.1f}): probability is leaving the preferred "
                f"responses too (likelihood displacement; Razin et al. 2024, Pal et al. 2024 "
                f"'Smaug'). Consider DPO-Positive, an SFT term on the chosen responses (RPO), a "
                f"larger beta, or fewer epochs.")
