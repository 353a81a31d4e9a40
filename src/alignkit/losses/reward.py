"""Reward-model losses: Bradley-Terry on pairs, and the two ranking losses of ``alignkit rm``.

A ranking element holds the K rewards of one prompt's responses in rank order (best first), padded to
``(B, K_max)`` with a validity mask. ``RANKING_LOSSES`` names the losses over such elements
(``rm.loss`` / ``alignkit rm --loss``): ``bradley_terry`` (all K-choose-2 pairs of a prompt in one
element, InstructGPT) and ``plackett_luce`` (the likelihood of the whole ranking).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from alignkit.losses.base import LossOutput, Registry

Tensor = torch.Tensor


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *,
                       margin: Union[Tensor, float, None] = None,
                       labels: Optional[Tensor] = None) -> LossOutput:
    """Bradley-Terry pairwise loss ``-log sigma(r_w - r_l - m)``.

    Bradley & Terry 1952; as the reward-model loss in Ouyang et al. 2022 ("Training language
    models to follow instructions with human feedback", eq. 1), with the preference-strength
    margin ``m`` of Touvron et al. 2023 ("Llama 2", eq. 2). With a soft label ``p`` (probability
    that chosen is preferred) and ``d = r_w - r_l - m``: ``-p log sigma(d) - (1 - p) log sigma(-d)``;
    ``p = 1`` (or ``labels=None``) is the hard loss.

    Shapes: ``chosen_rewards``, ``rejected_rewards`` ``(B,)`` scalar rewards; ``margin`` ``(B,)``
    or a float, ``None`` = 0; ``labels`` ``(B,)`` in ``[0, 1]`` or ``None``. Returns ``losses (B,)``
    (unreduced) and detached ``(B,)`` metrics ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin`` (``r_w - r_l``, without ``m``) and ``rewards/accuracy`` (1.0 where
    ``r_w > r_l``, ties count 0.5, as every accuracy in alignkit: a zero-initialised head scores 0.5).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must have one shape (B,)")
    diff = chosen_rewards - rejected_rewards  # (B,) reward margin
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    if labels is None:
        losses = -F.logsigmoid(logits)
    else:
        p = labels.to(logits.dtype)  # (B,)
        losses = -p * F.logsigmoid(logits) - (1.0 - p) * F.logsigmoid(-logits)
    chosen, rejected, d = chosen_rewards.detach(), rejected_rewards.detach(), diff.detach()
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": d,
               "rewards/accuracy": (d > 0).to(d.dtype) + 0.5 * (d == 0).to(d.dtype)}
    return LossOutput(losses, metrics)


RANKING_LOSSES = Registry("ranking reward")


def _check_ranking(rewards: Tensor, mask: Tensor) -> Tensor:
    if rewards.dim() != 2 or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must both be (B, K)")
    m = mask.bool()
    if not bool((m.sum(-1) >= 2).all()):
        raise ValueError("every ranking element needs at least two valid responses")
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("the mask must mark a prefix of each row (responses best first, padding last)")
    return m


def _pair_metrics(rewards: Tensor, m: Tensor) -> Dict[str, Tensor]:
    """Detached per-element means over the element's pairs i < j (i ranked above j)."""
    r = rewards.detach()
    K = r.shape[1]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=r.device), diagonal=1)  # (K, K) i < j
    valid = upper & m[:, :, None] & m[:, None, :]  # (B, K, K)
    n = valid.sum((1, 2)).to(r.dtype)  # (B,) C(K_b, 2)
    d = r[:, :, None] - r[:, None, :]  # (B, K, K) r_i - r_j
    wins = ((d > 0).to(r.dtype) + 0.5 * (d == 0).to(r.dtype)) * valid
    k = m.sum(-1)  # (B,)
    return {"rewards/accuracy": wins.sum((1, 2)) / n, "rewards/margin": (d * valid).sum((1, 2)) / n,
            "rewards/chosen": r[:, 0], "rewards/rejected": r.gather(1, (k - 1)[:, None]).squeeze(1)}


