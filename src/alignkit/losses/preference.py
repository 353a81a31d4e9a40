"""Offline preference losses: the DPO family (DPO, cDPO, robust DPO, IPO, SLiC hinge, SimPO, ORPO)
and KTO (unpaired), as pure functions filed in :data:`PREFERENCE_LOSSES`.

Conventions shared by every paired loss here (one call shape, so a trainer dispatches by name):

``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
chosen_lengths=None, rejected_lengths=None, labels=None, **hparams) -> LossOutput``

* ``*_logps`` ``(B,)``: **summed** log-probs of the response tokens (prompt and padding excluded).
  ``ref_*`` may be ``None`` for reference-free losses (``needs_reference=False``); a loss that
  needs them raises ``ValueError`` when they are missing.
* ``chosen_lengths`` / ``rejected_lengths`` ``(B,)``: response token counts. Required by the
  ``length_normalized=True`` losses (ipo, simpo, orpo), ignored by the others.
* ``labels`` ``(B,)`` in ``[0, 1]``: soft probability that "chosen" really is preferred
  (1.0 = hard label). Honoured by the losses in :data:`SOFT_LABEL_LOSSES` (dpo, cdpo); every
  other loss treats the pair as hard-labelled and ignores it (values are not checked, to avoid
  a device sync).
* ``**hparams``: each loss declares its own keyword hyper-parameters (see :func:`loss_hparams`);
  an unknown name raises ``TypeError`` rather than being silently dropped.
* Output: ``losses`` ``(B,)``, unreduced; ``metrics`` detached ``(B,)`` tensors (or scalars),
  at least ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (chosen - rejected) and
  ``rewards/accuracy`` (1.0 where the chosen reward is larger, 0.5 on a tie: the one accuracy
  definition used everywhere in alignkit, so a policy equal to its reference scores 0.5).

Notation: ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, the DPO log-ratio
margin, and ``sigma`` the logistic function (computed as ``F.logsigmoid`` throughout).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from alignkit.losses.base import LossOutput, Registry

Tensor = torch.Tensor

#: Preference losses by name; see the module docstring for the shared call shape.
PREFERENCE_LOSSES = Registry("preference")

#: Losses that use ``labels`` (soft preference probabilities); the others treat pairs as hard.
SOFT_LABEL_LOSSES = frozenset({"dpo", "cdpo"})

# keyword arguments that are data, not hyper-parameters (excluded by loss_hparams)
_DATA_KWARGS = frozenset({"chosen_lengths", "rejected_lengths", "labels", "kl_policy_logps", "kl_ref_logps"})


# ----------------------------------------------------------------------------------------- helpers

def _check_same_shape(**tensors: Optional[Tensor]) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape (B,), got {shapes}")


def _require_reference(name: str, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor]) -> None:
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"preference loss {name!r} needs ref_chosen_logps and ref_rejected_logps")


def _mean_logps(name: str, logps: Tensor, lengths: Optional[Tensor], which: str) -> Tensor:
    """Per-token average log-prob ``(B,)``: summed log-probs / response length (clamped to >= 1)."""
    if lengths is None:
        raise ValueError(f"preference loss {name!r} is length-normalized: pass {which}_lengths (B,)")
    _check_same_shape(logps=logps, lengths=lengths)
    return logps / lengths.to(logps.dtype).clamp(min=1.0)


def _check_beta(name: str, beta: float) -> None:
    """Every loss of this family needs ``beta > 0``: beta scales the implicit reward, so beta < 0 trains
    the reverse preference (the rejected response up) with metrics that look normal, and 0 learns nothing."""
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0 (a negative beta trains the reverse preference, "
                         f"0 learns nothing), got {beta}")


def _check_epsilon(name: str, eps: float, upper_inclusive: bool) -> None:
    ok = 0.0 <= eps <= 0.5 if upper_inclusive else 0.0 <= eps < 0.5
    if not ok:
        bound = "]" if upper_inclusive else ")"
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5{bound}, got {eps}")


def _reward_metrics(chosen: Tensor, rejected: Tensor) -> Dict[str, Tensor]:
    """The four shared metrics from per-example implicit rewards ``(B,)`` (detached here)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype) + 0.5 * (chosen == rejected).to(chosen.dtype),
    }


