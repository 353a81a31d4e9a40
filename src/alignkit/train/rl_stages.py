"""The stages of the one online-RL task, as small pure functions chosen by config.

rollout -> **shape_rewards** -> **place_kl** -> **advantage** (``ADVANTAGES[name]``) -> whitening ->
policy loss (:data:`alignkit.losses.policy.RL_POLICY_LOSSES`) -> aggregation
(:func:`alignkit.losses.policy.aggregate_token_losses`). :class:`alignkit.train.online.RLTask` runs
them in this order; presets (:data:`alignkit.train.rl_config.PRESETS`) choose them. Shapes: ``N``
sequences of the rollout, ``T1`` label positions (``T - 1``); response tokens are where ``mask`` is 1.
Everything here runs under ``no_grad`` and returns detached tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from alignkit.advantages import (RunningMoments, batch_baseline_advantages, gae, group_normalized_advantages,
                                 leave_one_out_advantages)


# ------------------------------------------------------------------ reward shaping
def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: float, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), ``(N,)`` lengths -> ``(N,)`` penalties <= 0.

    With ``L_max = max_len`` and ``L_cache = round(buffer * L_max)``:
    0 for ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` inside the buffer;
    -1 beyond ``L_max`` (which a cut response never exceeds). Scaled by ``factor``.
    """
    cache = int(round(buffer * max_len))
    if cache <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    free = max_len - cache
    pen = ((free - lengths.float()) / cache).clamp(min=-1.0, max=0.0)
    return factor * pen


@torch.no_grad()
def shape_rewards(raw: torch.Tensor, ended: torch.Tensor, lengths: torch.Tensor, *,
                  missing_eos_penalty: Optional[float] = None, overlong_buffer: float = 0.0,
                  overlong_factor: float = 1.0, max_len: int = 0, moments: Optional[RunningMoments] = None,
                  reward_clip: Optional[float] = None, gather: Callable = lambda t: t) -> torch.Tensor:
    """Sequence rewards ``(N,)`` -> the rewards trained on, for every algorithm, in this order:
    missing-EOS penalty (responses cut at ``max_len``), overlong penalty (:func:`overlong_penalty`),
    running normalization ``(r - mean) / std`` over every process (``moments`` updated first), clipping."""
    scores = raw.float().clone()
    if missing_eos_penalty:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if overlong_buffer > 0:
        scores = scores + overlong_penalty(lengths, max_len, overlong_buffer, overlong_factor)
    if moments is not None:
        moments.update(gather(scores))
        scores = moments.normalize(scores)
    if reward_clip:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


# ------------------------------------------------------------------ KL placement
@torch.no_grad()
def place_kl(placement: str, scores: torch.Tensor, kl: Optional[torch.Tensor], beta: float,
             last: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Put the KL penalty where ``placement`` says. Returns ``(sequence scores (N,), token rewards (N, T1))``.

    * ``token_reward``: ``r_t = -beta * KL_t`` on every response token, the sequence score on the last
      one (Ziegler et al. 2019; PPO, REINFORCE++); sequence scores stay as they are;
    * ``sequence_reward``: ``r - beta * sum_t KL_t`` (Ahmadian et al. 2024, sec. 3; RLOO);
    * ``loss`` / ``none``: rewards untouched (``loss``: the task adds ``beta * KL`` to the loss).

    ``kl``: ``(N, T1)`` per-token estimate, 0 off the responses (None: no reference). ``last``: ``(N,)``
    column of each response's last token. Token rewards always carry the sequence score on ``last``.
    """
    N = scores.shape[0]
    width = kl.shape[1] if kl is not None else int(last.max()) + 1
    token = torch.zeros(N, width)
    if kl is not None and placement == "token_reward":
        token = -beta * kl
    elif kl is not None and placement == "sequence_reward":
        scores = scores - beta * kl.sum(-1)
    token[torch.arange(N), last] += scores
    return scores, token


# ------------------------------------------------------------------ advantages
@dataclass
class AdvantageInputs:
    """What an advantage stage may read (all detached, this process's rows)."""

    scores: torch.Tensor  # (N,) sequence scores after shaping and KL placement
    token_rewards: torch.Tensor  # (N, T1) per-token rewards (sequence score on the last token)
    mask: torch.Tensor  # (N, T1) float, response tokens
    group_size: int
    values: Optional[torch.Tensor] = None  # (N, T1) critic values (gae)
    response_space: Optional[Tuple] = None  # (to, from) converters for gae (right-aligned responses)
    reduce: Optional[Callable] = None  # sum over processes (None: one process's statistics)
    opts: object = None  # RLOptions


def _gae(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """GAE (Schulman et al. 2016, eq. 16) on the per-token rewards; also the critic's returns."""
    to_r, from_r = a.response_space
    adv, ret = gae(to_r(a.token_rewards), to_r(a.values), to_r(a.mask).bool(), gamma=a.opts.gamma, lam=a.opts.lam)
    return {"advantages": from_r(adv), "returns": from_r(ret)}


def _sequence_scores(a: AdvantageInputs) -> torch.Tensor:
    """Group methods compare whole responses: with per-token KL rewards, their sum."""
    return (a.token_rewards * a.mask).sum(-1) if a.opts.kl_placement == "token_reward" else a.scores


def _group(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """GRPO (Shao et al. 2024, sec. 4.1.2): ``(r - mean_g) / std_g``; Dr. GRPO without the std; with
    ``std_scope=batch`` ``(r - mean_g) / std_batch`` (Liu et al. 2025, "Tricks or Traps", sec. 4.1: group
    mean, batch std; TRL's ``scale_rewards=batch``), the sample std of every process's sequence scores."""
    scores = _sequence_scores(a)
    batch = a.opts.scale_by_std and getattr(a.opts, "std_scope", "group") == "batch"
    adv = group_normalized_advantages(scores, a.group_size, scale_by_std=a.opts.scale_by_std and not batch)
    if batch:
        adv = adv / (batch_std(scores, a.reduce) + 1e-6)
    return {"advantages": adv}


def batch_std(x: torch.Tensor, reduce: Optional[Callable] = None) -> torch.Tensor:
    """Sample (n - 1) std of a 1-D tensor over every process (``reduce``: a sum over processes; None:
    this process's), from one reduction of (count, sum, sum of squares) in float64."""
    x = x.double()
    stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
    if reduce is not None:
        stats = reduce(stats)
    n, s1, s2 = stats.unbind()
    var = (s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)
    return var.clamp(min=0).sqrt().float()


def _leave_one_out(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, eq. 9): ``r_i - mean_{j != i} r_j``."""
    return {"advantages": leave_one_out_advantages(_sequence_scores(a), a.group_size)}


def _batch_baseline(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """REINFORCE++ (Hu 2025): reward-to-go, normalized over the global batch (or this process's)."""
    reduce = a.reduce if a.opts.whiten_scope == "global" else None
    return {"advantages": batch_baseline_advantages(a.token_rewards, a.mask, reduce)}


#: advantage stage name -> fn(AdvantageInputs) -> {"advantages": (N,) or (N, T1)[, "returns": (N, T1)]}
ADVANTAGES: Dict[str, Callable[[AdvantageInputs], Dict[str, torch.Tensor]]] = {
    "gae": _gae, "group": _group, "leave_one_out": _leave_one_out, "batch_baseline": _batch_baseline,
}

__all__ = ["overlong_penalty", "shape_rewards", "place_kl", "AdvantageInputs", "ADVANTAGES"]
