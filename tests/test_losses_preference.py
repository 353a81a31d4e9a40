"""Numeric tests for the DPO family and KTO: hand arithmetic (with ``math``), directions, edge cases."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from alignkit.losses import (
    PREFERENCE_LOSSES, SOFT_LABEL_LOSSES, LossOutput, cdpo_loss, combine, dpo_loss, hinge_loss, ipo_loss,
    kto_loss, loss_hparams, nll_term, orpo_loss, robust_loss, simpo_loss,
)

SHARED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def logsig(x: float) -> float:
    """log sigma(x), stable for both signs."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def approx(x: torch.Tensor, *expected: float, tol: float = 1e-9) -> None:
    assert x.shape == (len(expected),), x.shape
    assert torch.allclose(x, t(*expected), atol=tol, rtol=0), (x, expected)


# Pair A used throughout: pc = -1, pr = -3, rc = -2, rr = -2.5
# log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5; h = 1 - (-0.5) = 1.5
def pair_a(grad: bool = False):
    return t(-1.0, grad=grad), t(-3.0, grad=grad), t(-2.0), t(-2.5)


H_A = (-1 - (-2)) - (-3 - (-2.5))  # 1.5


# ---------------------------------------------------------------------------------------------- DPO

def test_dpo_value_and_metrics():
    out = dpo_loss(*pair_a(), beta=0.1)
    # loss = -log sigma(0.1 * 1.5) = -log sigma(0.15) = log(1 + e^-0.15) ~= 0.6210
    expected = -logsig(0.1 * H_A)
    assert abs(expected - 0.6210) < 1e-4
    approx(out.losses, expected)
    approx(out.metrics["rewards/chosen"], 0.1 * 1.0)  # beta * (log pi - log ref) = 0.1
    approx(out.metrics["rewards/rejected"], 0.1 * -0.5)  # -0.05
    approx(out.metrics["rewards/margin"], 0.15)
    approx(out.metrics["rewards/accuracy"], 1.0)
    assert all(not m.requires_grad for m in out.metrics.values())


def test_dpo_batch_is_per_example_unreduced():
    # example 2: pc=-5, pr=-4, rc=-5, rr=-5 -> h = 0 - 1 = -1; loss = -log sigma(0.5 * -1) ~= 0.9741
    out = dpo_loss(t(-1.0, -5.0), t(-3.0, -4.0), t(-2.0, -5.0), t(-2.5, -5.0), beta=0.5)
    approx(out.losses, -logsig(0.5 * 1.5), -logsig(-0.5))
    approx(out.metrics["rewards/accuracy"], 1.0, 0.0)  # rewards 0 vs 0.5: rejected wins


def test_dpo_needs_reference():
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(t(-1.0), t(-2.0), None, None)


def test_dpo_soft_labels():
    # p = 0.8: loss = -0.8 log sigma(0.15) - 0.2 log sigma(-0.15) ~= 0.6510
    out = dpo_loss(*pair_a(), labels=t(0.8), beta=0.1)
    approx(out.losses, -0.8 * logsig(0.15) - 0.2 * logsig(-0.15))
    # soft label 1.0 is the hard loss
    hard = dpo_loss(*pair_a(), beta=0.1).losses
    assert torch.allclose(dpo_loss(*pair_a(), labels=t(1.0), beta=0.1).losses, hard, atol=1e-12)
    # p = 0 is the flipped pair: -log sigma(-0.15)
    approx(dpo_loss(*pair_a(), labels=t(0.0), beta=0.1).losses, -logsig(-0.15))


def test_dpo_soft_label_with_smoothing():
    # q = p (1 - eps) + (1 - p) eps = 0.8 * 0.9 + 0.2 * 0.1 = 0.74
    out = dpo_loss(*pair_a(), labels=t(0.8), beta=0.1, label_smoothing=0.1)
    approx(out.losses, -0.74 * logsig(0.15) - 0.26 * logsig(-0.15))


