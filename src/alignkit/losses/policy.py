"""Policy-gradient losses for online RL: PPO, GRPO (and Dr. GRPO / DAPO reductions), RLOO.

All are pure functions of per-token log-probs. Conventions shared by every function here:

* ``logprobs`` ``(B, T)``: log-probs of the sampled response tokens under the current policy
  (with grad). ``old_logprobs`` ``(B, T)``: the same under the policy that generated the rollout
  (no grad; detached here anyway). ``advantages`` are detached here too.
* ``mask`` ``(B, T)`` bool/float, 1 on response tokens. Values at masked-out positions are ignored
  even if they are ``nan``/``inf`` (they are replaced before any arithmetic, so gradients stay clean).
* The result is ``LossOutput(losses (B,), metrics)``; metrics are detached scalars computed over
  the **local** batch.

Reduction over tokens is a named choice (``aggregation``), see :func:`aggregate_token_losses`:

* ``"token_mean"`` (DAPO, Yu et al. 2025): every token in the batch weighs the same. Example ``b``
  gets ``sum_t l_bt * B / N``, so ``losses.mean() == sum_bt l_bt / N``. ``N`` is the local number
  of valid tokens, or ``num_tokens`` when given.
* ``"sequence_mean"`` (GRPO, Shao et al. 2024 eq. 3): ``sum_t l_bt / |o_b|``; mean over sequences.
* ``"sum_norm"`` (Dr. GRPO, Liu et al. 2025): ``sum_t l_bt / max_len`` with a constant ``max_len``.
* ``"sum"`` (REINFORCE / RLOO, the whole completion is one action): ``sum_t l_bt``.

Gradient accumulation and several processes: with ``token_mean`` pass ``num_tokens`` = the number
of valid tokens in the **whole optimizer step** (all micro-batches, all processes). Then each
micro-batch's ``losses.mean()`` is its share of the global token mean, and the trainer must **sum**
(not average) them over micro-batches. DDP/FSDP average gradients over ``P`` processes, so also
multiply the loss by ``P`` (or pass ``num_tokens / P``). For ``sequence_mean``/``sum_norm``/``sum``
the losses are per sequence: sum them and divide by the global number of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple, Union

import torch

from alignkit.losses.base import LossOutput, Registry
from alignkit.ops.kl import kl_estimate, kl_k3
from alignkit.ops.masked import masked_mean

@dataclass(frozen=True)
class AggregationSpec:
    """A token reduction: ``fn(seq_sum (B,), valid (B, T), *, max_len, num_tokens) -> (B,)``, where ``seq_sum``
    is each row's sum of per-token losses over ``valid``."""

    name: str
    fn: Callable[..., torch.Tensor]
    token_units: bool = False  # every token of the update weighs the same: the loop normalizes by tokens
    needs_max_len: bool = False  # divides by a constant length (max new tokens)
    doc: str = ""


#: token reductions by name (module docstring); the config's ``aggregation`` choices come from here
AGGREGATIONS: Registry[AggregationSpec] = Registry("token", AggregationSpec, what="aggregation")


@AGGREGATIONS.register("token_mean", token_units=True)
def _token_mean(seq_sum, valid, *, max_len=None, num_tokens=None) -> torch.Tensor:
    """every token of the update weighs the same (DAPO, Yu et al. 2025, eq. 8)."""
    if num_tokens is None:
        count = valid.sum().to(seq_sum.dtype)
    else:
        count = torch.as_tensor(num_tokens, dtype=seq_sum.dtype, device=seq_sum.device)
    return seq_sum * valid.shape[0] / count.clamp(min=1.0)


@AGGREGATIONS.register("sequence_mean")
def _sequence_mean(seq_sum, valid, *, max_len=None, num_tokens=None) -> torch.Tensor:
    """mean over each response, then over responses (GRPO, Shao et al. 2024, eq. 3)."""
    return seq_sum / valid.sum(-1).to(seq_sum.dtype).clamp(min=1.0)


