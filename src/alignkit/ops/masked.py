"""Masked reductions: the one implementation every loss, trainer and metric uses.

``mask`` is a bool tensor or a 0/1 float tensor, broadcastable to ``values``. Positions where the mask
is 0/False are **ignored, even when they hold nan or inf**: they are replaced by 0 with ``torch.where``
before any arithmetic (``values * mask`` would turn ``nan * 0`` into ``nan``), so neither the result nor
the gradient ever sees them (the gradient at an ignored position is exactly 0).

An empty mask gives 0 for the mean and the variance (never a division by zero). Nothing here syncs
the host with the device (no ``.item()``, no Python branch on a tensor value).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _valid(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values with ignored positions set to 0, bool mask)``, both broadcast to one shape."""
    valid = mask.bool() if mask.dtype == torch.bool else mask != 0
    values, valid = torch.broadcast_tensors(values, valid)
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)), valid


def _count(valid: torch.Tensor, dim: Optional[int], keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    return (valid.sum() if dim is None else valid.sum(dim, keepdim=keepdim)).to(dtype)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
               keepdim: bool = False) -> torch.Tensor:
    """Sum of ``values`` over the positions where ``mask`` is set (all dims, or ``dim``)."""
    clean, _ = _valid(values, mask)
    return clean.sum() if dim is None else clean.sum(dim, keepdim=keepdim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
                keepdim: bool = False) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set; 0 where the mask is empty.

    ``dim=None``: a scalar over everything (token mean); ``dim=-1`` on ``(B, T)``: one mean per row.
    """
    clean, valid = _valid(values, mask)
    total = clean.sum() if dim is None else clean.sum(dim, keepdim=keepdim)
    return total / _count(valid, dim, keepdim, total.dtype).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, unbiased: bool = True,
               keepdim: bool = False) -> torch.Tensor:
    """Variance over the masked positions: ``sum (x - mean)^2 / (n - 1)`` (``/ n`` with ``unbiased=False``).

    0 when fewer than two positions (one with ``unbiased=False``) are set.
    """
    clean, valid = _valid(values, mask)
    mean = masked_mean(clean, valid, dim, keepdim=True)
    dev = torch.where(valid, clean - mean, torch.zeros((), dtype=clean.dtype, device=clean.device))
    sq = dev.square()
    total = sq.sum() if dim is None else sq.sum(dim, keepdim=keepdim)
    n = _count(valid, dim, keepdim, total.dtype)
    return total / ((n - 1.0) if unbiased else n).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (unbiased) variance over the masked positions
    (PPO's advantage whitening). ``shift_mean=False`` adds the mean back (reward whitening that keeps
    the sign). Masked-out positions of the result are 0."""
    clean, valid = _valid(values, mask)
    mean, var = masked_mean(clean, valid), masked_var(clean, valid)
    whitened = (clean - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]