def test_cdpo_value_and_equivalences():
    # eps = 0.1: 0.9 * (-log sigma(0.15)) + 0.1 * (-log sigma(-0.15)) ~= 0.6360
    approx(cdpo_loss(*pair_a(), beta=0.1, label_smoothing=0.1).losses, -0.9 * logsig(0.15) - 0.1 * logsig(-0.15))
    # label_smoothing = 0 is plain DPO; cdpo_loss(eps) == dpo_loss(label_smoothing=eps)
    assert torch.equal(cdpo_loss(*pair_a(), label_smoothing=0.0).losses, dpo_loss(*pair_a()).losses)
    assert torch.equal(cdpo_loss(*pair_a(), label_smoothing=0.2).losses, dpo_loss(*pair_a(), label_smoothing=0.2).losses)
    with pytest.raises(ValueError, match="label_smoothing"):
        cdpo_loss(*pair_a(), label_smoothing=0.7)


def test_robust_value_and_unbiasedness():
    # eps = 0.2: [0.8 * (-log sigma(0.15)) - 0.2 * (-log sigma(-0.15))] / (1 - 0.4) ~= 0.5710
    expected = (0.8 * -logsig(0.15) - 0.2 * -logsig(-0.15)) / 0.6
    approx(robust_loss(*pair_a(), beta=0.1, label_smoothing=0.2).losses, expected)
    # eps = 0 is DPO
    assert torch.allclose(robust_loss(*pair_a(), label_smoothing=0.0).losses, dpo_loss(*pair_a()).losses, atol=1e-12)
    # unbiased: with flip rate eps, E[loss] over (kept, flipped) equals the clean DPO loss
    pc, pr, rc, rr = pair_a()
    kept = robust_loss(pc, pr, rc, rr, label_smoothing=0.2).losses
    flipped = robust_loss(pr, pc, rr, rc, label_smoothing=0.2).losses
    assert torch.allclose(0.8 * kept + 0.2 * flipped, dpo_loss(pc, pr, rc, rr).losses, atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*pair_a(), label_smoothing=0.5)


# ------------------------------------------------------------------------------------------ IPO

