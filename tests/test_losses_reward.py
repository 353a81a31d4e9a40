"""Bradley-Terry reward-model loss: hand arithmetic (with ``math``), soft labels, margins, directions."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.reward import bradley_terry_loss


def logsig(x: float) -> float:
    """log sigma(x), stable for both signs."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def approx(x: torch.Tensor, *expected: float, tol: float = 1e-9) -> None:
    assert x.shape == (len(expected),), x.shape
    assert torch.allclose(x, t(*expected), atol=tol, rtol=0), (x, expected)


def test_hard_value_and_metrics():
    # d = [2 - 0.5, -1 - 1] = [1.5, -2];  loss = [-log sigma(1.5), -log sigma(-2)] ~= [0.2014, 2.1269]
    out = bradley_terry_loss(t(2.0, -1.0), t(0.5, 1.0))
    approx(out.losses, -logsig(1.5), -logsig(-2.0))
    approx(out.metrics["rewards/margin"], 1.5, -2.0)
    approx(out.metrics["rewards/accuracy"], 1.0, 0.0)
    approx(out.metrics["rewards/chosen"], 2.0, -1.0)
    approx(out.metrics["rewards/rejected"], 0.5, 1.0)
    assert all(not m.requires_grad for m in out.metrics.values())


def test_margin_llama2():
    # d = 2 - 0.5 - m; m = [1, 0.25] -> [0.5, 1.25]
    out = bradley_terry_loss(t(2.0, 2.0), t(0.5, 0.5), margin=t(1.0, 0.25))
    approx(out.losses, -logsig(0.5), -logsig(1.25))
    approx(out.metrics["rewards/margin"], 1.5, 1.5)  # the reported margin excludes m
    # a float margin broadcasts
    approx(bradley_terry_loss(t(2.0), t(0.5), margin=1.0).losses, -logsig(0.5))


def test_soft_labels():
    # p = 0.7, d = 1.5: -0.7 log sigma(1.5) - 0.3 log sigma(-1.5) ~= 0.6514
    approx(bradley_terry_loss(t(2.0), t(0.5), labels=t(0.7)).losses, -0.7 * logsig(1.5) - 0.3 * logsig(-1.5))
    # p = 1.0 equals the hard loss; p = 0 is the swapped pair
    hard = bradley_terry_loss(t(2.0, -1.0), t(0.5, 1.0)).losses
    assert torch.allclose(bradley_terry_loss(t(2.0, -1.0), t(0.5, 1.0), labels=t(1.0, 1.0)).losses, hard,
                          atol=1e-12)
    approx(bradley_terry_loss(t(2.0), t(0.5), labels=t(0.0)).losses, -logsig(-1.5))


def test_soft_label_half_is_flat_at_zero_margin():
    # p = 0.5, d = 0: loss = log 2 and the gradient vanishes (no preference to learn)
    c, r = t(1.0, grad=True), t(1.0, grad=True)
    out = bradley_terry_loss(c, r, labels=t(0.5))
    approx(out.losses.detach(), math.log(2.0))
    out.losses.sum().backward()
    assert abs(c.grad.item()) < 1e-12


def test_direction():
    # raising the chosen reward lowers the loss; raising the rejected reward raises it
    c, r = t(0.3, grad=True), t(0.1, grad=True)
    bradley_terry_loss(c, r).losses.sum().backward()
    assert c.grad.item() < 0 < r.grad.item()


def test_stable_for_large_differences():
    out = bradley_terry_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]))
    assert torch.isfinite(out.losses).all()
    assert abs(out.losses[0].item() - 200.0) < 1e-3 and out.losses[1].item() < 1e-30


def test_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


# ---------------------------------------------------------------- ranking losses (one element per prompt)

from alignkit.losses.reward import RANKING_LOSSES, all_pairs_bradley_terry_loss, plackett_luce_loss  # noqa: E402


