"""Critic (value-head) loss for PPO, and explained variance as a critic diagnostic.

Same conventions as :mod:`alignkit.losses.policy`: ``(B, T)`` tensors, a response-token ``mask``
whose masked-out positions are ignored even if ``nan``/``inf``, per-example losses ``(B,)`` reduced
by a named ``aggregation`` (``num_tokens`` for global token normalization under accumulation).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from alignkit.losses.base import LossOutput
from alignkit.losses.policy import Aggregation, aggregate_token_losses
from alignkit.ops.masked import masked_mean, masked_var


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip_range: Optional[float] = 0.2,
               aggregation: Aggregation = "token_mean", max_len: Optional[int] = None,
               num_tokens: Union[float, torch.Tensor, None] = None) -> LossOutput:
    """Clipped value loss of the PPO-for-LMs implementations (Ziegler et al. 2019; Ouyang et al. 2022).

    ``l_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V^old_t - c, V^old_t + c) - R_t)^2)``

    Args:
        values: ``(B, T)`` current critic values (with grad).
        old_values: ``(B, T)`` values at rollout time (detached here).
        returns: ``(B, T)`` targets, e.g. the ``returns`` of :func:`alignkit.advantages.gae`.
        mask: ``(B, T)`` response-token mask.
        clip_range: ``c``; ``None`` gives the plain ``0.5 * (V - R)^2``.
        aggregation, max_len, num_tokens: see :func:`alignkit.losses.policy.aggregate_token_losses`.

    Metrics: ``value/clip_frac`` (fraction of valid tokens where the clipped term is strictly larger,
    i.e. zero gradient), ``value/mse`` (masked mean of the unclipped ``(V - R)^2``).
    """
    valid = mask.bool()  # (B, T)
    zeros = torch.zeros_like(values)
    v = torch.where(valid, values, zeros)
    v_old = torch.where(valid, old_values.detach().to(values.dtype), zeros)
    target = torch.where(valid, returns.detach().to(values.dtype), zeros)
    err = (v - target).square()  # (B, T)
    if clip_range is None:
        per_token, is_clipped = 0.5 * err, torch.zeros_like(valid)
    else:
        v_clipped = v_old + (v - v_old).clamp(-clip_range, clip_range)
        err_clipped = (v_clipped - target).square()
        per_token = 0.5 * torch.maximum(err, err_clipped)
        is_clipped = (err_clipped > err) & valid
    losses = aggregate_token_losses(per_token, valid, aggregation, max_len=max_len,
                                    num_tokens=num_tokens)
    metrics = {
        "value/clip_frac": masked_mean(is_clipped.to(values.dtype), valid).detach(),
        "value/mse": masked_mean(err.detach(), valid),
    }
    return LossOutput(losses, metrics)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over valid tokens; scalar tensor (detached).

    1 is a perfect critic, 0 is no better than a constant, negative is worse than a constant.
    ``nan`` when the returns have zero variance (undefined). Unbiased variances (the ratio does not
    depend on the choice).
    """
    dtype = torch.promote_types(returns.dtype, torch.float32)
    r = returns.to(dtype)
    var_r = masked_var(r, mask)  # nan/inf at masked positions never reach it
    var_diff = masked_var(r - values.to(dtype), mask)
    return torch.where(var_r > 0, 1.0 - var_diff / var_r, torch.full_like(var_r, float("nan")))


__all__ = ["value_loss", "explained_variance"]
