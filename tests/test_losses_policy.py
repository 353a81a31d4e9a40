"""PPO / GRPO / RLOO policy losses and the clipped value loss."""

import math

import pytest
import torch

from alignkit.losses.policy import (
    POLICY_LOSSES,
    aggregate_token_losses,
    grpo_loss,
    ppo_loss,
    rloo_loss,
)
from alignkit.losses.value import explained_variance, value_loss

NAN, INF = float("nan"), float("inf")


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


def test_on_policy_ratio_one_loss_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4)
    out = ppo_loss(logp, logp.clone(), adv, mask)
    assert out.losses.shape == (3,)
    torch.testing.assert_close(out.losses.mean(), -adv.mean())
    assert out.metrics["policy/ratio_mean"].item() == 1.0
    assert out.metrics["policy/clip_frac"].item() == 0.0
    assert out.metrics["policy/approx_kl"].item() == 0.0
    assert all(m.dim() == 0 and not m.requires_grad for m in out.metrics.values())


def test_clipping_hand_built_ratios():
    # ratios [1.5, 1.5, 0.5, 0.5] with advantages [+1, -1, +1, -1], eps = 0.2:
    #   r=1.5, A=+1: min(1.5, 1.2)   = 1.2  -> loss -1.2, clipped
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5 -> loss  1.5, not clipped
    #   r=0.5, A=+1: min(0.5, 0.8)   = 0.5  -> loss -0.5, not clipped
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> loss  0.8, clipped
    old = torch.full((1, 4), -1.0)
    logp = (old + torch.tensor([[1.5, 1.5, 0.5, 0.5]]).log()).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = ppo_loss(logp, old, adv, torch.ones(1, 4), aggregation="sum")
    assert out.losses.item() == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8)
    assert out.metrics["policy/clip_frac"].item() == pytest.approx(0.5)
    assert out.metrics["policy/ratio_mean"].item() == pytest.approx(1.0)
    # approx_kl = mean of (r - 1) - log r
    want = sum((r - 1) - math.log(r) for r in (1.5, 1.5, 0.5, 0.5)) / 4
    assert out.metrics["policy/approx_kl"].item() == pytest.approx(want, rel=1e-5)
    # clipped tokens get no gradient; unclipped ones d(-r*A)/dlogp = -r*A
    out.losses.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]))
    # clip-higher (DAPO): upper bound 1.28 -> first token loss -1.28
    out = ppo_loss(logp.detach(), old, adv, torch.ones(1, 4), clip_eps_high=0.28, aggregation="sum")
    assert out.losses.item() == pytest.approx(-1.28 + 1.5 - 0.5 + 0.8)


def test_aggregation_modes_on_ragged_batch():
    # ratio 1 everywhere, so per-token loss = -A.  mask [[1,1,1],[1,0,0]],
    # A = [[1,2,3],[4,*,*]] -> token losses [-1,-2,-3] and [-4]; padding holds nan/inf garbage.
    #   token_mean:    sums -6, -4; N = 4, B = 2 -> [-6*2/4, -4*2/4] = [-3, -2]; mean -2.5 = -10/4
    #   sequence_mean: [-6/3, -4/1] = [-2, -4]; mean -3
    #   sum_norm(4):   [-6/4, -4/4] = [-1.5, -1]
    #   sum:           [-6, -4]
    mask = ragged_mask([3, 1], 3)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, NAN, -INF]])
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
    expect = {"token_mean": [-3.0, -2.0], "sequence_mean": [-2.0, -4.0],
              "sum_norm": [-1.5, -1.0], "sum": [-6.0, -4.0]}
    for agg, want in expect.items():
        out = ppo_loss(logp, logp.clone(), adv, mask, aggregation=agg, max_len=4)
        torch.testing.assert_close(out.losses, torch.tensor(want))
        assert all(torch.isfinite(m) for m in out.metrics.values())
    with pytest.raises(ValueError, match="max_len"):
        ppo_loss(logp, logp, adv, mask, aggregation="sum_norm")
    with pytest.raises(ValueError, match="num_tokens"):
        ppo_loss(logp, logp, adv, mask, aggregation="sequence_mean", num_tokens=4)
    with pytest.raises(ValueError, match="token_mean"):
        ppo_loss(logp, logp, adv, mask, aggregation="mean")  # type: ignore[arg-type]


def test_padding_garbage_does_not_poison_gradients():
    mask = ragged_mask([2, 1], 3)
    logp = torch.tensor([[-1.0, -2.0, NAN], [-0.3, -INF, NAN]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -INF], [-0.2, NAN, 0.0]])
    ref = torch.tensor([[-1.0, -2.5, NAN], [-0.1, INF, -INF]])
    out = grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()


