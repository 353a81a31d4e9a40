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