def pl_by_hand(r):
    """-log P(ranking) = -sum_k (r_k - log sum_{j>=k} exp r_j) and its gradient d/dr_i, with ``math``."""
    K = len(r)
    nll, grad = 0.0, [0.0] * K
    for k in range(K - 1):
        s = sum(math.exp(x) for x in r[k:])
        nll -= r[k] - math.log(s)
        grad[k] -= 1.0
        for j in range(k, K):
            grad[j] += math.exp(r[j]) / s  # softmax over the remaining responses
    return nll, grad


def test_plackett_luce_k3_k4_values_and_gradients():
    # K = 3, r = [1.0, 0.2, -0.5]: -(1 - log(e + e^.2 + e^-.5)) - (0.2 - log(e^.2 + e^-.5))
    #   = 0.5143 + 0.4032 ~= 0.9175
    r3, r4 = [1.0, 0.2, -0.5], [0.3, 1.1, -0.4, 0.0]
    x = torch.tensor([r3 + [0.0], r4], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = plackett_luce_loss(x, mask)
    (n3, g3), (n4, g4) = pl_by_hand(r3), pl_by_hand(r4)
    assert n3 == pytest.approx(0.9175, abs=1e-4)
    approx(out.losses.detach(), n3, n4)
    out.losses.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([g3 + [0.0], g4], dtype=torch.float64), atol=1e-12)
    # metrics: 3 of 3 pairs right in row 0; row 1 has r_1 < r_2 and r_3 < r_4: 4 of 6
    approx(out.metrics["rewards/accuracy"], 1.0, 4 / 6)


def test_plackett_luce_k2_is_bradley_terry_and_rank_order_matters():
    x = t(1.5, -0.5).reshape(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    approx(plackett_luce_loss(x, m).losses, -logsig(2.0))
    approx(all_pairs_bradley_terry_loss(x, m).losses, -logsig(2.0))
    good = plackett_luce_loss(t(2.0, 1.0, 0.0).reshape(1, 3), torch.ones(1, 3, dtype=torch.bool)).losses
    bad = plackett_luce_loss(t(0.0, 1.0, 2.0).reshape(1, 3), torch.ones(1, 3, dtype=torch.bool)).losses
    assert float(good) < float(bad)


def test_all_pairs_bradley_terry_k3_hand_value_and_gradient():
    # InstructGPT eq. 1 for K = 3: mean of -log sigma over (1,2), (1,3), (2,3)
    r = [0.5, 0.7, -1.0]
    x = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    out = all_pairs_bradley_terry_loss(x, torch.ones(1, 3, dtype=torch.bool))
    want = -(logsig(-0.2) + logsig(1.5) + logsig(1.7)) / 3
    approx(out.losses.detach(), want)
    out.losses.sum().backward()
    s = lambda z: 1 / (1 + math.exp(-z))  # d/dd -log sigma(d) = -(1 - sigma(d))
    g = [-(1 - s(-0.2)) - (1 - s(1.5)), (1 - s(-0.2)) - (1 - s(1.7)), (1 - s(1.5)) + (1 - s(1.7))]
    assert torch.allclose(x.grad, torch.tensor([g], dtype=torch.float64) / 3, atol=1e-12)
    # soft label and margin reach every pair; a K = 2 element equals bradley_terry_loss exactly
    two = all_pairs_bradley_terry_loss(t(2.0, 0.5).reshape(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                       margin=t(1.0), labels=t(0.7))
    approx(two.losses, float(bradley_terry_loss(t(2.0), t(0.5), margin=t(1.0), labels=t(0.7)).losses))


def test_ranking_losses_registry_and_bad_masks():
    assert RANKING_LOSSES.names() == ["bradley_terry", "plackett_luce"]
    with pytest.raises(ValueError, match="at least two"):
        plackett_luce_loss(t(1.0, 2.0).reshape(1, 2), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="prefix"):
        plackett_luce_loss(t(1.0, 2.0, 3.0).reshape(1, 3), torch.tensor([[True, False, True]]))