def _soft_logistic(z: Tensor, p: Optional[Tensor]) -> Tensor:
    """``-p log sigma(z) - (1-p) log sigma(-z)`` ``(B,)``; ``p=None`` means hard (``p=1``)."""
    if p is None:
        return -F.logsigmoid(z)
    p = p.to(z.dtype)
    return -p * F.logsigmoid(z) - (1.0 - p) * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    # log(-expm1(x)) is accurate near 0, log1p(-exp(x)) for very negative x; both branches are finite
    # for x < 0, so torch.where's backward never multiplies a zero by an inf
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def loss_hparams(name: str) -> Dict[str, Any]:
    """Hyper-parameter names and defaults of a registered loss, e.g. ``{'beta': 2.0, 'gamma': 0.5}``.

    For config validation: pass only these as ``**hparams``. Raises ``ValueError`` for unknown names.
    """
    fn = PREFERENCE_LOSSES.get(name).fn
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _DATA_KWARGS}


# ---------------------------------------------------------------------------------- reference-based

def _dpo_margin(name: str, pc: Tensor, pr: Tensor, rc: Optional[Tensor], rr: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor]:
    """Log-ratios ``log pi - log ref`` for chosen and rejected, each ``(B,)``."""
    _require_reference(name, rc, rr)
    _check_same_shape(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                      ref_rejected_logps=rr)
    return pc - rc, pr - rr


@PREFERENCE_LOSSES.register("dpo")
def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
        ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
        chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
        labels: Optional[Tensor] = None, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO: ``-log sigma(beta * h)`` (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    Soft labels and label smoothing combine into one target ``q = p (1 - eps) + (1 - p) eps``:
    ``loss = -q log sigma(beta h) - (1 - q) log sigma(-beta h)``; with ``p = 1`` this is cDPO and
    with ``eps = 0`` too it is plain DPO. ``label_smoothing`` in ``[0, 0.5]``.

    Shapes: all log-prob inputs ``(B,)`` summed over response tokens; ``labels`` ``(B,)`` or None.
    Returns ``losses (B,)``; rewards are ``beta * (log pi - log ref)`` per response.
    """
    _check_beta("dpo", beta)
    _check_epsilon("dpo", label_smoothing, upper_inclusive=True)
    chosen_ratio, rejected_ratio = _dpo_margin("dpo", policy_chosen_logps, policy_rejected_logps,
                                               ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,) beta * h
    if labels is None and label_smoothing == 0.0:
        losses = -F.logsigmoid(logits)
    else:
        p = torch.ones_like(logits) if labels is None else labels.to(logits.dtype)
        q = p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing  # (B,) smoothed target
        losses = _soft_logistic(logits, q)
    return LossOutput(losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio))


@PREFERENCE_LOSSES.register("cdpo")
def cdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
         ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
         chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
         labels: Optional[Tensor] = None, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO: ``(1 - eps)(-log sigma(beta h)) + eps (-log sigma(-beta h))``.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (the DPO loss of
    Rafailov et al. 2023 eq. 7 with labels flipped with probability ``eps``). Identical to
    :func:`dpo_loss` with ``label_smoothing=eps`` (default 0.1 here, 0 in dpo), soft labels included.
    Shapes as in :func:`dpo_loss`.
    """
    _check_beta("cdpo", beta)
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               labels=labels, beta=beta, label_smoothing=label_smoothing)