@AGGREGATIONS.register("sum_norm", needs_max_len=True)
def _sum_norm(seq_sum, valid, *, max_len=None, num_tokens=None) -> torch.Tensor:
    """per-response sum / max_new_tokens (Dr. GRPO, Liu et al. 2025, sec. 3.1)."""
    if max_len is None or max_len <= 0:
        raise ValueError("aggregation='sum_norm' needs max_len > 0 (e.g. max new tokens)")
    return seq_sum / float(max_len)


@AGGREGATIONS.register("sum")
def _sum(seq_sum, valid, *, max_len=None, num_tokens=None) -> torch.Tensor:
    """per-response sum: the completion is one action (REINFORCE / RLOO, Ahmadian et al. 2024)."""
    return seq_sum


Aggregation = Literal[tuple(AGGREGATIONS.names())]  # type: ignore[valid-type]

#: Policy losses by name. ``needs_reference`` means the loss itself reads reference log-probs
#: (a KL penalty folded into the reward is the trainer's business, not the loss's).
POLICY_LOSSES = Registry("policy")


def aggregate_token_losses(per_token: torch.Tensor, mask: torch.Tensor,
                           aggregation: Aggregation = "token_mean", *,
                           max_len: Optional[int] = None,
                           num_tokens: Union[float, torch.Tensor, None] = None) -> torch.Tensor:
    """Reduce per-token losses ``(B, T)`` to per-example losses ``(B,)``; see the module docstring.

    ``max_len`` is required by (and only used by) ``"sum_norm"``. ``num_tokens`` is only allowed
    with ``"token_mean"``, where it replaces the local valid-token count (for global normalization).
    """
    spec = AGGREGATIONS.get(aggregation)
    if num_tokens is not None and not spec.token_units:
        raise ValueError(f"num_tokens only applies to aggregation='token_mean', not {aggregation!r}")
    valid = mask.bool()  # (B, T)
    seq_sum = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(-1)  # (B,)
    return spec.fn(seq_sum, valid, max_len=max_len, num_tokens=num_tokens)


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sequence-level or ``(B, T)`` token-level advantages -> detached, clean ``(B, T)``."""
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1) broadcast over tokens
    adv = adv.to(like.dtype).expand_as(like)
    return torch.where(valid, adv, torch.zeros_like(like))


def _clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, adv: torch.Tensor,
                       valid: torch.Tensor, clip_eps: float, clip_eps_high: Optional[float],
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``-min(r*A, clip(r, 1-eps, 1+eps_high)*A)`` (Schulman et al. 2017, eq. 7).

    Returns ``(loss, ratio, is_clipped, log_ratio)``, all ``(B, T)``; 0 / False at padding.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # (B, T) pi_theta / pi_old
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    # the clipped branch is active (zero gradient) where it is strictly the smaller objective
    is_clipped = (clipped < unclipped) & valid
    return -torch.minimum(unclipped, clipped), ratio, is_clipped, log_ratio


def _surrogate_metrics(ratio: torch.Tensor, is_clipped: torch.Tensor, log_ratio: torch.Tensor,
                       valid: torch.Tensor) -> dict:
    with torch.no_grad():
        # k3 of KL(pi_old || pi_theta), unbiased on tokens sampled from pi_old: (r - 1) - log r
        approx_kl = kl_k3(torch.zeros_like(log_ratio), log_ratio)
        return {
            "policy/clip_frac": masked_mean(is_clipped.to(ratio.dtype), valid).detach(),
            "policy/approx_kl": masked_mean(approx_kl, valid).detach(),
            "policy/ratio_mean": masked_mean(ratio, valid).detach(),
        }


@POLICY_LOSSES.register("ppo", needs_reference=False, paired=False)
def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
             aggregation: Aggregation = "token_mean", max_len: Optional[int] = None,
             num_tokens: Union[float, torch.Tensor, None] = None) -> LossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, then aggregated.

    ``l_t = -min(r_t A_t, clip(r_t, 1 - clip_eps, 1 + clip_eps_high) A_t)``, ``r_t = exp(logp - old)``.

    Args:
        logprobs, old_logprobs: ``(B, T)`` current / rollout-time log-probs of the sampled tokens.
        advantages: ``(B, T)`` token-level (e.g. from GAE) or ``(B,)`` sequence-level.
        mask: ``(B, T)`` response-token mask.
        clip_eps: lower clip ``eps``; ``clip_eps_high`` upper clip (DAPO "clip-higher",
            Yu et al. 2025), defaults to ``clip_eps``.
        aggregation, max_len, num_tokens: token reduction, see :func:`aggregate_token_losses`.

    Returns ``LossOutput(losses (B,), metrics)`` with ``policy/clip_frac`` (fraction of valid
    tokens whose clipped branch is active, i.e. zero gradient), ``policy/approx_kl`` (mean k3
    estimate of KL(pi_old || pi_theta): ``(r - 1) - log r``) and ``policy/ratio_mean``.
    """
    valid = mask.bool()
    adv = _token_advantages(advantages, logprobs, valid)
    per_token, ratio, is_clipped, log_ratio = _clipped_surrogate(
        logprobs, old_logprobs, adv, valid, clip_eps, clip_eps_high)
    losses = aggregate_token_losses(per_token, valid, aggregation, max_len=max_len,
                                    num_tokens=num_tokens)
    return LossOutput(losses, _surrogate_metrics(ratio, is_clipped, log_ratio, valid))


