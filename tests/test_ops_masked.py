"""ops/masked.py and ops/wrappers.py: values at masked positions never reach a result or a gradient,
even when they are nan or inf; the reductions equal the plain reductions over the kept values."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops.logprobs import TokenLogprobs
from alignkit.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten
from alignkit.ops.wrappers import unwrap

# two rows; row 0 keeps 3 values, row 1 keeps 1; the padding holds nan, +inf and -inf
VALUES = [[1.0, 2.0, 6.0, float("nan")], [4.0, float("inf"), float("-inf"), float("nan")]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0]]
KEPT = [1.0, 2.0, 6.0, 4.0]


def data(mask_dtype=torch.float32, grad=False):
    return (torch.tensor(VALUES, dtype=torch.float64, requires_grad=grad),
            torch.tensor(MASK).to(mask_dtype))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.long])
def test_reductions_ignore_nan_and_inf_at_masked_positions(mask_dtype):
    x, m = data(mask_dtype)
    assert masked_sum(x, m).item() == 13.0
    assert masked_mean(x, m).item() == 13.0 / 4
    # hand arithmetic: mean 3.25, squared deviations 5.0625 + 1.5625 + 7.5625 + 0.5625 = 14.75
    assert masked_var(x, m).item() == pytest.approx(14.75 / 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(14.75 / 4)
    assert masked_sum(x, m, dim=-1).tolist() == [9.0, 4.0]
    assert masked_mean(x, m, dim=-1).tolist() == [3.0, 4.0]
    # row 0: mean 3, deviations 4 + 1 + 9 = 14 over n - 1 = 2; row 1 has one value: variance 0
    assert masked_var(x, m, dim=-1).tolist() == [7.0, 0.0]
    assert masked_mean(x, m, dim=-1, keepdim=True).shape == (2, 1)
    w = masked_whiten(x, m)
    assert torch.isfinite(w).all()
    expected = [(v - 3.25) / math.sqrt(14.75 / 3 + 1e-8) for v in KEPT]
    got = [w[0, 0], w[0, 1], w[0, 2], w[1, 0]]
    assert [float(g) for g in got] == pytest.approx(expected)
    assert w[0, 3] == 0 and w[1, 1:].abs().sum() == 0  # masked positions of the result are 0
    unshifted = masked_whiten(x, m, shift_mean=False)
    assert float(unshifted[0, 0]) == pytest.approx(expected[0] + 3.25)


def test_gradients_at_masked_positions_are_zero_not_nan():
    for fn in (masked_sum, masked_mean, masked_var, lambda v, m: masked_whiten(v, m).square().sum()):
        x, m = data(grad=True)
        fn(x, m).sum().backward()
        assert torch.isfinite(x.grad).all(), fn
        assert (x.grad[torch.tensor(MASK) == 0] == 0).all(), fn
    x, m = data(grad=True)
    masked_mean(x, m).backward()
    assert x.grad[0, 0].item() == pytest.approx(0.25)  # d mean / d x = 1 / n


def test_empty_mask_gives_zero_and_broadcast_masks_work():
    x = torch.tensor([[float("nan"), 1.0]])
    empty = torch.zeros(1, 2)
    for fn in (masked_sum, masked_mean, masked_var):
        assert fn(x, empty).item() == 0.0
    assert masked_whiten(x, empty).abs().sum().item() == 0.0
    # a (B, 1) sequence mask broadcast over (B, T) values
    y = torch.tensor([[1.0, 3.0], [float("nan"), float("nan")]])
    assert masked_mean(y, torch.tensor([[1.0], [0.0]])).item() == 2.0


def test_token_logprobs_sum_and_mean_use_the_nan_safe_set():
    tl = TokenLogprobs(logps=torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, float("nan"), float("nan")]]),
                       mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert tl.sum().tolist() == [-3.0, -4.0]
    assert tl.mean().tolist() == [-1.5, -4.0]


def test_unwrap_strips_ddp_and_compile_wrappers_but_keeps_the_model():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):  # the shape of DDP / accelerate wrappers: .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    class Compiled(torch.nn.Module):  # the shape of torch.compile's OptimizedModule: ._orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap(inner) is inner
    assert unwrap(Wrapper(Compiled(Wrapper(inner)))) is inner
