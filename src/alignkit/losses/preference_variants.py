"""More paired preference losses, filed in the same registry as DPO (:data:`PREFERENCE_LOSSES`).

The losses TRL 1.16 offers as ``DPOConfig.loss_type`` beyond those in
:mod:`alignkit.losses.preference`, each under TRL's name, each a pure function with the shared call
shape (see that module's docstring): summed response log-probs ``(B,)`` in, ``LossOutput`` with
``losses (B,)`` out. Notation as there: ``a = log pi(y_w) - log ref(y_w)`` and
``b = log pi(y_l) - log ref(y_l)`` (the chosen and rejected log-ratios), ``h = a - b``, ``sigma`` the
logistic function.

Two losses here are **batch-level**: ``aot`` and ``aot_unpaired`` sort the log-ratios across the
batch, so one example's loss depends on the others in its micro-batch (as in the paper, where the
batch is the empirical distribution). Their result depends on the micro-batch size, never on
packing or padding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from alignkit.losses.base import LossOutput
from alignkit.losses.preference import (PREFERENCE_LOSSES, _check_beta, _check_epsilon, _dpo_margin, _mean_logps,
                                        _reward_metrics)

Tensor = torch.Tensor


@PREFERENCE_LOSSES.register("exo_pair")
def exo_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1,
                  label_smoothing: float = 1e-3) -> LossOutput:
    """EXO, pairwise: ``KL(q || p)`` with ``q = (sigma(beta h), sigma(-beta h))`` and ``p = (1 - eps, eps)``.

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16 with
    K = 2: the policy's two-point distribution over {chosen, rejected} (a softmax of the scaled
    log-ratios) is pulled towards the smoothed label distribution by the *reverse* KL, which is
    mode-seeking where DPO's forward KL is mean-seeking. Written out:
    ``sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps)``.
    ``label_smoothing`` (``eps``) must lie in ``(0, 0.5)``: at 0 the target has a zero and the KL is
    infinite. ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("exo_pair", beta)
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"exo_pair: label_smoothing (eps) must be in (0, 0.5), got {label_smoothing}")
    a, b = _dpo_margin("exo_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (a - b)  # (B,)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)  # log q over {chosen, rejected}
    losses = (log_qw.exp() * (log_qw - math.log1p(-label_smoothing))
              + log_ql.exp() * (log_ql - math.log(label_smoothing)))
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


@PREFERENCE_LOSSES.register("nca_pair")
def nca_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """NCA, pairwise: ``-log sigma(beta a) - 1/2 log sigma(-beta a) - 1/2 log sigma(-beta b)``.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", the
    NCA loss for K = 2 responses (eq. 12 with hard preferences). Unlike DPO, which only moves the
    *difference* of the log-ratios, each response's own log-ratio is anchored: the chosen one is
    pushed up against an absolute target, so its likelihood does not fall with the rejected one's.
    ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("nca_pair", beta)
    a, b = _dpo_margin("nca_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ra, rb = beta * a, beta * b
    losses = -F.logsigmoid(ra) - 0.5 * F.logsigmoid(-ra) - 0.5 * F.logsigmoid(-rb)
    return LossOutput(losses, _reward_metrics(ra, rb))


@PREFERENCE_LOSSES.register("fdpo_js")
def fdpo_js_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                 ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                 chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                 labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """f-DPO with the Jensen-Shannon divergence: ``-log sigma(beta (log sigma(a) - log sigma(b)))``.

    Wang et al. 2024, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (ICLR): with an f-divergence penalty in place of DPO's reverse KL, the
    implicit reward is ``beta f'(pi / ref)``, and the Bradley-Terry loss compares the two responses'
    ``f'``. For Jensen-Shannon ``f'(u) = log(2u / (1 + u))``; with ``u = exp(a)`` that is
    ``log 2 + log sigma(a)``, and the ``log 2`` cancels in the difference. Unlike DPO's ``a - b`` the
    reward ``log sigma(a)`` saturates at 0 as ``a`` grows, so a chosen response far above the reference
    stops earning margin (the penalty keeps the policy nearer the reference's support). ``labels``
    treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("fdpo_js", beta)
    a, b = _dpo_margin("fdpo_js", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ra, rb = beta * F.logsigmoid(a), beta * F.logsigmoid(b)  # the implicit rewards, without the log 2
    return LossOutput(-F.logsigmoid(ra - rb), _reward_metrics(ra, rb))


@PREFERENCE_LOSSES.register("bco_pair")
def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """BCO, pairwise: ``-log sigma(beta a) - log sigma(-beta b)``.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", eq. 7:
    a binary classifier whose logit is the implicit reward, chosen responses labelled 1 and rejected
    0. The paper shifts both rewards by a running mean ``delta`` of the rewards; like TRL 1.16's
    ``bco_pair`` this form uses ``delta = 0`` (no state between batches, so a micro-batch split or a
    resume cannot change it). ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("bco_pair", beta)
    a, b = _dpo_margin("bco_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ra, rb = beta * a, beta * b
    losses = -F.logsigmoid(ra) - F.logsigmoid(-rb)
    return LossOutput(losses, _reward_metrics(ra, rb))


@PREFERENCE_LOSSES.register("sppo_hard")
def sppo_hard_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                   ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                   chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                   labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """SPPO with hard probabilities: ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7 of
    Algorithm 1 (``eta = beta``) with the win probability set to 1 for the chosen response and 0
    for the rejected one: each log-ratio is regressed onto ``± 1/(2 beta)`` separately (IPO
    regresses only their difference). ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("sppo_hard", beta)
    a, b = _dpo_margin("sppo_hard", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    target = 0.5 / beta
    losses = (a - target) ** 2 + (b + target) ** 2
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)`` ``(B,)``."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@PREFERENCE_LOSSES.register("aot")
def aot_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
             chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
             labels: Optional[Tensor] = None, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired: the logistic loss on sorted policy margins minus sorted reference margins.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", the
    paired AOT objective (Sec. 3, eq. 9 with the logistic relaxation): first-order stochastic
    dominance of the policy's margin distribution ``log pi(y_w) - log pi(y_l)`` over the
    reference's is enforced by matching the two sorted samples (the 1-D optimal transport plan),
    ``delta_i = sort(pc - pr)_i - sort(rc - rr)_i``, loss ``-(1-eps) log sigma(beta delta_i) - eps log
    sigma(-beta delta_i)``. **Batch-level**: ``losses[i]`` belongs to the i-th smallest margin, not
    to example i. ``labels`` treated as hard; ``label_smoothing`` in ``[0, 0.5]``.
    """
    _check_beta("aot", beta)
    _check_epsilon("aot", label_smoothing, upper_inclusive=True)
    a, b = _dpo_margin("aot", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    policy_sorted = torch.sort(policy_chosen_logps - policy_rejected_logps).values  # (B,)
    ref_sorted = torch.sort(ref_chosen_logps - ref_rejected_logps).values  # (B,)
    losses = _smoothed_logistic(beta * (policy_sorted - ref_sorted), label_smoothing)
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


@PREFERENCE_LOSSES.register("aot_unpaired")
def aot_unpaired_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                      chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                      labels: Optional[Tensor] = None, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired: the logistic loss on sorted chosen log-ratios minus sorted rejected log-ratios.

    Melnyk et al. 2024 (as :func:`aot_loss`), the unpaired objective (Sec. 3, eq. 8): the
    distribution of chosen log-ratios ``a`` should dominate that of rejected log-ratios ``b``;
    ``delta_i = sort(a)_i - sort(b)_i``. TRL calls it ``aot_unpaired`` (``aot_pair`` in older
    releases; both names are accepted as ``loss_type``). **Batch-level** like ``aot``.
    ``label_smoothing`` in ``[0, 0.5]``.
    """
    _check_beta("aot_unpaired", beta)
    _check_epsilon("aot_unpaired", label_smoothing, upper_inclusive=True)
    a, b = _dpo_margin("aot_unpaired", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
    delta = torch.sort(a).values - torch.sort(b).values  # (B,)
    losses = _smoothed_logistic(beta * delta, label_smoothing)
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


@PREFERENCE_LOSSES.register("apo_zero")
def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """APO-zero: ``(1 - sigma(beta a)) + sigma(beta b)``.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 7:
    for data whose chosen answers are better than the model's own, the chosen likelihood is pushed
    up and the rejected one down, each anchored at the reference (zero log-ratio) rather than only
    their difference. ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("apo_zero", beta)
    a, b = _dpo_margin("apo_zero", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1.0 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


@PREFERENCE_LOSSES.register("apo_down")
def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """APO-down: ``sigma(beta a) + (1 - sigma(beta (a - b)))``.

    D'Oosterlinck et al. 2024 (as :func:`apo_zero_loss`), eq. 8: for data whose chosen answers are
    *worse* than the model's own, both likelihoods go down, the rejected one more (the margin term).
    ``labels`` treated as hard. Shapes as in ``dpo_loss``.
    """
    _check_beta("apo_down", beta)
    a, b = _dpo_margin("apo_down", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * a) + (1.0 - torch.sigmoid(beta * (a - b)))
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


#: Below this ``discopop_tau`` the DiscoPOP loss rises with the margin at ``z = 0``: ``(1 - log 2) / 3``.
DISCOPOP_MONOTONE_TAU = (1.0 - math.log(2.0)) / 3.0


@PREFERENCE_LOSSES.register("discopop")
def discopop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                  ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                  chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                  labels: Optional[Tensor] = None, beta: float = 0.1,
                  discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): ``(1 - m) (-log sigma(z)) + m exp(-z)``, ``m = sigma(z / tau)``.

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", eq. 5, with ``z = beta h``: a blend of the logistic (DPO) and exponential losses whose
    mixing weight follows the sign of the margin, so a pair already ranked right (z > 0) is scored
    by the exponential loss, which decays faster. ``discopop_tau`` (> 0) sets how sharply the blend
    switches. ``labels`` treated as hard. Shapes as in ``dpo_loss``.

    The loss is not monotone in the margin: its slope at ``z = 0`` is ``(1 - log 2) / (4 tau) - 3/4``,
    positive for ``tau < (1 - log 2) / 3 ~= 0.102``. With the paper's and TRL's default ``tau = 0.05``
    a run that starts at policy = reference (``z = 0``) is pushed to *negative* margins, into a local
    minimum, unless something else moves it off zero first (see :data:`DISCOPOP_MONOTONE_TAU`).
    """
    _check_beta("discopop", beta)
    if discopop_tau <= 0:
        raise ValueError(f"discopop: discopop_tau must be > 0, got {discopop_tau}")
    a, b = _dpo_margin("discopop", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (a - b)  # (B,)
    m = torch.sigmoid(z / discopop_tau)
    losses = (1.0 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


@PREFERENCE_LOSSES.register("sigmoid_norm", length_normalized=True)
def sigmoid_norm_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                      chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                      labels: Optional[Tensor] = None, beta: float = 0.1) -> LossOutput:
    """Length-normalized DPO: ``-log sigma(beta (a/|y_w| - b/|y_l|))``.

    The DPO loss (Rafailov et al. 2023, eq. 7) on per-token average log-ratios, as used for the
    length-normalized DPO baselines of Meng et al. 2024 (SimPO, Table 1 "LN-DPO") and TRL's
    ``sigmoid_norm``: a long response can no longer win by its length alone. Needs
    ``chosen_lengths``/``rejected_lengths`` ``(B,)``. ``labels`` treated as hard. Rewards are
    ``beta * `` the averaged log-ratios.
    """
    _check_beta("sigmoid_norm", beta)
    a, b = _dpo_margin("sigmoid_norm", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                   ref_rejected_logps)
    a = _mean_logps("sigmoid_norm", a, chosen_lengths, "chosen")
    b = _mean_logps("sigmoid_norm", b, rejected_lengths, "rejected")
    losses = -F.logsigmoid(beta * (a - b))
    return LossOutput(losses, _reward_metrics(beta * a, beta * b))


# the losses this module registered, read from the registry (no list to extend)
__all__ = ["DISCOPOP_MONOTONE_TAU"] + sorted(
    spec.fn.__name__ for _, spec in PREFERENCE_LOSSES.items() if spec.fn.__module__ == __name__)