@POLICY_LOSSES.register("grpo", needs_reference=True, paired=False)
def grpo_loss(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor],
              ref_logprobs: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, beta: float = 0.04,
              aggregation: Aggregation = "sequence_mean", max_len: Optional[int] = None,
              num_tokens: Union[float, torch.Tensor, None] = None) -> LossOutput:
    """GRPO objective (Shao et al. 2024, eq. 3-4), negated: clipped surrogate + ``beta`` * k3 KL.

    ``l_t = -min(r_t A, clip(r_t, 1-eps, 1+eps_high) A) + beta * (pi_ref/pi - log(pi_ref/pi) - 1)``

    Args:
        logprobs: ``(B, T)`` current log-probs (with grad).
        old_logprobs: ``(B, T)`` rollout-time log-probs; ``None`` means one update per rollout
            (on-policy), i.e. ``logprobs.detach()``: ratio 1, gradient ``A * grad log pi``.
        ref_logprobs: ``(B, T)`` reference-model log-probs, or ``None`` (then ``beta`` must be 0).
        advantages: ``(B,)`` sequence-level (e.g. :func:`alignkit.advantages.group_normalized_advantages`),
            broadcast over tokens; ``(B, T)`` is accepted too.
        mask: ``(B, T)`` response-token mask.
        beta: KL coefficient (GRPO paper: 0.04; DAPO / Dr. GRPO use 0).
        aggregation: default ``"sequence_mean"`` as in the paper; ``"token_mean"`` gives DAPO,
            ``"sum_norm"`` (with ``max_len``) plus unscaled advantages gives Dr. GRPO.

    Metrics: those of :func:`ppo_loss`, plus ``kl/ref`` (masked mean of k3 to the reference) when
    ``ref_logprobs`` is given.
    """
    valid = mask.bool()
    if ref_logprobs is None and beta != 0.0:
        raise ValueError("grpo_loss with beta != 0 needs ref_logprobs (or set beta=0)")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    adv = _token_advantages(advantages, logprobs, valid)
    per_token, ratio, is_clipped, log_ratio = _clipped_surrogate(
        logprobs, old_logprobs, adv, valid, clip_eps, clip_eps_high)
    metrics = _surrogate_metrics(ratio, is_clipped, log_ratio, valid)
    if ref_logprobs is not None:
        zeros = torch.zeros_like(logprobs)
        # clean padding before exp so nan/inf there cannot leak into values or gradients
        kl = kl_k3(torch.where(valid, logprobs, zeros),
                   torch.where(valid, ref_logprobs.detach().to(logprobs.dtype), zeros))  # (B, T)
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl/ref"] = masked_mean(kl.detach(), valid)
    losses = aggregate_token_losses(per_token, valid, aggregation, max_len=max_len,
                                    num_tokens=num_tokens)
    return LossOutput(losses, metrics)


