"""Collectives over the processes of a run (torch.distributed), no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes (1 without an initialized process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D tensor, concatenated in rank order (sizes may differ between processes).

    Rank r's tensor sits at its place in the result, so with contiguous shares of a global batch the
    result is that batch in order, exactly what one process holding the whole batch would have.
    Not differentiable (callers gather detached statistics). ``t`` itself in a single process.
    """
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros(max(counts), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


__all__ = ["world_size", "gather_cat"]
