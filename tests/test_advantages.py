"""GAE, group baselines, KL controllers and running moments."""

import math

import pytest
import torch

from alignkit.advantages import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    gae_reference,
    group_normalized_advantages,
    leave_one_out_advantages,
)


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_three_tokens():
    # gamma = 0.9, lam = 0.8 (gamma*lam = 0.72); rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # 4th position is padding with a garbage value that must be ignored (terminal value 0).
    # t=2: delta = 1 + 0.9*0   - 0.7 = 0.3 ;  A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;  A1 = 0.03 + 0.72*0.3   = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;  A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]]))
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(ref_adv, adv.double())
    torch.testing.assert_close(ref_ret, ret.double())


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.7, 0.0)])
def test_gae_matches_loop_reference_on_ragged_batch(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask([9, 1, 4, 0, 7, 5], T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_lambda_one_gamma_one_is_monte_carlo_return():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[10.0, -3.0, 4.0, 0.0]])
    _, ret = gae(rewards, values, ragged_mask([3], 4), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_gae_rejects_left_padding_and_does_not_track_grad():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]))
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- group baselines


def test_group_normalized_hand_computed():
    # groups [1, 0] and [0, 1]: mean 0.5, sample std sqrt((0.25 + 0.25) / 1) = 0.70711
    # (1 - 0.5) / 0.70711 = 0.70711
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s]))
    # [3, 1, 2]: mean 2, sample std sqrt((1 + 1 + 0) / 2) = 1 -> [1, -1, 0] (up to eps)
    adv = group_normalized_advantages(torch.tensor([3.0, 1.0, 2.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]), atol=1e-5, rtol=0)


def test_group_normalized_dr_grpo_and_degenerate_groups():
    # Dr. GRPO: r - mean, no std
    adv = group_normalized_advantages(torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 5.0]), 3,
                                      scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))
    # identical rewards -> zeros (not nan); G = 1 -> zeros
    assert torch.equal(group_normalized_advantages(torch.ones(4), 2), torch.zeros(4))
    assert torch.equal(group_normalized_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError):
        group_normalized_advantages(torch.ones(5), 2)


def test_leave_one_out_hand_computed():
    # [3, 1, 2]: 3 - (1+2)/2 = 1.5 ; 1 - (3+2)/2 = -1.5 ; 2 - (3+1)/2 = 0
    # [1, 0]:    1 - 0 = 1 ; 0 - 1 = -1
    adv = leave_one_out_advantages(torch.tensor([3.0, 1.0, 2.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([1.5, -1.5, 0.0]))
    adv = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # identity: G/(G-1) * (r - mean)
    r = torch.randn(12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(leave_one_out_advantages(r, 4),
                               4 / 3 * group_normalized_advantages(r, 4, scale_by_std=False))
    with pytest.raises(ValueError):
        leave_one_out_advantages(r, 1)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 8: error (8-6)/6 = 0.333 -> clipped to 0.2; 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    assert ctl.update(8.0, 256) == pytest.approx(0.100512)
    # KL 5 (tensor): error -1/6; 0.100512 * (1 - (1/6) * 256/10000)
    ctl.update(torch.tensor([4.0, 6.0]), 256)
    assert ctl.value == pytest.approx(0.100512 * (1 - 256 / 60000))
    saved = ctl.state_dict()
    other = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    other.load_state_dict(saved)
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05 and ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------------- running moments


def test_running_moments_merge_equals_concatenation():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1 for n in (5, 1, 17, 2)]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    allx = torch.cat(batches)
    assert rm.count == allx.numel()
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-12)
    assert rm.var == pytest.approx(torch.var(allx).item(), abs=1e-12)  # unbiased
    assert rm.std == pytest.approx(torch.std(allx).item(), abs=1e-12)
    # masked update and checkpoint round trip
    mask = torch.tensor([True, False, True])
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    rm2.update(torch.tensor([1.0, 1e9, 2.0]), mask)
    full = torch.cat([allx, torch.tensor([1.0, 2.0], dtype=torch.float64)])
    assert rm2.var == pytest.approx(torch.var(full).item(), abs=1e-12)
    torch.testing.assert_close(rm2.normalize(full), (full - full.mean()) / (full.std() + 1e-8))


def test_group_of_equal_rewards_gets_exactly_zero_advantage():
    from alignkit.advantages import group_normalized_advantages

    r = torch.tensor([-1.2] * 8 + [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float32)
    adv = group_normalized_advantages(r, 8)
    assert (adv[:8] == 0).all()  # not (rounding error of the mean) / eps
    assert adv[8:].abs().min() > 0.9