@POLICY_LOSSES.register("rloo", needs_reference=False, paired=False)
def rloo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logprobs: Optional[torch.Tensor] = None, clip_eps: float = 0.2,
              clip_eps_high: Optional[float] = None, aggregation: Aggregation = "sum",
              max_len: Optional[int] = None,
              num_tokens: Union[float, torch.Tensor, None] = None) -> LossOutput:
    """REINFORCE with a sequence-level (leave-one-out) advantage (Ahmadian et al. 2024, eq. 9).

    Without ``old_logprobs``: ``l_t = -A * log pi(y_t)``, and with the default ``aggregation="sum"``
    the per-sequence loss is ``-A * sum_t log pi(y_t)``: the whole completion is one action.

    With ``old_logprobs`` (several updates per rollout): the PPO clipped surrogate of
    :func:`ppo_loss` with the sequence advantage on every token, same aggregation. Its gradient at
    ratio 1 equals the unclipped REINFORCE gradient (its loss *value* differs: ``-A * |o|``).

    Args:
        logprobs: ``(B, T)``; advantages: ``(B,)`` (e.g. :func:`leave_one_out_advantages`) or
            ``(B, T)``; mask: ``(B, T)``. Others as in :func:`ppo_loss`.

    Metrics: ``policy/seq_logprob_mean`` (mean summed log-prob per sequence), plus the clipping
    metrics of :func:`ppo_loss` when ``old_logprobs`` is given.
    """
    valid = mask.bool()
    adv = _token_advantages(advantages, logprobs, valid)
    clean_logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))  # (B, T)
    metrics = {"policy/seq_logprob_mean": clean_logprobs.detach().sum(-1).mean()}
    if old_logprobs is None:
        per_token = -adv * clean_logprobs
    else:
        per_token, ratio, is_clipped, log_ratio = _clipped_surrogate(
            logprobs, old_logprobs, adv, valid, clip_eps, clip_eps_high)
        metrics.update(_surrogate_metrics(ratio, is_clipped, log_ratio, valid))
    losses = aggregate_token_losses(per_token, valid, aggregation, max_len=max_len,
                                    num_tokens=num_tokens)
    return LossOutput(losses, metrics)


