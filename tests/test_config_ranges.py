"""Config values that make no sense are refused with the field and the reason (issue 32, item 6, case 8)."""

import pytest
import torch

from alignkit.config import ConfigError, SFTConfig, load_config
from alignkit.losses.base import LossOutput
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.rollout.generate import GenerationConfig
from alignkit.train.preference import DPOConfig


def _refused(cls, override):
    with pytest.raises(ConfigError) as err:
        load_config(cls, overrides=[override])
    return str(err.value)


@pytest.mark.parametrize("beta", ["-0.1", "0"])
def test_dpo_beta_must_be_positive(beta):
    # case 8: a negative beta used to train the reverse preference with normal-looking metrics
    msg = _refused(DPOConfig, f"dpo.beta={beta}")
    assert "dpo.beta" in msg and "greater than 0" in msg
    assert "reverse preference" in msg  # the reason, quoted from the field's docstring
    assert load_config(DPOConfig, overrides=["dpo.beta=0.2"]).dpo.beta == 0.2


@pytest.mark.parametrize("override,field,reason", [
    ("dpo.label_smoothing=0.7", "dpo.label_smoothing", "flipped"),
    ("dpo.gamma=-1", "dpo.gamma", "margin"),
])
def test_dpo_ranges(override, field, reason):
    msg = _refused(DPOConfig, override)
    assert field in msg and reason in msg


@pytest.mark.parametrize("override,field,reason", [
    ("optim.lr=-1e-5", "optim.lr", "ascends the loss"),
    ("optim.eps=0", "optim.eps", "second moment"),
    ("optim.betas=[0.9,1.0]", "optim.betas", "decay rates"),
    ("adam_beta1=-0.1", "optim.betas", "decay rates"),
    ("optim.weight_decay=-0.01", "optim.weight_decay", "away from 0"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm", "clipping off"),
])
def test_optim_ranges(override, field, reason):
    msg = _refused(SFTConfig, override)
    assert field in msg and reason in msg


def test_generation_ranges_name_the_reason():
    with pytest.raises(Exception) as err:
        GenerationConfig(temperature=-1.0)
    assert "temperature" in str(err.value)
    from alignkit.config import field_reason
    assert "least likely" in field_reason(GenerationConfig, ("temperature",))
    assert "keeps no token" in field_reason(GenerationConfig, ("top_p",))


def test_zero_allowed_where_it_means_off():
    # kl_coef 0 = no KL, temperature 0 = greedy, weight decay 0, label smoothing 0: all legitimate
    from alignkit.train.rl_config import GRPOConfig
    cfg = load_config(GRPOConfig, overrides=["grpo.kl_coef=0", "grpo.kl_placement=none", "rewards=[length]",
                                             "generation.temperature=0"])
    assert cfg.grpo.kl_coef == 0 and cfg.generation.temperature == 0
    assert load_config(DPOConfig, overrides=["dpo.label_smoothing=0"]).dpo.label_smoothing == 0


def _call(name, beta):
    spec = PREFERENCE_LOSSES.get(name)
    x = torch.tensor([-3.0, -4.0])
    if not spec.paired:
        return spec.fn(x, x + 0.5, torch.tensor([1.0, 0.0]), kl_policy_logps=x, kl_ref_logps=x, beta=beta)
    lengths = torch.tensor([3.0, 4.0])
    return spec.fn(x, x - 1, x + 0.2, x - 0.5, chosen_lengths=lengths, rejected_lengths=lengths, beta=beta)


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_every_preference_loss_refuses_nonpositive_beta(name):
    assert isinstance(_call(name, 0.1), LossOutput)  # the call itself is right
    for beta in (-0.1, 0.0):
        with pytest.raises(ValueError, match=f"{name}: beta must be > 0"):
            _call(name, beta)


def test_extra_loss_weight_must_be_positive():
    msg = _refused(DPOConfig, "dpo.extra_losses={hinge: -0.5}")
    assert "extra_losses.hinge: weight must be > 0" in msg
    assert load_config(DPOConfig, overrides=["dpo.extra_losses={hinge: 0.5}"]).dpo.extra_losses == {"hinge": 0.5}


def test_known_names_lists_what_is_known_in_order():
    """The one check of every option naming registry entries (alert kinds, probes): one name or a list in,
    a list out; an unknown name is an error listing the extra names first, then the registry."""
    from alignkit.config import known_names

    assert known_names("a", ("a", "b"), "thing") == ["a"]
    assert known_names(None, ("a",), "thing") == []
    assert known_names(("any", "b"), ("a", "b"), "kind", also=("any",)) == ["any", "b"]
    with pytest.raises(ValueError, match=r"^unknown kind\(s\) \['c'\]; known: any, a, b$"):
        known_names(["a", "c"], ("a", "b"), "kind", also=("any",))
    with pytest.raises(ValueError, match=r"^unknown probe\(s\) \['x'\]; bundled probes: a$"):
        known_names("x", ("a",), "probe", label="bundled probes")
