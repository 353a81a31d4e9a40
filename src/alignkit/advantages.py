"""Advantage estimation, KL-penalty controllers and running reward statistics for online RL.

* :func:`gae` / :func:`gae_reference`: generalized advantage estimation (PPO with a critic).
* :func:`group_normalized_advantages`: GRPO / Dr. GRPO group baselines (no critic).
* :func:`leave_one_out_advantages`: RLOO baseline (no critic).
* :func:`batch_baseline_advantages`: REINFORCE++ reward-to-go over the global batch (no critic).
* :data:`ADVANTAGES`: the advantage stage of online RL, a registry of :class:`AdvantageSpec` entries
  (what each estimator reads, returns and declares), each a pure function of :class:`AdvantageInputs`
  and the hyper-parameters it names.
* :class:`FixedKLController`, :class:`AdaptiveKLController`: the KL-penalty coefficient.
* :class:`RunningMoments`: running mean/std for reward normalization.

Advantages are targets, not something to differentiate through: every function here runs under
``torch.no_grad()`` and returns detached tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from alignkit.losses.base import Registry
from alignkit.ops.masked import masked_whiten

# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def _check_right_padded(mask: torch.Tensor) -> None:
    """Raise unless every row of the ``(B, T)`` bool mask is a prefix of ones (right padding)."""
    if mask.shape[-1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "gae expects right-padded responses: the valid tokens of each row of `mask` must be a "
            "prefix (1...1 0...0). Left-padded or holed masks would make GAE bootstrap from padding."
        )


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
        gamma: float = 1.0, lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 11-16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``  and  ``A_t = sum_l (gamma*lam)^l delta_{t+l}``,
    computed by the backward recursion ``A_t = delta_t + gamma*lam*A_{t+1}``.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. ``-beta*KL`` on every token plus the score on
            the last valid token).
        values: ``(B, T)`` critic values ``V(s_t)``.
        mask: ``(B, T)`` bool/float, 1 on response tokens. Rows must be right-padded (valid tokens
            form a prefix; checked, ``ValueError`` otherwise). The position after a row's last valid
            token is terminal: its value is taken as 0 (no bootstrap). Inputs at padded positions
            are ignored, even if they are ``nan``/``inf``.
        gamma, lam: discount and GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, ``returns = advantages + values`` on valid
        tokens, both 0 on padding. Dtype is at least float32. Not whitened: whiten with
        :func:`alignkit.ops.masked.masked_whiten` if you want it.

    Vectorized over the batch; one reverse loop over ``T``.
    """
    if rewards.shape != values.shape or values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"gae expects matching (B, T) tensors, got rewards {tuple(rewards.shape)}, "
                         f"values {tuple(values.shape)}, mask {tuple(mask.shape)}")
    dtype = torch.promote_types(values.dtype, torch.float32)
    valid = mask.bool()  # (B, T)
    _check_right_padded(valid)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(valid, rewards.to(dtype), zero)  # (B, T)
    v = torch.where(valid, values.to(dtype), zero)  # (B, T); 0 past the end = terminal value
    batch, length = v.shape
    advantages = torch.zeros_like(v)
    next_value = torch.zeros(batch, dtype=dtype, device=v.device)  # (B,) V_{t+1}
    running = torch.zeros(batch, dtype=dtype, device=v.device)  # (B,) A_{t+1}
    for t in range(length - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        running = (delta + gamma * lam * running) * valid[:, t]
        advantages[:, t] = running
        next_value = v[:, t]
    returns = (advantages + v) * valid
    return advantages, returns


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                  gamma: float = 1.0, lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slow, obvious GAE with nested Python loops; same contract as :func:`gae`. For tests."""
    batch, length = values.shape
    advantages = torch.zeros(batch, length, dtype=torch.float64)
    returns = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        n = int(mask[b].sum())  # number of valid tokens (right padding)
        r = [float(x) for x in rewards[b, :n]]
        v = [float(x) for x in values[b, :n]] + [0.0]  # terminal value after the last token
        for t in range(n):
            total = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma*lam)^(k-t) delta_k
                delta = r[k] + gamma * v[k + 1] - v[k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
            returns[b, t] = total + v[t]
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Group baselines (critic-free)
# --------------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,)`` -> ``(N // G, G)``; groups are consecutive runs of ``G`` samples of one prompt."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)


@torch.no_grad()
def group_normalized_advantages(rewards: torch.Tensor, group_size: int, *,
                                scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): ``(r_i - mean_g) / (std_g + eps)``.

    Args:
        rewards: ``(N,)`` scalar rewards laid out as ``N // G`` consecutive groups of ``G`` samples
            for the same prompt (``[p0s0, p0s1, ..., p1s0, ...]``).
        group_size: ``G``.
        scale_by_std: ``False`` gives Dr. GRPO (Liu et al. 2025): ``r_i - mean_g``, no division,
            which removes the question-difficulty bias of the std.
        eps: added to the std (so a group with identical rewards gives zeros, not ``nan``).

    The std is the **sample (unbiased, ``G - 1``) std**, as in the DeepSeekMath / GRPO code
    (``torch.std`` default). With ``G = 1`` it is undefined; we use 0, so advantages are 0.

    Returns ``(N,)`` advantages (sequence level; broadcast over tokens in the loss).
    """
    grouped = _grouped(rewards, group_size)  # (N/G, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    # a group of equal rewards carries no signal: exactly 0, not the rounding error of its mean divided
    # by eps (in float32, 8 x -1.2 has a mean 1e-7 off, which / 1e-6 would be an advantage of 0.1)
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    centered = torch.where(flat, torch.zeros_like(centered), centered)
    if scale_by_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        centered = centered / (std + eps)
    return centered.reshape(-1)


@torch.no_grad()
def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024, eq. 9; Kool et al. 2019): ``r_i - mean_{j != i} r_j``.

    ``rewards`` ``(N,)`` in consecutive groups of ``G >= 2`` samples per prompt; returns ``(N,)``.
    Equivalent to ``G / (G - 1) * (r_i - mean_g)``; the baseline excludes the sample itself, so the
    estimator stays unbiased.
    """
    if group_size < 2:
        raise ValueError("leave-one-out needs group_size >= 2 (a baseline from the other samples)")
    grouped = _grouped(rewards, group_size)  # (N/G, G)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (N/G, G)
    return (grouped - others_mean).reshape(-1)


# --------------------------------------------------------------------------------------------
# Batch baseline (REINFORCE++) and whitening across processes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_t = sum_{i >= t} r_i`` over each row's masked positions (gamma = 1). ``(B, T) -> (B, T)``.

    The response may sit anywhere in the row (label space after a prompt); positions off the mask
    contribute nothing and get 0.
    """
    valid = mask.bool()
    r = torch.where(valid, rewards.to(torch.promote_types(rewards.dtype, torch.float32)), torch.zeros(()))
    return torch.where(valid, r.flip(-1).cumsum(-1).flip(-1), torch.zeros((), dtype=r.dtype))


