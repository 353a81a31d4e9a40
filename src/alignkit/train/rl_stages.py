"""The stages of the one online-RL task, as small pure functions chosen by config through registries.

rollout -> **shape_rewards** -> **kl_to_reference** (once per rollout) -> **place_kl**
(:data:`KL_PLACEMENTS`) -> advantage (:data:`alignkit.advantages.ADVANTAGES`) -> whitening -> policy
loss (:data:`alignkit.losses.policy.RL_POLICY_LOSSES`) -> aggregation
(:data:`alignkit.losses.policy.AGGREGATIONS`). :meth:`alignkit.train.online.RLTask.plan` calls them in
this order; presets (:data:`alignkit.train.rl_config.PRESETS`) choose them. Every stage receives values
(tensors and the hyper-parameters it names), never the options object. Shapes: ``N`` sequences of the
rollout, ``T1`` label positions (``T - 1``); response tokens are where ``mask`` is 1. Everything here
runs under ``no_grad`` and returns detached tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from alignkit.advantages import ADVANTAGES, AdvantageInputs, RunningMoments  # noqa: F401  (re-exported)
from alignkit.losses.base import Registry
from alignkit.ops.kl import kl_estimate, kl_k1


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


# ------------------------------------------------------------------ KL to the reference
@torch.no_grad()
def kl_to_reference(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                    estimator: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-token KL of the policy to its reference on the sampled tokens, ``(N, T1)`` each, 0 off the
    responses: ``(k1, the named estimator)`` (Schulman 2020). k1 is the logged ``kl/ref`` (unbiased
    log-ratio); the named estimator is the penalty (``kl/penalty``, the adaptive controller's input and
    what :func:`place_kl` places). The one place a rollout's KL is computed: the plan's pass and the
    loss pass of an on-policy run (:attr:`alignkit.train.online.RLTask.on_policy_stats`) both call it."""
    return kl_k1(logps, ref_logps) * mask, kl_estimate(logps, ref_logps, estimator) * mask


# ------------------------------------------------------------------ KL placement
@dataclass(frozen=True)
class KLPlacementSpec:
    """Where the KL penalty acts: ``fn(scores (N,), kl (N, T1), beta) -> (scores (N,), token KL rewards
    (N, T1) or None)``, applied only when there is a reference."""

    name: str
    fn: Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]
    uses_reference: bool = True  # False: no KL anywhere, no reference model is loaded
    in_loss: bool = False  # the task adds beta * KL to the per-token loss (the micro-batch carries ref log-probs)
    token_rewards: bool = False  # the KL is in the per-token rewards: a response's score is their sum
    doc: str = ""


#: KL placement name -> :class:`KLPlacementSpec`; the config's ``kl_placement`` choices come from here.
KL_PLACEMENTS: Registry[KLPlacementSpec] = Registry("KL", KLPlacementSpec, what="placement")


@KL_PLACEMENTS.register("none", uses_reference=False)
def _kl_nowhere(scores, kl, beta):
    """no KL term (no reference model)."""
    return scores, None


@KL_PLACEMENTS.register("token_reward", token_rewards=True)
def _kl_in_token_rewards(scores, kl, beta):
    """r_t = -kl_coef * KL_t on every response token (Ziegler et al. 2019, eq. 2; PPO, REINFORCE++)."""
    return scores, -beta * kl


@KL_PLACEMENTS.register("sequence_reward")
def _kl_in_sequence_reward(scores, kl, beta):
    """r - kl_coef * sum_t KL_t (Ahmadian et al. 2024, sec. 3; RLOO)."""
    return scores - beta * kl.sum(-1), None


@KL_PLACEMENTS.register("loss", in_loss=True)
def _kl_in_loss(scores, kl, beta):
    """kl_coef * KL_t added to the per-token loss (Shao et al. 2024, eq. 3; GRPO)."""
    return scores, None


@torch.no_grad()
def place_kl(placement: str, scores: torch.Tensor, kl: Optional[torch.Tensor], beta: float,
             last: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Put the KL penalty where ``placement`` (a :data:`KL_PLACEMENTS` entry) says. Returns
    ``(sequence scores (N,), token rewards (N, T1))``: the token rewards are the placement's per-token KL
    rewards (0 when it has none) plus each sequence score on ``last``, the ``(N,)`` column of each
    response's last token. ``kl``: ``(N, T1)`` per-token estimate, 0 off the responses (None: no reference,
    the rewards stay as they are)."""
    N = scores.shape[0]
    width = kl.shape[1] if kl is not None else int(last.max()) + 1
    token = None
    if kl is not None:
        scores, token = KL_PLACEMENTS.get(placement).fn(scores, kl, beta)
    token = torch.zeros(N, width) if token is None else token
    token[torch.arange(N), last] += scores
    return scores, token


__all__ = ["overlong_penalty", "shape_rewards", "kl_to_reference", "KLPlacementSpec", "KL_PLACEMENTS", "place_kl",
           "AdvantageInputs", "ADVANTAGES"]