def test_token_mean_with_global_num_tokens_is_accumulation_invariant():
    g = torch.Generator().manual_seed(4)
    B, T = 4, 6
    mask = ragged_mask([6, 2, 5, 1], T)
    old = -torch.rand(B, T, generator=g) * 2
    base = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)

    logp = base.clone().requires_grad_()
    full = ppo_loss(logp, old, adv, mask).losses.mean()  # local count = global count
    full.backward()
    grad_full = logp.grad.clone()
    want = -torch.minimum((logp - old).exp() * adv,
                          (logp - old).exp().clamp(0.8, 1.2) * adv)[mask].mean()
    torch.testing.assert_close(full, want)

    logp.grad = None
    n = mask.sum()  # global tokens of the optimizer step (14), not the micro-batch's
    halves = [ppo_loss(logp[s], old[s], adv[s], mask[s], num_tokens=n).losses.mean()
              for s in (slice(0, 2), slice(2, 4))]
    accumulated = sum(halves)  # the trainer sums micro-batch losses
    accumulated.backward()
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(logp.grad, grad_full)
    # without num_tokens the micro-batches would be normalized by 8 and 6 tokens: different
    naive = sum(ppo_loss(logp[s], old[s], adv[s], mask[s]).losses.mean() / 2
                for s in (slice(0, 2), slice(2, 4)))
    assert not torch.allclose(naive, full)


def test_grpo_hand_computed_with_kl():
    # ratio 1 (old=None), logp = -1, ref = -2 on every valid token: k3 = e^-1 = 0.36788
    # per-token loss = -A + beta*k3 ; A = [0.5, -1], beta = 0.1, sequence_mean
    #   seq 0: -0.5 + 0.036788 = -0.463212 ; seq 1: 1 + 0.036788 = 1.036788
    mask = ragged_mask([2, 3], 3)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    ref = torch.full((2, 3), -2.0)
    out = grpo_loss(logp, None, ref, torch.tensor([0.5, -1.0]), mask, beta=0.1)
    k3 = math.exp(-1)
    torch.testing.assert_close(out.losses, torch.tensor([-0.5 + 0.1 * k3, 1.0 + 0.1 * k3]))
    assert out.metrics["kl/ref"].item() == pytest.approx(k3, rel=1e-6)
    # gradient of the KL term pushes logp toward ref: d k3 / d logp = 1 - exp(ref - logp) > 0
    out.losses.sum().backward()
    d_kl = 0.1 * (1 - math.exp(-1))
    torch.testing.assert_close(logp.grad[0, :2], torch.full((2,), (-0.5 + d_kl) / 2))


def test_grpo_without_reference():
    mask = torch.ones(2, 2)
    logp = torch.full((2, 2), -1.0)
    out = grpo_loss(logp, logp, None, torch.tensor([1.0, 2.0]), mask, beta=0.0)
    torch.testing.assert_close(out.losses, torch.tensor([-1.0, -2.0]))
    assert "kl/ref" not in out.metrics
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, logp, None, torch.tensor([1.0, 2.0]), mask, beta=0.04)


def test_rloo_reinforce_hand_computed_and_clipped_variant_same_gradient():
    # -A * sum(logp): seq 0: -(2) * (-1 - 2) = 6 ; seq 1: -(-1) * (-0.5) = -0.5
    mask = ragged_mask([2, 1], 2)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, NAN]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    out = rloo_loss(logp, adv, mask)
    torch.testing.assert_close(out.losses, torch.tensor([6.0, -0.5]))
    assert out.metrics["policy/seq_logprob_mean"].item() == pytest.approx((-3.0 - 0.5) / 2)
    out.losses.sum().backward()
    grad_plain = logp.grad.clone()
    logp.grad = None
    clipped = rloo_loss(logp, adv, mask, old_logprobs=logp.detach())
    clipped.losses.sum().backward()
    torch.testing.assert_close(logp.grad, grad_plain)
    assert clipped.metrics["policy/clip_frac"].item() == 0.0


def test_registry_entries():
    assert POLICY_LOSSES.names() == ["grpo", "ppo", "rloo"]
    assert POLICY_LOSSES.get("grpo").needs_reference
    assert not POLICY_LOSSES.get("ppo").needs_reference
    assert aggregate_token_losses(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    # c = 0.2, three tokens (old value 1.0 for all):
    #  v=1.5, R=2: (1.5-2)^2 = 0.25; clip(1.5) = 1.2 -> (1.2-2)^2 = 0.64; 0.5*max = 0.32, clipped
    #  v=1.1, R=2: (0.9)^2 = 0.81; clip(1.1) = 1.1 -> same;              0.5*0.81 = 0.405
    #  v=0.5, R=3: (2.5)^2 = 6.25; clip(0.5) = 0.8 -> (2.2)^2 = 4.84;     0.5*6.25 = 3.125
    # 4th token is padding. token_mean: (0.32 + 0.405 + 3.125) / 3 = 1.283333
    values = torch.tensor([[1.5, 1.1, 0.5, NAN]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 3.0, INF]])
    mask = ragged_mask([3], 4)
    out = value_loss(values, old, returns, mask)
    assert out.losses.item() == pytest.approx((0.32 + 0.405 + 3.125) / 3)
    assert out.metrics["value/clip_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["value/mse"].item() == pytest.approx((0.25 + 0.81 + 6.25) / 3)
    out.losses.sum().backward()
    # clipped token: no gradient; others d/dv 0.5*(v-R)^2 / 3 = (v-R)/3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9 / 3, -2.5 / 3, 0.0]]))
    plain = value_loss(values, old, returns, mask, clip_range=None, aggregation="sum")
    assert plain.losses.item() == pytest.approx(0.5 * (0.25 + 0.81 + 6.25))


def test_explained_variance():
    mask = ragged_mask([3, 2], 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    const = torch.full_like(returns, 7.0)
    assert explained_variance(const, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(const, torch.ones(2, 3), mask).item())