def gspo_sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalized sequence importance ratio (Zheng et al. 2025, "Group Sequence Policy
    Optimization", sec. 4.1, eq. 7):

    ``s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(1/|y_i| * sum_t (log pi(y_i,t) - log pi_old(y_i,t)))``

    ``(B, T)`` log-probs and mask -> ``(B,)``; gradients flow through ``logprobs`` only.
    """
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))  # (B, T)
    length = valid.sum(-1).clamp(min=1).to(logprobs.dtype)  # (B,) |y_i|
    return torch.exp(log_ratio.sum(-1) / length)


def gspo_loss(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor], advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_eps: float = 3e-4, clip_eps_high: Optional[float] = 4e-4,
              aggregation: Aggregation = "sequence_mean", max_len: Optional[int] = None,
              num_tokens: Union[float, torch.Tensor, None] = None) -> LossOutput:
    """GSPO objective (Zheng et al. 2025, sec. 4.1, eq. 5), negated, with the sequence ratio of
    :func:`gspo_sequence_ratio`:

    ``l_i = -min(s_i A_i, clip(s_i, 1 - clip_eps, 1 + clip_eps_high) A_i)``, one value per response,
    placed on each of its tokens and then aggregated (``sequence_mean`` gives ``l_i`` itself, the
    paper's ``1/G sum_i``; ``token_mean`` weighs response ``i`` by its length).

    ``advantages``: ``(B,)`` sequence-level (group-normalized in the paper). ``old_logprobs=None`` means
    one update per rollout: ``s_i = 1`` and the gradient is ``A_i * grad(1/|y_i| sum_t log pi)``.
    Metrics: ``policy/clip_frac`` and ``policy/ratio_mean`` over sequences, ``policy/approx_kl`` per token.
    """
    valid = mask.bool()
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    adv = advantages.detach()
    if adv.dim() == 2:  # token-level input: a sequence method needs one value per response
        adv = torch.where(valid, adv, torch.zeros_like(adv)).sum(-1) / valid.sum(-1).clamp(min=1).to(adv.dtype)
    adv = adv.to(logprobs.dtype)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = gspo_sequence_ratio(logprobs, old_logprobs, mask)  # (B,)
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    seq_loss = -torch.minimum(unclipped, clipped)  # (B,)
    per_token = torch.where(valid, seq_loss[:, None].expand_as(logprobs), torch.zeros_like(logprobs))
    losses = aggregate_token_losses(per_token, valid, aggregation, max_len=max_len, num_tokens=num_tokens)
    with torch.no_grad():
        log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
        metrics = {"policy/clip_frac": (clipped < unclipped).to(ratio.dtype).mean(),
                   "policy/ratio_mean": ratio.detach().mean(),
                   "policy/approx_kl": masked_mean(kl_k3(torch.zeros_like(log_ratio), log_ratio), valid)}
    return LossOutput(losses, metrics)


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                    estimator: str = "k3", aggregation: Aggregation = "sequence_mean",
                    max_len: Optional[int] = None) -> torch.Tensor:
    """The KL-to-reference loss term (KL placed in the loss, as GRPO: Shao et al. 2024, eq. 3-4):
    the per-token estimate (``k1``/``k2``/``k3``, Schulman 2020) of ``KL(pi || pi_ref)`` on the sampled
    tokens, aggregated like the policy loss. Returns ``(B,)``; multiply by the coefficient beta."""
    valid = mask.bool()
    zeros = torch.zeros_like(logprobs)
    # clean padding before exp so nan/inf there cannot leak into values or gradients
    kl = kl_estimate(torch.where(valid, logprobs, zeros),
                     torch.where(valid, ref_logprobs.detach().to(logprobs.dtype), zeros), estimator)  # (B, T)
    return aggregate_token_losses(kl, valid, aggregation, max_len=max_len)


# The policy-loss stage of the online-RL task (alignkit.train.online): one signature
# ``fn(logprobs, old_logprobs | None, advantages, mask, *, clip_eps, clip_eps_high, aggregation, max_len)``.
# ``old_logprobs=None`` means a single update per rollout (pi_old = pi, ratio 1).
RL_POLICY_LOSSES = Registry("rl policy")


@RL_POLICY_LOSSES.register("clipped_token", needs_reference=False, paired=False)
def clipped_token_loss(logprobs, old_logprobs, advantages, mask, **kw) -> LossOutput:
    """per-token ratio, clipped (PPO, Schulman et al. 2017, eq. 7; GRPO eq. 3; DAPO with clip_eps_high).

    :func:`ppo_loss`; ``old_logprobs=None``: the ratio is 1 (one update per rollout)."""
    return ppo_loss(logprobs, logprobs.detach() if old_logprobs is None else old_logprobs, advantages, mask, **kw)


@RL_POLICY_LOSSES.register("clipped_sequence", needs_reference=False, paired=False)
def clipped_sequence_loss(logprobs, old_logprobs, advantages, mask, **kw) -> LossOutput:
    """length-normalized sequence ratio, clipped (GSPO, Zheng et al. 2025, eq. 5-7).

    :func:`gspo_loss`."""
    return gspo_loss(logprobs, old_logprobs, advantages, mask, **kw)


@RL_POLICY_LOSSES.register("reinforce", needs_reference=False, paired=False)
def reinforce_loss(logprobs, old_logprobs, advantages, mask, **kw) -> LossOutput:
    """-A log pi (REINFORCE, Williams 1992; RLOO, Ahmadian et al. 2024, eq. 9), a clipped ratio if updated twice.

    :func:`rloo_loss`: the clipped token ratio when a rollout gets several updates."""
    return rloo_loss(logprobs, advantages, mask, old_logprobs=old_logprobs, **kw)


__all__ = ["Aggregation", "AGGREGATIONS", "POLICY_LOSSES", "RL_POLICY_LOSSES", "aggregate_token_losses",
           "ppo_loss", "grpo_loss", "rloo_loss", "gspo_loss", "gspo_sequence_ratio", "kl_penalty_loss"]