@RANKING_LOSSES.register("bradley_terry", needs_reference=False)
def all_pairs_bradley_terry_loss(rewards: Tensor, mask: Tensor, *, margin: Union[Tensor, float, None] = None,
                                 labels: Optional[Tensor] = None) -> LossOutput:
    """All-pairs Bradley-Terry over each prompt's ranking, one element per prompt (InstructGPT).

    Ouyang et al. 2022 ("Training language models to follow instructions with human feedback", eq. 1):
    ``loss = -1 / C(K, 2) * sum_{i ranked above j} log sigma(r_i - r_j)``. The K-choose-2 comparisons of
    one prompt sit in one batch element, so the K responses go through the model once and the prompt is
    not seen K-1 times per epoch as it would be with the pairs shuffled apart. Each pair is the
    :func:`bradley_terry_loss` term, so a margin ``m`` (Llama 2) and a soft label ``p`` (of the element)
    apply to every pair; for K = 2 this is exactly :func:`bradley_terry_loss`.

    Shapes: ``rewards`` ``(B, K)`` best first, ``mask`` ``(B, K)`` (a prefix of each row is valid);
    ``margin``, ``labels`` ``(B,)``. Returns ``losses (B,)`` and detached per-element metrics.
    """
    m = _check_ranking(rewards, mask)
    K = rewards.shape[1]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=rewards.device), diagonal=1)
    valid = upper & m[:, :, None] & m[:, None, :]  # (B, K, K) pairs i above j
    logits = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K) r_i - r_j
    if margin is not None:
        logits = logits - torch.as_tensor(margin, dtype=logits.dtype, device=logits.device).reshape(-1, 1, 1)
    if labels is None:
        per_pair = -F.logsigmoid(logits)
    else:
        p = labels.to(logits.dtype).reshape(-1, 1, 1)
        per_pair = -p * F.logsigmoid(logits) - (1.0 - p) * F.logsigmoid(-logits)
    per_pair = torch.where(valid, per_pair, torch.zeros_like(per_pair))
    losses = per_pair.sum((1, 2)) / valid.sum((1, 2)).to(per_pair.dtype)  # (B,) mean over C(K_b, 2)
    return LossOutput(losses, _pair_metrics(rewards, m))


@RANKING_LOSSES.register("plackett_luce", needs_reference=False)
def plackett_luce_loss(rewards: Tensor, mask: Tensor, **_: object) -> LossOutput:
    """Negative log-likelihood of the whole ranking under the Plackett-Luce model.

    Luce 1959 (choice axiom) and Plackett 1975 ("The analysis of permutations", eq. 1): the best of the
    remaining responses is chosen with probability proportional to ``exp(r)``, so a ranking
    ``pi = (pi_1, ..., pi_K)`` (best first) has
    ``P(pi) = prod_{k=1}^{K-1} exp(r_{pi_k}) / sum_{j=k}^{K} exp(r_{pi_j})`` and
    ``loss = -sum_{k=1}^{K-1} (r_{pi_k} - logsumexp_{j >= k} r_{pi_j})``. For K = 2 this is the
    Bradley-Terry loss ``-log sigma(r_1 - r_2)``; it is the listwise loss of ListMLE (Xia et al. 2008).
    Margins and soft labels have no meaning here and are ignored.

    Shapes: ``rewards`` ``(B, K)`` in rank order, ``mask`` ``(B, K)`` (prefix valid).
    Returns ``losses (B,)`` (a sum over the K_b - 1 choices) and detached per-element metrics.
    """
    m = _check_ranking(rewards, mask)
    neg_inf = torch.finfo(rewards.dtype).min
    r = rewards.masked_fill(~m, neg_inf)  # padding never enters a denominator
    # log sum_{j >= k} exp(r_j): a reversed cumulative logsumexp, (B, K)
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    k = m.sum(-1, keepdim=True)  # (B, 1)
    pos = torch.arange(rewards.shape[1], device=rewards.device)[None, :]
    choice = m & (pos < k - 1)  # (B, K) the last position is forced, it adds log 1 = 0
    terms = torch.where(choice, rewards - tail, torch.zeros_like(rewards))
    return LossOutput(-terms.sum(-1), _pair_metrics(rewards, m))


__all__ = ["bradley_terry_loss", "all_pairs_bradley_terry_loss", "plackett_luce_loss", "RANKING_LOSSES"]
