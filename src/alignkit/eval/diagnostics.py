"""Live failure-mode checks over a run's metric history.

Feed :class:`Diagnostics` one step of logged metrics at a time; it returns the alerts that became
true at that step. Each alert kind fires once, then stays quiet until its condition has cleared
(false for ``clear_after`` consecutive evaluations), so a run that hacks its reward for 500
steps produces one alert, not 500.

Checks (a check whose metric keys never appear is skipped):

``kl_blowup``
    ``kl/ref`` (KL to the reference, nats per sequence), averaged over the last ``window``
    observations, exceeds ``kl_budget``, or is not finite.
``verbosity``
    ``rollout/length_mean`` rises by more than ``length_growth`` (relative) over a trend horizon
    while ``rewards/mean`` rises too: the policy is buying reward with length (reward hacking
    through the reward model's length bias); or the reward's correlation with length
    (``rewards/corr_length``) averaged over the last ``window`` observations exceeds ``marker_corr``
    (Singhal et al. 2023).
``reward_marker``
    the same correlation check for the other probe markers of :mod:`alignkit.eval.markers`:
    hedge phrases, markdown lists and agreement or flattery phrases (``rewards/corr_hedging``,
    ``rewards/corr_list``, ``rewards/corr_agreement``): the reward pays for a surface feature the
    policy can learn instead of the content (Sharma et al. 2023; Zhang et al. 2024).
``mode_collapse``
    ``diversity/distinct_2`` averaged over the window falls below ``(1 - diversity_drop)`` times
    its first observed value.
``overoptimization``
    Proxy reward ``rewards/mean`` rises while the gold reward ``rewards/gold`` (or
    ``eval/rewards/gold``) falls by more than ``gold_drop`` over a horizon of gold observations:
    Goodhart's law as measured by Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization".
``likelihood_displacement``
    DPO ``rewards/margin`` rises while ``logps/chosen`` falls by more than ``logp_drop``
    (relative) over a trend horizon: the preferred responses themselves lose probability
    (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
    Optimization"; Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive").

No-learning checks (each must hold on ``stall_steps`` logged steps in a row):

``zero_grad``
    ``train/grad_norm`` is 0: nothing flows back to the weights.
``stuck_loss``
    ``train/loss`` does not move at all (range below 1e-6 of its size), e.g. a saturated model at
    a huge learning rate whose loss sits at ln V.
``constant_reward``
    every reward equal (``rewards/std`` 0) or every group without variance
    (``rewards/zero_std_groups`` 1): group-relative advantages are all zero, the loss is 0.
``all_truncated``
    ``rollout/eos_rate`` 0: every completion hit ``max_new_tokens``.
``all_masked``
    ``train/units`` 0: every label of the batch is masked, there is no loss to learn from.

``exploding``
    weights or updates growing without a NaN: the root mean square of the trained weights
    (``train/weight_rms``) above ``weight_growth`` times its value before training and above 1
    (healthy weights, LoRA adapters included, stay far below 1; fires at once), or ``train/grad_norm`` above ``grad_growth`` times
    its median over the first ``window`` logged steps.
``heldout_regression``
    held-out accuracy (``eval/accuracy``) more than ``heldout_drop`` below its value before
    training, or the held-out loss (``eval/loss``) more than ``heldout_rise`` (relative) above it,
    *and* the change is significant: a paired t test over the held-out examples (each example's
    value now minus before training, :func:`alignkit.eval.stats.paired_comparison`), whose 95%
    interval must exclude 0, on at least ``heldout_min_examples`` examples. Without per-example
    values (a replay of metrics.jsonl) the check does not judge. Fires at once.

Trends are least-squares lines (:func:`fit_trend`) over two horizons of the main metric: its
last ``window`` observations (sudden changes) and its last ``long_window`` (slow drifts); the
partner metric is fitted over the same steps. A trend counts only when it is large enough (the
fitted change across the horizon passes the threshold) and significant (slope / standard error
>= ``trend_t``), and a condition must hold on ``patience`` consecutive evaluations, so
step-to-step noise does not trigger alerts the way a first-versus-last comparison would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from alignkit.config import ALERT_KINDS, DiagnosticsConfig
from alignkit.eval.stats import paired_comparison
from alignkit.train import metric_keys as K  # a leaf module (no imports of ours): every logged key, defined once

__all__ = ["ALERT_KINDS", "Alert", "Diagnostics", "DiagnosticsConfig", "Trend", "fit_trend"]

Point = Tuple[float, float]  # (step, value)

# the keys the checks read, named after their role here; each is the constant of train/metric_keys.py
DIVERSITY_KEY = K.DISTINCT_2
KL_KEY = K.KL_REF  # nats per sequence in every trainer
LENGTH_KEY = K.LENGTH_MEAN
PROXY_KEY = K.REWARD_MEAN
GOLD_KEYS = (K.REWARD_GOLD, K.held_out(K.REWARD_GOLD))
MARGIN_KEY = K.REWARD_MARGIN
CHOSEN_LOGP_KEY = K.LOGP_CHOSEN
LOSS_KEY = K.TRAIN_LOSS
GRAD_NORM_KEY = K.GRAD_NORM
WEIGHT_RMS_KEY = K.WEIGHT_RMS
UNITS_KEY = K.TRAIN_UNITS
REWARD_STD_KEY = K.REWARD_STD
ZERO_STD_KEY = K.ZERO_STD_GROUPS
EOS_RATE_KEY = K.EOS_RATE
# held-out metrics and the direction that is better: accuracy up, loss down
HELDOUT_ACCURACY_KEYS = (K.held_out(K.ACCURACY), K.held_out(K.REWARD_ACCURACY))
HELDOUT_LOSS_KEYS = (K.held_out(K.LOSS),)

# reward-versus-marker correlations (logged by online RL; alignkit.eval.markers), length first
MARKER_CORR_KEYS = {"length": K.CORR_LENGTH, "hedging": K.CORR_HEDGING, "list": K.CORR_LIST,
                    "agreement": K.CORR_AGREEMENT}


class _Urgent(str):
    """A check message that fires without waiting for ``patience`` (e.g. a nan KL)."""


@dataclass(frozen=True)
class Alert:
    """One detected failure mode: at which step, which check (``kind``) and what to do about it."""

    step: int
    kind: str
    message: str

    def to_dict(self) -> Dict[str, object]:
        """The ``alerts.jsonl`` record: ``{"step", "kind", "message"}``."""
        return asdict(self)


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
        self._streak: Dict[str, int] = {}  # consecutive evaluations each condition has held
        self._quiet: Dict[str, int] = {}  # consecutive evaluations each condition has been false
        # held-out metric -> per-example values (before training, latest) with their steps
        self._examples_first: Dict[str, Tuple[float, List[float]]] = {}
        self._examples_last: Dict[str, Tuple[float, List[float]]] = {}
        # kind -> (metric keys whose arrival triggers the check, check)
        self._checks: Dict[str, Tuple[Tuple[str, ...], Callable[[], Optional[str]]]] = {
            "kl_blowup": ((KL_KEY,), self._check_kl),
            "verbosity": ((LENGTH_KEY, MARKER_CORR_KEYS["length"]), self._check_verbosity),
            "reward_marker": (tuple(v for k, v in MARKER_CORR_KEYS.items() if k != "length"),
                              self._check_reward_markers),
            "mode_collapse": ((DIVERSITY_KEY,), self._check_mode_collapse),
            "overoptimization": (GOLD_KEYS, self._check_overoptimization),
            "likelihood_displacement": ((CHOSEN_LOGP_KEY,), self._check_likelihood_displacement),
            "zero_grad": ((GRAD_NORM_KEY,), self._check_zero_grad),
            "stuck_loss": ((LOSS_KEY,), self._check_stuck_loss),
            "constant_reward": ((REWARD_STD_KEY, ZERO_STD_KEY), self._check_constant_reward),
            "all_truncated": ((EOS_RATE_KEY,), self._check_all_truncated),
            "all_masked": ((UNITS_KEY,), self._check_all_masked),
            "exploding": ((WEIGHT_RMS_KEY, GRAD_NORM_KEY), self._check_exploding),
            "heldout_regression": (HELDOUT_ACCURACY_KEYS + HELDOUT_LOSS_KEYS, self._check_heldout),
        }
        assert set(self._checks) == set(ALERT_KINDS)

    @property
    def active(self) -> frozenset:
        """Alert kinds that fired and whose condition has not cleared since."""
        return frozenset(self._active)

    def set_heldout_baseline(self, examples: Dict[str, Sequence[float]], step: float = 0.0) -> None:
        """The per-example held-out values before training (e.g. read back on resume)."""
        for key, values in examples.items():
            self._examples_first[key] = (float(step), [float(v) for v in values])

    def update(self, step: int, metrics: Dict[str, float],
               examples: Optional[Dict[str, Sequence[float]]] = None) -> List[Alert]:
        """Record ``metrics`` for ``step`` and return the alerts that are new at this step.

        ``examples`` holds per-example values of held-out metrics at this step (``{"eval/accuracy":
        [one value per pair], "eval/loss": [...]}``, the same examples in the same order at every
        evaluation); the held-out check tests a drop with them, paired by example.

        A check runs when its main metric is in ``metrics`` (so a sparse eval metric is judged
        once per new value). It returns a message (condition holds), ``""`` (it does not: the
        kind clears after ``clear_after`` such answers in a row and may then fire again) or None
        (not enough data: state unchanged). An alert fires once its condition has held for
        ``patience`` consecutive evaluations, or at once for an urgent one such as a nan KL.
        """
        for key, value in metrics.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.history.setdefault(key, []).append((float(step), float(value)))
        for key, values in (examples or {}).items():
            vals = (float(step), [float(v) for v in values])
            self._examples_first.setdefault(key, vals)
            self._examples_last[key] = vals
        new: List[Alert] = []
        for kind, (keys, check) in self._checks.items():
            if not any(k in metrics for k in keys):
                continue
            message = check()
            if message is None:
                continue
            if not message:
                self._streak[kind] = 0
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                if self._quiet[kind] >= self.config.clear_after:
                    self._active.discard(kind)
                continue
            self._quiet[kind] = 0
            self._streak[kind] = self._streak.get(kind, 0) + 1
            ready = self._streak[kind] >= self.config.patience or isinstance(message, _Urgent)
            if kind not in self._active and ready:
                self._active.add(kind)
                new.append(Alert(int(step), kind, str(message)))
        self.alerts.extend(new)
        return new

    def replay(self, records: Iterable[Dict[str, float]]) -> List[Alert]:
        """Run :meth:`update` over ``metrics.jsonl`` records (each with a ``step`` key)."""
        out: List[Alert] = []
        for i, rec in enumerate(records):
            out += self.update(int(rec.get("step", i)), rec)
        return out

    # ------------------------------------------------------------------ helpers
    def _last(self, key: str, k: int) -> List[Point]:
        """The last ``k`` finite observations of ``key`` (scans back from the end: O(k))."""
        out: List[Point] = []
        for p in reversed(self.history.get(key, ())):
            if len(out) >= k:
                break
            if math.isfinite(p[1]):
                out.append(p)
        return out[::-1]

    def _span(self, key: str, lo: float, hi: float) -> List[Point]:
        """Finite observations of ``key`` with lo <= step <= hi (steps assumed non-decreasing)."""
        out: List[Point] = []
        for p in reversed(self.history.get(key, ())):
            if p[0] < lo:
                break
            if p[0] <= hi and math.isfinite(p[1]):
                out.append(p)
        return out[::-1]

    def _horizons(self, key: str) -> List[List[Point]]:
        """Stretches of ``key`` to fit trends on: the last ``window`` observations (sudden
        changes) and the last ``long_window`` (slow drifts). Empty until ``window`` exist."""
        cfg = self.config
        longest = self._last(key, max(cfg.window, cfg.long_window))
        if len(longest) < cfg.window:
            return []
        short = longest[-cfg.window:]
        return [short, longest] if len(longest) > cfg.window else [short]

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
            return _Urgent(f"KL to the reference is {last} at step {int(step)}: training "
                           f"diverged numerically; lower the learning rate, check for fp16 "
                           f"overflow, or resume from an earlier checkpoint.")
        recent = self._last(KL_KEY, self.config.window)
        mean = sum(v for _, v in recent) / len(recent)
        if mean <= budget:
            return ""
        return (f"KL to the reference is {last:.1f} nats/sequence (mean {mean:.1f} over the last "
                f"{len(recent)} steps), above the budget {budget:.1f}: lower the learning rate or "
                f"raise beta (the KL coefficient).")

    def _marker_correlation(self, markers: Sequence[str]) -> Optional[str]:
        """The alert message when the reward's correlation with one of ``markers``, averaged over its
        last ``window`` observations, exceeds ``marker_corr``; "" when none does; None before any has
        ``window`` observations. One check for every probe marker (length, hedging, list, agreement)."""
        cfg = self.config
        judged = None
        for marker in markers:
            recent = self._last(MARKER_CORR_KEYS[marker], cfg.window)
            if len(recent) < cfg.window:
                continue
            judged = ""
            mean = sum(v for _, v in recent) / len(recent)
            if mean > cfg.marker_corr:
                what = {"length": "response length", "hedging": "hedge phrases ('I might be wrong')",
                        "list": "markdown lists", "agreement": "agreement and flattery phrases"}[marker]
                return (f"The reward correlates with {what} (mean correlation {mean:.2f} over steps "
                        f"{int(recent[0][0])}-{int(recent[-1][0])}, above {cfg.marker_corr:g}): the reward "
                        f"pays for a surface feature, which the policy can learn instead of the content. "
                        f"Run `alignkit probe` on the reward model, add a penalty for the marker, or raise "
                        f"the KL coefficient.")
        return judged

    def _check_reward_markers(self) -> Optional[str]:
        return self._marker_correlation([m for m in MARKER_CORR_KEYS if m != "length"])

    def _check_verbosity(self) -> Optional[str]:
        cfg = self.config
        corr = self._marker_correlation(["length"])
        if corr:
            return corr
        horizons = self._horizons(LENGTH_KEY)
        if not horizons:
            return corr
        for pts in horizons:
            lo, hi = pts[0][0], pts[-1][0]
            length, reward = fit_trend(pts), fit_trend(self._span(PROXY_KEY, lo, hi))
            if length is None or reward is None or length.start <= 0:
                continue
            growth = length.change / length.start
            if growth > cfg.length_growth and length.t >= cfg.trend_t and reward.rising(0.0, cfg.trend_t):
                return (f"Completion length rose {growth:.0%} over steps {int(lo)}-{int(hi)} "
                        f"({length.start:.0f} -> {length.end:.0f} tokens) while the reward rose "
                        f"by {reward.change:.3g}: the policy may be exploiting a length bias in "
                        f"the reward model (verbosity). Check the reward-length correlation, add "
                        f"a length penalty, or raise the KL coefficient.")
        return ""

    def _check_mode_collapse(self) -> Optional[str]:
        cfg = self.config
        first = next((p for p in self.history.get(DIVERSITY_KEY, ()) if math.isfinite(p[1])), None)
        recent = self._last(DIVERSITY_KEY, cfg.window)
        if first is None or len(recent) < cfg.window or first[1] <= 0:
            return None
        base_step, base = first
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
        horizons = self._horizons(gold_key) if gold_key else []
        if not horizons:
            return None
        for pts in horizons:
            lo, hi = pts[0][0], pts[-1][0]
            gold, proxy = fit_trend(pts), fit_trend(self._span(PROXY_KEY, lo, hi))
            if gold is None or proxy is None:
                continue
            if gold.falling(cfg.gold_drop, cfg.trend_t) and proxy.rising(0.0, cfg.trend_t):
                best_step, best = max(
                    (p for p in self.history[gold_key] if math.isfinite(p[1])), key=lambda p: p[1])
                return (f"Proxy reward rose by {proxy.change:.3g} over steps {int(lo)}-{int(hi)} "
                        f"while the gold reward fell by {-gold.change:.3g} ({gold.start:.3f} -> "
                        f"{gold.end:.3f}): the policy is over-optimizing the reward model (Gao et "
                        f"al. 2022). Stop here or roll back to the best gold reward ({best:.3f} at "
                        f"step {int(best_step)}); a larger KL penalty or a better reward model "
                        f"delays this.")
        return ""

    # ------------------------------------------------------------------ no-learning checks
    def _stalled(self, key: str, pred: Callable[[float], bool]) -> Optional[bool]:
        """Whether ``pred`` holds on each of the last ``stall_steps`` observations of ``key`` (None
        until there are that many)."""
        n = self.config.stall_steps
        pts = self.history.get(key, [])[-n:]
        if len(pts) < n:
            return None
        return all(math.isfinite(v) and pred(v) for _, v in pts)

    def _check_zero_grad(self) -> Optional[str]:
        held = self._stalled(GRAD_NORM_KEY, lambda v: v <= 1e-12)
        if held is None:
            return None
        if not held:
            return ""
        return _Urgent(f"The gradient norm has been 0 for {self.config.stall_steps} logged steps: nothing is "
                       f"learned. Check that the loss depends on trainable weights (LoRA targets, frozen "
                       f"layers), that labels are not all masked, and that the learning rate is sane "
                       f"(a huge one saturates the model).")

    def _check_stuck_loss(self) -> Optional[str]:
        n = self.config.stall_steps
        pts = self._last(LOSS_KEY, n)
        if len(pts) < n or len(self.history.get(LOSS_KEY, [])) < n:
            return None
        vals = [v for _, v in pts]
        if max(vals) - min(vals) > 1e-6 * max(1.0, abs(vals[-1])):
            return ""
        return _Urgent(f"The training loss has stayed at {vals[-1]:.6g} for {n} logged steps: the model is "
                       f"not learning (a loss stuck at ln(vocabulary size) means a uniform, saturated "
                       f"output, typical of a far too high learning rate). Lower optim.lr or check the data.")

    def _check_constant_reward(self) -> Optional[str]:
        n = self.config.stall_steps
        same = self._stalled(REWARD_STD_KEY, lambda v: v <= 1e-12)
        flat = self._stalled(ZERO_STD_KEY, lambda v: v >= 1.0 - 1e-9)
        if same is None and flat is None:
            return None
        if same:
            return _Urgent(f"Every reward has been equal for {n} logged steps (rewards/std = 0): advantages are "
                           f"zero and nothing is learned. Check the reward function (does it ever return "
                           f"different values?), its inputs, and max_new_tokens.")
        if flat:
            return _Urgent(f"Every prompt's group of samples has had equal rewards for {n} logged steps "
                           f"(rewards/zero_std_groups = 1): group-relative advantages are zero and the loss "
                           f"is 0. Use a reward with more resolution, harder/easier prompts, more samples "
                           f"per prompt, or dynamic sampling.")
        return ""

    def _zero_for_stall(self, key: str, message: str) -> Optional[str]:
        """The alert ``message`` once ``key`` has been 0 for ``stall_steps`` logged steps; "" while it has
        not; None before the key is logged at all."""
        held = self._stalled(key, lambda v: v <= 0.0)
        if held is None:
            return None
        return _Urgent(message) if held else ""

    def _check_all_truncated(self) -> Optional[str]:
        return self._zero_for_stall(
            EOS_RATE_KEY,
            f"Every completion has been cut at max_new_tokens for {self.config.stall_steps} logged "
            f"steps (rollout/eos_rate = 0): no sample ends, so rewards judge unfinished text. "
            f"Raise generation.max_new_tokens or check the stop/EOS token.")

    def _check_all_masked(self) -> Optional[str]:
        return self._zero_for_stall(
            UNITS_KEY,
            f"Every label has been masked for {self.config.stall_steps} logged steps (0 loss tokens "
            f"per update): there is nothing to learn from. Check the chat template / response "
            f"masking and data.max_length (prompts may fill the whole length).")

    def _check_exploding(self) -> Optional[str]:
        cfg = self.config
        weights = [p for p in self.history.get(WEIGHT_RMS_KEY, []) if math.isfinite(p[1])]
        if len(weights) >= 2 and weights[0][1] > 0 and weights[-1][1] > max(cfg.weight_growth * weights[0][1], 1.0):
            (s0, w0), (s1, w1) = weights[0], weights[-1]
            return _Urgent(f"The weights' root mean square grew from {w0:.4g} (step {int(s0)}) to {w1:.4g} (step {int(s1)}), "
                           f"{w1 / w0:.1f}x, without a NaN: the updates are far too large. Lower optim.lr "
                           f"(and check optim.max_grad_norm).")
        grads = [p for p in self.history.get(GRAD_NORM_KEY, []) if math.isfinite(p[1])]
        if len(grads) > cfg.window:
            base = sorted(v for _, v in grads[:cfg.window])[cfg.window // 2]
            step, last = grads[-1]
            if base > 0 and last > cfg.grad_growth * base:
                return (f"The gradient norm is {last:.4g} at step {int(step)}, {last / base:.0f}x its early "
                        f"median {base:.4g}: the updates are exploding without a NaN. Lower optim.lr, keep "
                        f"optim.max_grad_norm set, or use fp32.")
        if len(weights) < 2 and len(grads) <= cfg.window:
            return None
        return ""

    def _check_heldout(self) -> Optional[str]:
        """A held-out metric worse than before training by more than the threshold, significantly
        (paired t test over the examples); None while no metric has per-example values at two steps."""
        found = None
        for key in HELDOUT_ACCURACY_KEYS + HELDOUT_LOSS_KEYS:
            pts = [p for p in self.history.get(key, []) if math.isfinite(p[1])]
            if len(pts) < 2:
                continue
            message = self._heldout_drop(key, pts[0], pts[-1])
            if message is None:
                continue
            if message:
                return _Urgent(message)
            found = ""
        return found

    def _heldout_drop(self, key: str, first_pt: Point, last_pt: Point) -> Optional[str]:
        """The alert message for ``key`` (accuracy: lower is worse; loss: higher is worse), "" when
        there is no significant drop, None when the per-example values needed for the test are missing."""
        cfg = self.config
        first, last = self._examples_first.get(key), self._examples_last.get(key)
        if first is None or last is None or last[0] != last_pt[0] or last[0] == first[0]:
            return None
        a, b = first[1], last[1]
        if len(a) != len(b):  # not the same examples: no paired test
            return None
        n = len(a)
        if n < cfg.heldout_min_examples:
            return ""
        pc = paired_comparison(a, b)
        d = pc.diff
        (s0, v0), (s1, v1) = first_pt, last_pt
        test = (f"paired t test over {n} held-out examples: change {d.mean:+.3g}, 95% interval {d.lo:+.3g} to "
                f"{d.hi:+.3g}, p={pc.p_value:.2g}; the check needs at least {cfg.heldout_min_examples} examples")
        if key in HELDOUT_ACCURACY_KEYS:
            if not (v0 - v1 > cfg.heldout_drop and d.hi < 0):
                return ""
            return (f"Held-out accuracy ({key}) fell from {v0:.3f} at step {int(s0)} to {v1:.3f} at step {int(s1)} "
                    f"({test}): training made the model worse on data it did not see. Lower the learning rate, "
                    f"train fewer steps, check the data for label noise, or compare against the checkpoint before.")
        rise = (v1 - v0) / max(abs(v0), 1e-8)
        if not (rise > cfg.heldout_rise and d.lo > 0):
            return ""
        return (f"The held-out loss ({key}) rose from {v0:.4g} at step {int(s0)} to {v1:.4g} at step {int(s1)} "
                f"(+{rise:.0%}; {test}): training made the model worse on data it did not see (overfitting or "
                f"a bad learning rate). Lower the learning rate, train fewer steps or add data.")

    def _check_likelihood_displacement(self) -> Optional[str]:
        cfg = self.config
        horizons = self._horizons(CHOSEN_LOGP_KEY)
        if not horizons:
            return None
        for pts in horizons:
            lo, hi = pts[0][0], pts[-1][0]
            chosen, margin = fit_trend(pts), fit_trend(self._span(MARGIN_KEY, lo, hi))
            if chosen is None or margin is None:
                continue
            drop = cfg.logp_drop * max(abs(chosen.start), 1e-6)  # relative -> nats
            if chosen.falling(drop, cfg.trend_t) and margin.rising(0.0, cfg.trend_t):
                return (f"The preference margin rose by {margin.change:.3g} over steps "
                        f"{int(lo)}-{int(hi)} while the chosen log-probability fell by "
                        f"{-chosen.change:.3g} nats ({chosen.start:.1f} -> {chosen.end:.1f}): "
                        f"probability is leaving the preferred responses too (likelihood "
                        f"displacement; Razin et al. 2024, Pal et al. 2024 'Smaug'). Consider "
                        f"DPO-Positive, an SFT term on the chosen responses (RPO), a larger beta, "
                        f"or fewer epochs.")
        return ""

    # ------------------------------------------------------------------ end of a run
    def end_of_run(self, step: int) -> List[Alert]:
        """No-learning alerts for a run that ends now, however short it was (issue 31): each of
        ``zero_grad``, ``constant_reward``, ``all_truncated`` and ``all_masked`` whose condition held on
        *every* logged observation of the run so far (at least one) and that has not fired yet, e.g.
        because the run logged fewer than ``stall_steps`` steps. The live checks wait for ``stall_steps``
        so that a brief zero does not alarm a long run; a run that ends with the condition never once
        broken has learned nothing from it, whatever its length. Returned alerts are recorded in
        :attr:`alerts` and marked active, like live ones. ``stuck_loss`` is not judged here: a few equal
        losses in a short run do not show that nothing moved."""
        new: List[Alert] = []
        for kind, message in _end_checks(self.history):
            if kind in self._active or message is None:
                continue
            self._active.add(kind)
            new.append(Alert(int(step), kind, message))
        self.alerts.extend(new)
        return new


def _held_throughout(history: Dict[str, List[Point]], key: str, pred: Callable[[float], bool]) -> Optional[int]:
    """The number of observations of ``key`` when ``pred`` held on every one of them (all finite), else
    None (also when ``key`` was never logged)."""
    pts = history.get(key, [])
    if not pts or not all(math.isfinite(v) and pred(v) for _, v in pts):
        return None
    return len(pts)


def _end_checks(history: Dict[str, List[Point]]) -> List[Tuple[str, Optional[str]]]:
    """(kind, message or None) of the no-learning conditions judged at the end of a run by
    :meth:`Diagnostics.end_of_run`; the thresholds are those of the live checks."""
    def whole(n: int) -> str:
        return f"in all {n} logged step{'s' if n != 1 else ''} of this run"

    out: List[Tuple[str, Optional[str]]] = []
    n = _held_throughout(history, GRAD_NORM_KEY, lambda v: v <= 1e-12)
    out.append(("zero_grad", None if n is None else
                f"The run ended with a gradient norm of 0 {whole(n)}: nothing was learned. Check that the loss "
                f"depends on trainable weights (LoRA targets, frozen layers), that labels are not all masked, "
                f"and that the rewards differ."))
    same = _held_throughout(history, REWARD_STD_KEY, lambda v: v <= 1e-12)
    flat = _held_throughout(history, ZERO_STD_KEY, lambda v: v >= 1.0 - 1e-9)
    if same is not None:
        msg: Optional[str] = (f"The run ended with every reward equal {whole(same)} (rewards/std = 0): advantages "
                              f"were zero and nothing was learned. Check the reward function (does it ever return "
                              f"different values?), its inputs, and max_new_tokens.")
    elif flat is not None:
        msg = (f"The run ended with equal rewards within every prompt's group {whole(flat)} "
               f"(rewards/zero_std_groups = 1): group-relative advantages were zero and nothing was learned. Use "
               f"a reward with more resolution, other prompts, more samples per prompt, or dynamic sampling.")
    else:
        msg = None
    out.append(("constant_reward", msg))
    n = _held_throughout(history, EOS_RATE_KEY, lambda v: v <= 0.0)
    out.append(("all_truncated", None if n is None else
                f"The run ended with every completion cut at max_new_tokens {whole(n)} (rollout/eos_rate = 0): "
                f"rewards judged unfinished text. Raise generation.max_new_tokens or check the stop/EOS token."))
    n = _held_throughout(history, UNITS_KEY, lambda v: v <= 0.0)
    out.append(("all_masked", None if n is None else
                f"The run ended with every label masked {whole(n)} (0 loss tokens per update): there was nothing "
                f"to learn from. Check the chat template / response masking and data.max_length."))
    return out
