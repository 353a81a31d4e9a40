"""Per-token KL estimators between a policy and a reference, from log-probs of sampled tokens.

Schulman (2020), "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
Tokens ``x`` are sampled from the policy ``pi`` (the first argument, ``logp``); the estimators
target ``KL(pi || pi_ref) = E_{x~pi}[log pi(x) - log pi_ref(x)]``. With ``r = pi_ref(x) / pi(x)``:

* ``k1 = -log r = logp - ref_logp``       unbiased, high variance, can be negative per token.
* ``k2 = 0.5 * (log r)^2``                biased (low bias near pi = pi_ref), always >= 0.
* ``k3 = (r - 1) - log r``                unbiased, always >= 0, low variance. This is the
  estimator of GRPO (Shao et al. 2024, eq. 4).

All functions are elementwise: ``(B, T)`` in, ``(B, T)`` out (any matching shapes work). They do
not mask: padded positions give whatever their inputs give, so mask before reducing. Pass fp32
log-probs; bf16 loses most of the precision of these small differences.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS = ("k1", "k2", "k3")

#: default bound on ``|ref_logp - logp|`` inside k3: exp(20) ~ 4.9e8 is still finite in fp32/bf16.
DEFAULT_K3_CLAMP = 20.0


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = ``logp - ref_logp`` (Schulman 2020). ``(B, T), (B, T) -> (B, T)``; unbiased, signed."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ``0.5 * (logp - ref_logp)^2`` (Schulman 2020). ``(B, T) -> (B, T)``; >= 0, biased."""
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, *,
          clamp: Optional[float] = DEFAULT_K3_CLAMP) -> torch.Tensor:
    """k3 = ``exp(ref_logp - logp) - (ref_logp - logp) - 1`` (Schulman 2020; GRPO eq. 4).

    ``(B, T), (B, T) -> (B, T)``. Non-negative and unbiased for ``KL(pi || pi_ref)`` when the tokens
    were sampled from ``pi`` (the policy whose log-probs are ``logp``).

    ``clamp``: the log-ratio ``ref_logp - logp`` is clamped to ``[-clamp, clamp]`` before ``exp`` so a
    single token where the policy has collapsed (``logp`` -> -inf) cannot produce ``inf`` and poison
    the batch. Outside the clamp the value saturates and the gradient is zero. ``None`` disables it.
    Computed as ``expm1(x) - x``, which keeps precision for small ``x`` and stays >= 0.
    """
    log_ratio = ref_logp - logp  # (B, T) log(pi_ref / pi)
    if clamp is not None:
        log_ratio = log_ratio.clamp(min=-clamp, max=clamp)
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3", *,
                clamp: Optional[float] = DEFAULT_K3_CLAMP) -> torch.Tensor:
    """Dispatch to :func:`kl_k1`, :func:`kl_k2` or :func:`kl_k3`. ``(B, T) -> (B, T)``.

    ``clamp`` is used by ``k3`` only (k1 and k2 have no exponential to overflow).
    """
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp, clamp=clamp)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of: {', '.join(KL_KINDS)}")