def reward_to_go_reference(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slow, obvious :func:`reward_to_go` with Python loops; for tests."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if mask[b, t]:
                out[b, t] = sum(float(rewards[b, i]) for i in range(t, rewards.shape[1]) if mask[b, i])
    return out


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor, reduce=None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked positions, 0 elsewhere; mean and unbiased
    variance over **every process** when ``reduce`` (a sum over processes of a 1-D tensor) is given.

    With ``reduce=None`` this is :func:`alignkit.ops.masked.masked_whiten` (one process's statistics).
    """
    if reduce is None:
        return masked_whiten(x, mask, eps=eps)
    valid = mask.bool()
    clean = torch.where(valid, x.double(), torch.zeros((), dtype=torch.float64))
    n, total = reduce(torch.stack([valid.sum().double(), clean.sum()]))
    mean = total / n.clamp(min=1.0)
    sq = reduce(torch.where(valid, clean - mean, torch.zeros((), dtype=torch.float64)).square().sum()[None])[0]
    var = sq / (n - 1.0).clamp(min=1.0)
    out = (clean - mean) * torch.rsqrt(var + eps)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype)).to(x.dtype)


@torch.no_grad()
def batch_baseline_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models", sec. 3.1-3.2): the token-level return

    ``A_t = r(x, y) - beta * sum_{i >= t} KL_i`` (the reward-to-go of per-token rewards ``-beta*KL_i`` plus
    the sequence reward on the last token, gamma = 1), then normalized over the **global batch**:
    ``A_norm = (A - mean_batch(A)) / std_batch(A)``. The batch mean is the baseline; no critic, no groups.

    ``token_rewards``: ``(B, T)`` with the sequence reward already on each response's last token;
    ``reduce``: sum over processes (None: this process's batch). Returns ``(B, T)``.
    """
    return whiten(reward_to_go(token_rewards, mask), mask, reduce)


# --------------------------------------------------------------------------------------------
# The advantage stage of online RL: a registry of pure functions
# --------------------------------------------------------------------------------------------


def to_response_space(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, T-1)`` label space -> ``(N, R)`` responses right-aligned to column 0 (what GAE needs), 0 where
    invalid. ``index``/``valid``: :func:`alignkit.train.rl_batch.response_index`."""
    return torch.where(valid, x.gather(1, index), torch.zeros((), dtype=x.dtype))


def from_response_space(y: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`to_response_space`: ``(N, R)`` -> ``(N, width)``, 0 off the responses."""
    out = torch.zeros(y.shape[0], width, dtype=y.dtype)
    return out.scatter_add(1, index, torch.where(valid, y, torch.zeros((), dtype=y.dtype)))


def batch_std(x: torch.Tensor, reduce=None) -> torch.Tensor:
    """Sample (n - 1) std of a 1-D tensor over every process (``reduce``: a sum over processes; None:
    this process's), from one reduction of (count, sum, sum of squares) in float64."""
    x = x.double()
    stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
    if reduce is not None:
        stats = reduce(stats)
    n, s1, s2 = stats.unbind()
    var = (s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)
    return var.clamp(min=0).sqrt().float()


@dataclass
class AdvantageInputs:
    """What an advantage estimator reads: values only, all detached, this process's rows. Its
    hyper-parameters come as keyword arguments (:attr:`AdvantageSpec.hparams`), never as a config object."""

    scores: torch.Tensor  # (N,) the sequence score a response is judged by: shaped, KL placed (with per-token
    #                       KL rewards, the sum of its token rewards)
    token_rewards: torch.Tensor  # (N, T1) per-token rewards (the sequence score on the last response token)
    mask: torch.Tensor  # (N, T1) float, response tokens
    group_size: int  # G: consecutive rows of one prompt
    values: Optional[torch.Tensor] = None  # (N, T1) critic values (needs_critic)
    response_index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (index, valid) of the response tokens
    #                       (:func:`alignkit.train.rl_batch.response_index`; right-aligned responses for GAE)
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # sum over processes (None: one process)


@dataclass(frozen=True)
class AdvantageSpec:
    """A registry entry of the advantage stage: the estimator and what it declares.

    ``fn(inputs: AdvantageInputs, **hparams) -> {"advantages": (N,) or (N, T1)[, "returns": (N, T1)]}``.
    """

    name: str
    fn: Callable[..., Dict[str, torch.Tensor]]
    needs_critic: bool = False  # reads critic values and returns value targets: the task trains a value model
    needs_groups: bool = False  # compares the samples of a prompt: num_generations must be at least 2
    normalized: bool = False  # already zero mean, unit variance: whiten_advantages has nothing to do
    token_level: bool = False  # (N, T1) advantages; else (N,), one per response, broadcast over its tokens
    doc: str = ""

    @property
    def hparams(self) -> Tuple[str, ...]:
        """The estimator's hyper-parameters: its keyword-only arguments, read from the RL options by name."""
        return tuple(p.name for p in inspect.signature(self.fn).parameters.values() if p.kind is p.KEYWORD_ONLY)

    def __call__(self, inputs: AdvantageInputs, options: Any) -> Dict[str, torch.Tensor]:
        """Run the estimator with its hyper-parameters taken from ``options`` (an RLOptions) by name."""
        return self.fn(inputs, **{k: getattr(options, k) for k in self.hparams})


#: advantage estimator name -> :class:`AdvantageSpec`; the config's ``advantage`` choices come from here.
ADVANTAGES: Registry[AdvantageSpec] = Registry("advantage", AdvantageSpec, what="estimator")


@ADVANTAGES.register("gae", needs_critic=True, token_level=True)
@torch.no_grad()
def gae_advantages(a: AdvantageInputs, *, gamma: float, lam: float) -> Dict[str, torch.Tensor]:
    """GAE with a critic (Schulman et al. 2016, eq. 16) on the per-token rewards; also the critic's returns."""
    index, valid = a.response_index
    width = a.mask.shape[1]
    adv, ret = gae(to_response_space(a.token_rewards, index, valid), to_response_space(a.values, index, valid),
                   to_response_space(a.mask, index, valid).bool(), gamma=gamma, lam=lam)
    return {"advantages": from_response_space(adv, index, valid, width),
            "returns": from_response_space(ret, index, valid, width)}


@ADVANTAGES.register("group", needs_groups=True)
@torch.no_grad()
def group_advantages(a: AdvantageInputs, *, scale_by_std: bool, std_scope: str) -> Dict[str, torch.Tensor]:
    """(r - mean_g) / std_g over the prompt's samples (GRPO, Shao et al. 2024, sec. 4.1.2; Dr. GRPO without std).

    ``std_scope="batch"`` divides by the std of the whole batch instead, every process (Liu et al. 2025,
    "Tricks or Traps", sec. 4.1: group mean, batch std; TRL's ``scale_rewards=batch``)."""
    batch = scale_by_std and std_scope == "batch"
    adv = group_normalized_advantages(a.scores, a.group_size, scale_by_std=scale_by_std and not batch)
    if batch:
        adv = adv / (batch_std(a.scores, a.reduce) + 1e-6)
    return {"advantages": adv}


@ADVANTAGES.register("leave_one_out", needs_groups=True)
@torch.no_grad()
def loo_advantages(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """r_i - mean of the prompt's other samples (RLOO, Ahmadian et al. 2024, eq. 9)."""
    return {"advantages": leave_one_out_advantages(a.scores, a.group_size)}


@ADVANTAGES.register("batch_baseline", normalized=True, token_level=True)
@torch.no_grad()
def reinforce_pp_advantages(a: AdvantageInputs, *, whiten_scope: str) -> Dict[str, torch.Tensor]:
    """Reward-to-go minus the global batch mean, over the global std (REINFORCE++, Hu 2025, sec. 3.1-3.2).

    ``whiten_scope="process"``: this process's batch statistics."""
    reduce = a.reduce if whiten_scope == "global" else None
    return {"advantages": batch_baseline_advantages(a.token_rewards, a.mask, reduce)}


@ADVANTAGES.register("batch_mean")
@torch.no_grad()
def batch_mean_advantages(a: AdvantageInputs) -> Dict[str, torch.Tensor]:
    """r_i - mean of every score in the global batch, no division (REINFORCE with a baseline, Williams 1992).

    Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
    Learning", sec. 3-4: the REINFORCE update ``(r - b) * grad log pi`` with a reinforcement baseline ``b``
    that does not depend on the action; here ``b`` is the mean score of the whole rollout batch, over every
    process (``reduce``), one value per response. No critic and no groups: a sample is compared with the
    batch, not with the other samples of its prompt (``leave_one_out``), and not scaled by a std.
    """
    x = a.scores.double()
    stats = torch.stack([x.new_tensor(float(x.numel())), x.sum()])  # (count, sum), one reduction
    if a.reduce is not None:
        stats = a.reduce(stats)
    mean = stats[1] / stats[0].clamp(min=1.0)
    return {"advantages": (x - mean).to(torch.promote_types(a.scores.dtype, torch.float32))}


# --------------------------------------------------------------------------------------------
# KL-penalty controllers
# --------------------------------------------------------------------------------------------


def _to_float(x: Any) -> float:
    return float(x.detach().float().mean()) if isinstance(x, torch.Tensor) else float(x)


class FixedKLController:
    """Constant KL-penalty coefficient ``beta``. ``update`` is a no-op (same interface as adaptive)."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: Any, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (eq. 2), as used for PPO-on-LMs.

    ``e_t = clip((KL_t - target) / target, -0.2, 0.2)`` and
    ``beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)``.

    ``current_kl`` is the measured KL(pi || pi_ref) of the last batch, **per sequence** (summed
    over tokens, the scale ``target`` is specified in, e.g. 6 nats); a tensor is averaged.
    ``n_steps`` is the number of samples (episodes) that batch contained.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Any, n_steps: int) -> float:
        error = (_to_float(current_kl) - self.target) / self.target
        error = min(max(error, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, float]:
        """The coefficient plus the settings, for inspection. ``load_state_dict`` restores only the
        coefficient: ``target`` and ``horizon`` come from the (possibly edited) config on resume."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# Running moments
# --------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean / variance over every element seen, merged batch by batch.

    Chan et al. (1979) parallel update of (count, mean, M2) from each batch's own statistics, in
    float64 Python scalars so long runs do not drift. ``std`` is the **unbiased** (``n - 1``)
    standard deviation of all elements seen so far (``torch.var`` default), 1.0 before two samples.
    Used to normalize rewards: ``(r - mean) / std``.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Merge the elements of ``x`` (any shape; only where ``mask`` is set, if given)."""
        x = x.detach().to(torch.float64)
        if mask is not None:
            x = x[mask.bool()]
        x = x.reshape(-1)
        n_b = float(x.numel())
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float((x - mean_b).square().sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self._m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    @property
    def var(self) -> float:
        return self._m2 / (self.count - 1.0) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        """``(x - mean) / std`` with the current statistics (``x / std`` if ``shift_mean=False``)."""
        out = x - self.mean if shift_mean else x
        return out / (self.std + eps)

    def state_dict(self) -> Dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.count, self.mean, self._m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


__all__: List[str] = [
    "gae", "gae_reference", "group_normalized_advantages", "leave_one_out_advantages", "reward_to_go",
    "reward_to_go_reference", "whiten", "batch_baseline_advantages", "batch_std", "to_response_space",
    "from_response_space", "AdvantageInputs", "AdvantageSpec", "ADVANTAGES",
    "FixedKLController", "AdaptiveKLController", "RunningMoments",
]