@PREFERENCE_LOSSES.register("robust")
def robust_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
           ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
           chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
           labels: Optional[Tensor] = None, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (rDPO): ``[(1 - eps)(-log sigma(beta h)) - eps (-log sigma(-beta h))] / (1 - 2 eps)``.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", Sec. 3 (the de-biased loss for preference flips with known rate ``eps``). Unbiased
    for the clean DPO loss; note a single example's loss can be negative when ``eps > 0``.
    ``label_smoothing`` (the flip rate ``eps``) must be in ``[0, 0.5)``. ``labels`` are treated as
    hard. Shapes as in :func:`dpo_loss`.
    """
    _check_beta("robust", beta)
    _check_epsilon("robust", label_smoothing, upper_inclusive=False)
    chosen_ratio, rejected_ratio = _dpo_margin("robust", policy_chosen_logps, policy_rejected_logps,
                                               ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    eps = label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return LossOutput(losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio))


@PREFERENCE_LOSSES.register("ipo", length_normalized=True)
def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
        ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
        chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
        labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """IPO: ``(h - 1/(2 tau))^2`` with ``tau = beta`` (Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences", eq. 17).

    ``h`` is computed on **length-averaged** log-ratios, ``(log pi(y) - log ref(y)) / |y|``, so
    ``chosen_lengths`` and ``rejected_lengths`` ``(B,)`` are required. ``labels`` treated as hard.
    Rewards are ``beta * `` the averaged log-ratios. Shapes: inputs ``(B,)``, ``losses (B,)``.
    """
    _check_beta("ipo", beta)
    _require_reference("ipo", ref_chosen_logps, ref_rejected_logps)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_ratio = _mean_logps("ipo", policy_chosen_logps - ref_chosen_logps, chosen_lengths, "chosen")
    rejected_ratio = _mean_logps("ipo", policy_rejected_logps - ref_rejected_logps, rejected_lengths,
                                 "rejected")
    h = chosen_ratio - rejected_ratio  # (B,)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio))


@PREFERENCE_LOSSES.register("hinge")
def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
          ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
          chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
          labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """SLiC hinge: ``max(0, 1 - beta * h)``.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", eq. 1 (the
    calibration loss ``max(0, delta - log pi(y_w) + log pi(y_l))``), in the reference-normalized
    form of Liu et al. 2024 ("Statistical Rejection Sampling Improves Preference Optimization",
    hinge-norm), i.e. ``delta = 1/beta`` after scaling. Zero loss and zero gradient once
    ``beta h >= 1``. ``labels`` treated as hard. Shapes as in :func:`dpo_loss`.
    """
    _check_beta("hinge", beta)
    chosen_ratio, rejected_ratio = _dpo_margin("hinge", policy_chosen_logps, policy_rejected_logps,
                                               ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))  # (B,)
    return LossOutput(losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio))


# ----------------------------------------------------------------------------------- reference-free

@PREFERENCE_LOSSES.register("simpo", needs_reference=False, length_normalized=True)
def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
          ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None, *,
          chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
          labels: Optional[Tensor] = None, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO: ``-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6. ``gamma`` is a target margin on the reward scale (not divided by beta). Reference-free:
    ``ref_*`` are ignored. Needs ``chosen_lengths``/``rejected_lengths`` ``(B,)``. ``labels``
    treated as hard. Rewards are ``beta * mean log-prob`` (eq. 4); ``rewards/margin`` excludes gamma.
    """
    _check_beta("simpo", beta)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_rewards = beta * _mean_logps("simpo", policy_chosen_logps, chosen_lengths, "chosen")
    rejected_rewards = beta * _mean_logps("simpo", policy_rejected_logps, rejected_lengths, "rejected")
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,)
    return LossOutput(losses, _reward_metrics(chosen_rewards, rejected_rewards))


@PREFERENCE_LOSSES.register("orpo", needs_reference=False, length_normalized=True)
def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
         ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None, *,
         chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
         labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """ORPO: ``nll(y_w) + beta * -log sigma(log odds(y_w) - log odds(y_l))``.

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eq. 6 (total = SFT term + lambda * L_OR, ``beta`` plays lambda) and eq. 7 (L_OR). With
    ``m = log pi(y) / |y|`` (per-token mean log-prob), ``log odds(y) = m - log(1 - exp(m))``,
    computed with a stable ``log1mexp``; ``m`` is clamped just below 0 (to ``-finfo.eps``) so a
    fully confident response cannot give ``inf``. ``nll = -policy_chosen_logps / chosen_lengths``.
    The SFT term is **included** in ``losses`` (do not add another SFT weight for it).
    Reference-free: ``ref_*`` ignored. Needs lengths ``(B,)``. ``labels`` treated as hard.

    Metrics: ``rewards/*`` are the mean log-probs ``m`` (unscaled; log-odds are monotone in ``m``,
    so ``rewards/accuracy`` is also the odds-ratio accuracy), ``orpo/nll`` and
    ``orpo/log_odds_ratio`` ``(B,)``.
    """
    _check_beta("orpo", beta)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_mean = _mean_logps("orpo", policy_chosen_logps, chosen_lengths, "chosen")  # (B,)
    rejected_mean = _mean_logps("orpo", policy_rejected_logps, rejected_lengths, "rejected")  # (B,)
    tiny = -torch.finfo(chosen_mean.dtype).eps
    cm, rm = chosen_mean.clamp(max=tiny), rejected_mean.clamp(max=tiny)
    log_odds_ratio = (cm - _log1mexp(cm)) - (rm - _log1mexp(rm))  # (B,)
    or_term = -F.logsigmoid(log_odds_ratio)
    nll = -chosen_mean
    metrics = _reward_metrics(chosen_mean, rejected_mean)
    metrics["orpo/nll"] = nll.detach()
    metrics["orpo/log_odds_ratio"] = log_odds_ratio.detach()
    return LossOutput(nll + beta * or_term, metrics)


