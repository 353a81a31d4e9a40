"""Reward-model losses. Rankings are expanded to pairs upstream (data/formats), so only pairs here."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from alignkit.losses.base import LossOutput

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
    ``r_w > r_l``, ties count 0).
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
               "rewards/accuracy": (d > 0).to(d.dtype)}
    return LossOutput(losses, metrics)


__all__ = ["bradley_terry_loss"]
