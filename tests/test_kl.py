"""KL estimators (Schulman 2020) against hand-computed values, with signs."""

import math

import pytest
import torch

from alignkit.ops.kl import kl_estimate, kl_k1, kl_k2, kl_k3


def t(*xs):
    return torch.tensor([list(xs)], dtype=torch.float64)  # (1, T)


def test_policy_more_likely_than_reference():
    # logp = -1, ref = -2: log(pi/pi_ref) = +1
    # k1 = -1 - (-2) = 1;  k2 = 0.5 * 1^2 = 0.5
    # k3 = exp(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1 = 0.36788
    logp, ref = t(-1.0), t(-2.0)
    assert kl_k1(logp, ref).item() == pytest.approx(1.0)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(-1), abs=1e-12)
    assert kl_k3(logp, ref).item() == pytest.approx(0.3679, abs=1e-4)


def test_policy_less_likely_than_reference():
    # logp = -2, ref = -1: log(pi/pi_ref) = -1
    # k1 = -1 (negative: k1 is signed per token);  k2 = 0.5
    # k3 = e^{+1} - 1 - 1 = e - 2 = 0.71828
    logp, ref = t(-2.0), t(-1.0)
    assert kl_k1(logp, ref).item() == pytest.approx(-1.0)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert kl_k3(logp, ref).item() == pytest.approx(math.e - 2, abs=1e-12)


def test_equal_logprobs_give_zero():
    logp = t(-0.3, -5.0, -1e-4)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(logp, logp.clone(), kind), torch.zeros_like(logp))


def test_k3_nonnegative_and_finite_even_for_extreme_ratios():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 50, generator=g) * 30
    ref = -torch.rand(64, 50, generator=g) * 30
    k3 = kl_k3(logp, ref)
    assert k3.shape == (64, 50)
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    # tiny log-ratios: expm1 keeps precision (exp(x) - x - 1 would cancel to 0 or go negative)
    x = torch.tensor([1e-6, -1e-6], dtype=torch.float32)
    assert (kl_k3(torch.zeros(2), x) > 0).all()
    # collapsed policy: log-ratio 1000 is clamped to 20
    big = kl_k3(torch.tensor([-1000.0]), torch.tensor([0.0]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(math.expm1(20) - 20, rel=1e-5)
    assert torch.isinf(kl_k3(torch.tensor([-1000.0]), torch.tensor([0.0]), clamp=None)).all()


def test_k1_and_k3_unbiased_for_true_kl():
    # categorical pi, pi_ref; sample from pi; both estimators average to KL(pi || pi_ref)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    # exact expectation over the support instead of Monte Carlo (deterministic)
    for kind in ("k1", "k3"):
        est = (p * kl_estimate(p.log(), q.log(), kind)).sum()
        assert est.item() == pytest.approx(true_kl.item(), abs=1e-12)


def test_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(t(0.0), t(0.0), "k4")  # type: ignore[arg-type]