# -------------------------------------------------------------------------------------------- KTO

@PREFERENCE_LOSSES.register("kto", paired=False)
def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, kl_policy_logps: Tensor,
        kl_ref_logps: Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8).

    Unpaired: ``policy_logps``, ``ref_logps`` ``(B,)`` summed response log-probs; ``labels``
    ``(B,)`` bool (True = desirable). With ``r = policy - ref`` and the reference point
    ``z0 = max(0, mean(kl_policy_logps - kl_ref_logps))`` (detached, a scalar):

    * desirable:   ``lambda_D * (1 - sigma(beta (r - z0)))``
    * undesirable: ``lambda_U * (1 - sigma(beta (z0 - r)))``

    ``kl_*`` ``(M,)`` are log-probs of mismatched (prompt, completion) pairs; ``M`` need not equal
    ``B``, so under data parallelism pass the all-gathered tensors to share one ``z0``.
    Metrics: ``rewards/implicit`` ``(B,)`` = ``beta * r``, ``kto/desirable`` ``(B,)`` 1.0/0.0 (to
    average rewards per class), scalar ``kto/z0``.
    """
    _check_beta("kto", beta)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    _check_same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    desirable = labels.bool()  # (B,)
    # reference point: a batch estimate of KL(pi || ref); no gradient flows through it (eq. 8 text)
    z0 = (kl_policy_logps - kl_ref_logps).detach().mean().clamp(min=0.0)  # ()
    r = policy_logps - ref_logps  # (B,)
    sign = torch.where(desirable, 1.0, -1.0).to(r.dtype)  # (B,) +1 for desirable
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)  # (B,)
    losses = weight * (1.0 - torch.sigmoid(beta * sign * (r - z0)))
    metrics = {"rewards/implicit": (beta * r).detach(), "kto/desirable": desirable.to(r.dtype),
               "kto/z0": z0}
    return LossOutput(losses, metrics)


# ------------------------------------------------------------------------------------ combinations

def nll_term(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> LossOutput:
    """Per-token-mean NLL of the chosen response, ``-log pi(y_w) / |y_w|`` ``(B,)``.

    The optional SFT term added to a preference loss (e.g. RPO, Pang et al. 2024), meant for
    :func:`combine`. Metric ``sft/nll`` ``(B,)``.
    """
    nll = -_mean_logps("nll_term", policy_chosen_logps, chosen_lengths, "chosen")
    return LossOutput(nll, {"sft/nll": nll.detach()})


def combine(outputs: Sequence[Tuple[float, LossOutput]], *,
            names: Optional[Sequence[str]] = None) -> LossOutput:
    """Weighted sum of loss terms: ``losses = sum_i w_i * losses_i`` ``(B,)``.

    ``names`` (default ``term0``, ``term1``, ...) label the terms. Metric keys that occur in only
    one term keep their name; a key that occurs in several is prefixed by each term's name
    (``dpo/rewards/margin``, ``sft/rewards/margin``). Each term's unweighted losses are also
    reported as ``<name>/loss``. Example::

        combine([(1.0, dpo_loss(...)), (0.2, nll_term(pc, lc))], names=["dpo", "sft"])
    """
    if not outputs:
        raise ValueError("combine needs at least one (weight, LossOutput) term")
    names = [f"term{i}" for i in range(len(outputs))] if names is None else list(names)
    if len(names) != len(outputs) or len(set(names)) != len(names):
        raise ValueError(f"combine: need one distinct name per term, got {names} for {len(outputs)} terms")
    _check_same_shape(**{n: out.losses for n, (_, out) in zip(names, outputs)})
    counts: Dict[str, int] = {}
    for _, out in outputs:
        for key in out.metrics:
            counts[key] = counts.get(key, 0) + 1
    total: Optional[Tensor] = None
    metrics: Dict[str, Tensor] = {}
    for name, (weight, out) in zip(names, outputs):
        term = weight * out.losses
        total = term if total is None else total + term
        for key, value in out.metrics.items():
            metrics[f"{name}/{key}" if counts[key] > 1 else key] = value
        metrics[f"{name}/loss"] = out.losses.detach()
    return LossOutput(total, metrics)


# the helpers, and the losses this module registered, read from the registry (no list to extend)
__all__: List[str] = ["PREFERENCE_LOSSES", "SOFT_LABEL_LOSSES", "loss_hparams", "nll_term", "combine"] + sorted(
    spec.fn.__name__ for _, spec in PREFERENCE_LOSSES.items() if spec.fn.__module__ == __name__)