def test_ipo_value_length_averaged():
    # chosen: (-4 - (-6)) / 2 = 1;  rejected: (-9 - (-6)) / 3 = -1;  h = 2
    # tau = 0.5 -> target 1 / (2 * 0.5) = 1;  loss = (2 - 1)^2 = 1
    out = ipo_loss(t(-4.0), t(-9.0), t(-6.0), t(-6.0), chosen_lengths=t(2.0), rejected_lengths=t(3.0), beta=0.5)
    approx(out.losses, 1.0)
    approx(out.metrics["rewards/margin"], 0.5 * 1 - 0.5 * -1)  # beta * averaged ratios: 1.0
    # integer lengths work too
    out_int = ipo_loss(t(-4.0), t(-9.0), t(-6.0), t(-6.0), chosen_lengths=torch.tensor([2]),
                  rejected_lengths=torch.tensor([3]), beta=0.5)
    approx(out_int.losses, 1.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(t(-4.0), t(-9.0), t(-6.0), t(-6.0), beta=0.5)


def test_ipo_pulls_h_to_target_from_both_sides():
    # IPO regresses h onto 1/(2 tau): below the target raising chosen lowers the loss, above it raises
    lengths = dict(chosen_lengths=t(1.0), rejected_lengths=t(1.0))
    below = t(-1.0, grad=True)  # h = (-1 - -2) - (-3 - -2.5) = 1.5 < target 1/(2*0.1) = 5
    ipo_loss(below, t(-3.0), t(-2.0), t(-2.5), beta=0.1, **lengths).losses.sum().backward()
    assert below.grad.item() < 0
    above = t(10.0, grad=True)  # h = 12 + 0.5 = 12.5 > 5
    ipo_loss(above, t(-3.0), t(-2.0), t(-2.5), beta=0.1, **lengths).losses.sum().backward()
    assert above.grad.item() > 0


# ---------------------------------------------------------------------------------------- hinge

def test_hinge_value_and_flat_region():
    # max(0, 1 - 0.1 * 1.5) = 0.85
    approx(hinge_loss(*pair_a(), beta=0.1).losses, 0.85)
    # beta = 1: 1 - 1.5 < 0 -> loss 0, and the flat region has zero gradient (by design)
    pc, pr, rc, rr = pair_a(grad=True)
    out = hinge_loss(pc, pr, rc, rr, beta=1.0)
    approx(out.losses.detach(), 0.0)
    out.losses.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


# ---------------------------------------------------------------------------------------- SimPO

def test_simpo_value_reference_free():
    # r_w = 2 * (-6 / 3) = -4;  r_l = 2 * (-12 / 4) = -6;  loss = -log sigma(-4 - (-6) - 0.5) = -log sigma(1.5)
    out = simpo_loss(t(-6.0), t(-12.0), None, None, chosen_lengths=t(3.0), rejected_lengths=t(4.0))
    approx(out.losses, -logsig(1.5))  # ~= 0.2014
    approx(out.metrics["rewards/chosen"], -4.0)
    approx(out.metrics["rewards/margin"], 2.0)  # gamma is not part of the reported margin
    # gamma is on the reward scale: gamma = 2 exactly cancels the margin -> log 2
    approx(simpo_loss(t(-6.0), t(-12.0), chosen_lengths=t(3.0), rejected_lengths=t(4.0), gamma=2.0).losses,
           math.log(2.0))
    with pytest.raises(ValueError, match="rejected_lengths"):
        simpo_loss(t(-6.0), t(-12.0), chosen_lengths=t(3.0))


# ----------------------------------------------------------------------------------------- ORPO

def test_orpo_value():
    # m_w = -2 / 4 = -0.5;  m_l = -6 / 3 = -2
    # log odds(m) = m - log(1 - e^m): -0.5 - log(1 - e^-0.5) ~= 0.4328;  -2 - log(1 - e^-2) ~= -1.8546
    lo_w = -0.5 - math.log(1 - math.exp(-0.5))
    lo_l = -2.0 - math.log(1 - math.exp(-2.0))
    ratio = lo_w - lo_l  # ~= 2.2873
    nll = 0.5  # -(-2) / 4
    out = orpo_loss(t(-2.0), t(-6.0), chosen_lengths=t(4.0), rejected_lengths=t(3.0), beta=0.1)
    approx(out.losses, nll + 0.1 * -logsig(ratio))  # ~= 0.5 + 0.1 * 0.0967
    approx(out.metrics["orpo/nll"], nll)
    approx(out.metrics["orpo/log_odds_ratio"], ratio)
    approx(out.metrics["rewards/accuracy"], 1.0)


def test_orpo_is_finite_at_extremes():
    # a fully confident chosen response (mean log-prob 0) and a hopeless rejected one (-100 / token)
    for dtype in (torch.float32, torch.float64):
        pc = torch.tensor([0.0, -1e-9, -3.0], dtype=dtype, requires_grad=True)
        pr = torch.tensor([-400.0, -2.0, -1e-12], dtype=dtype, requires_grad=True)
        lengths = torch.tensor([4, 2, 3])
        out = orpo_loss(pc, pr, chosen_lengths=lengths, rejected_lengths=lengths)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# ------------------------------------------------------------------------------------- directions

LENGTHS = dict(chosen_lengths=t(2.0), rejected_lengths=t(3.0))


@pytest.mark.parametrize("name,hp", [
    ("dpo", {}), ("cdpo", {}), ("robust", {"label_smoothing": 0.3}), ("ipo", {"beta": 0.1}),
    ("hinge", {}), ("simpo", {}), ("orpo", {}),
])
def test_direction_chosen_up_rejected_down(name, hp):
    # making chosen more likely lowers the loss, making rejected more likely raises it
    # (ipo: holds while h is below its target 1/(2 tau) = 5; hinge: holds in its active region beta h < 1)
    pc, pr, rc, rr = pair_a(grad=True)
    out = PREFERENCE_LOSSES.get(name).fn(pc, pr, rc, rr, **LENGTHS, **hp)
    out.losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item(), (name, pc.grad, pr.grad)


# ---------------------------------------------------------------------------------------------- KTO

def test_kto_value_with_z0_clamped_at_zero():
    # kl diffs: -3 - (-2) = -1, -1 - (-1.5) = 0.5 -> mean -0.25 -> z0 = max(0, -0.25) = 0
    # r = [-1 - (-2), -2 - (-1)] = [1, -1]
    # desirable:   1 * (1 - sigma(0.1 * (1 - 0)))  = 1 - sigma(0.1)
    # undesirable: 2 * (1 - sigma(0.1 * (0 - -1))) = 2 * (1 - sigma(0.1))
    out = kto_loss(t(-1.0, -2.0), t(-2.0, -1.0), torch.tensor([True, False]),
              kl_policy_logps=t(-3.0, -1.0), kl_ref_logps=t(-2.0, -1.5), beta=0.1, undesirable_weight=2.0)
    approx(out.losses, 1 - sig(0.1), 2 * (1 - sig(0.1)))
    assert out.metrics["kto/z0"].item() == 0.0 and out.metrics["kto/z0"].shape == ()
    approx(out.metrics["rewards/implicit"], 0.1, -0.1)
    approx(out.metrics["kto/desirable"], 1.0, 0.0)


def test_kto_positive_z0_and_no_grad_through_kl():
    # kl diffs: [-1 - (-2), -1 - (-1.5)] = [1, 0.5] -> z0 = 0.75
    # desirable:   1 - sigma(0.1 * (1 - 0.75))  = 1 - sigma(0.025)
    # undesirable: 1 - sigma(0.1 * (0.75 + 1))  = 1 - sigma(0.175)
    pol = t(-1.0, -2.0, grad=True)
    kl_pol = t(-1.0, -1.0, grad=True)
    out = kto_loss(pol, t(-2.0, -1.0), torch.tensor([True, False]), kl_policy_logps=kl_pol,
              kl_ref_logps=t(-2.0, -1.5), beta=0.1)
    approx(out.losses.detach(), 1 - sig(0.025), 1 - sig(0.175))
    approx(out.metrics["kto/z0"].reshape(1), 0.75)
    out.losses.sum().backward()
    assert kl_pol.grad is None  # z0 is detached: no gradient flows into kl_*
    # desirable: raising its log-prob lowers the loss; undesirable: raising it raises the loss
    assert pol.grad[0].item() < 0 < pol.grad[1].item()


def test_kto_kl_batch_may_differ_in_size():
    # M = 3 mismatched pairs for B = 1: diffs 1, 2, 3 -> z0 = 2; r = 0 -> 1 - sigma(0.1 * -2)
    out = kto_loss(t(-1.0), t(-1.0), torch.tensor([True]), kl_policy_logps=t(0.0, 0.0, 0.0),
              kl_ref_logps=t(-1.0, -2.0, -3.0))
    approx(out.losses, 1 - sig(-0.2))


# ------------------------------------------------------------------------------------------ registry

def test_registry_contents_and_flags():
    # every name is checked against its reference in tests/test_losses_registry.py; here the flags
    assert {"cdpo", "dpo", "hinge", "ipo", "kto", "orpo", "robust", "simpo"} <= set(PREFERENCE_LOSSES.names())
    assert PREFERENCE_LOSSES.get("simpo").needs_reference is False
    assert PREFERENCE_LOSSES.get("orpo").needs_reference is False
    assert PREFERENCE_LOSSES.get("dpo").needs_reference is True
    assert PREFERENCE_LOSSES.get("kto").paired is False
    assert {n for n, s in PREFERENCE_LOSSES.items() if s.length_normalized} == {"ipo", "simpo", "orpo",
                                                                                "sigmoid_norm"}
    assert PREFERENCE_LOSSES.get("dpo").fn is dpo_loss
    assert SOFT_LABEL_LOSSES == {"dpo", "cdpo"}
    with pytest.raises(ValueError) as err:
        PREFERENCE_LOSSES.get("dpoo")
    assert "dpoo" in str(err.value) and "simpo" in str(err.value) and "kto" in str(err.value)


def test_loss_hparams():
    assert loss_hparams("simpo") == {"beta": 2.0, "gamma": 0.5}
    assert loss_hparams("dpo") == {"beta": 0.1, "label_smoothing": 0.0}
    assert loss_hparams("kto") == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def test_uniform_call_shape_for_every_paired_loss():
    pc, pr, rc, rr = t(-1.0, -5.0), t(-3.0, -4.0), t(-2.0, -5.0), t(-2.5, -5.0)
    kwargs = dict(chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([3, 1]), labels=t(1.0, 0.9))
    for name, spec in PREFERENCE_LOSSES.items():
        if not spec.paired:
            continue
        refs = (rc, rr) if spec.needs_reference else (None, None)
        out = spec.fn(pc, pr, *refs, **kwargs)
        assert isinstance(out, LossOutput) and out.losses.shape == (2,), name
        for key in SHARED_METRICS:
            assert out.metrics[key].shape == (2,) and not out.metrics[key].requires_grad, (name, key)
        with pytest.raises(TypeError):
            spec.fn(pc, pr, rc, rr, **kwargs, not_a_hparam=1.0)


# ------------------------------------------------------------------------------------ combinations

def test_nll_term_and_combine():
    # nll = -(-6) / 3 = 2
    sft = nll_term(t(-6.0), t(3.0))
    approx(sft.losses, 2.0)
    d = dpo_loss(*pair_a(), beta=0.1)
    c = cdpo_loss(*pair_a(), beta=0.1)
    out = combine([(1.0, d), (0.5, c), (0.2, sft)], names=["dpo", "cdpo", "sft"])
    # 1.0 * 0.6210 + 0.5 * 0.6360 + 0.2 * 2
    approx(out.losses, -logsig(0.15) + 0.5 * (-0.9 * logsig(0.15) - 0.1 * logsig(-0.15)) + 0.2 * 2.0)
    assert "dpo/rewards/margin" in out.metrics and "cdpo/rewards/margin" in out.metrics
    assert "rewards/margin" not in out.metrics  # colliding keys are prefixed
    assert "sft/nll" in out.metrics  # unique keys keep their name
    approx(out.metrics["sft/loss"], 2.0)
    default = combine([(1.0, d), (1.0, sft)])
    assert "rewards/margin" in default.metrics and "term1/loss" in default.metrics
    with pytest.raises(ValueError):
        combine([])
    with pytest.raises(ValueError):
        combine([(1.0, d), (1.0, c)], names=["x", "x"])


def test_public_api_every_registered_loss_is_alignkit_losses_name_loss():
    import inspect

    import alignkit.losses as L

    for name, spec in PREFERENCE_LOSSES.items():
        assert getattr(L, f"{name}_loss") is spec.fn, name
        assert f"{name}_loss" in L.__all__
        # the function carries the name too, and its module exports it: one name everywhere
        assert spec.fn.__name__ == f"{name}_loss", name
        assert spec.fn.__name__ in sys.modules[spec.fn.__module__].__all__, name
    params = inspect.signature(L.dpo_loss).parameters
    assert list(params)[:4] == ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                "ref_rejected_logps"]
    assert params["beta"].kind is inspect.Parameter.KEYWORD_ONLY and params["beta"].default == 0.1
    assert params["label_smoothing"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["label_smoothing"].default == 0.0
    # label smoothing by hand: q = 0.9, loss = -0.9 log sigma(0.15) - 0.1 log sigma(-0.15)
    out = L.dpo_loss(*pair_a(), beta=0.1, label_smoothing=0.1)
    approx(out.losses, -0.9 * logsig(0.15) - 0.1 * logsig(-0.15))
    for name in ("ppo_loss", "grpo_loss", "rloo_loss", "value_loss", "bradley_terry_loss"):
        assert callable(getattr(L, name))
