"""Every registered paired preference loss against a slow reference written from its paper's equation
(and TRL 1.16's ``DPOTrainer`` formula where TRL has it), values and gradients.

Registry-driven: a loss registered without an entry in REFERENCES fails here, so a new loss is covered
as soon as it is registered and its reference written.
"""

import math

import pytest
import torch

from alignkit.losses import PREFERENCE_LOSSES, loss_hparams


def lsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# each reference takes python floats for ONE batch: lists pc, pr, rc, rr, lc, lr and hparams, and returns
# the per-example losses (batch-level losses may look at the whole batch)
def _per_example(f):
    def run(pc, pr, rc, rr, lc, lr, **hp):
        return [f(pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], **hp) for i in range(len(pc))]
    return run


def _smoothed(z, eps):
    return -(1 - eps) * lsig(z) - eps * lsig(-z)


def _aot(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    pol = sorted(c - r for c, r in zip(pc, pr))
    ref = sorted(c - r for c, r in zip(rc, rr))
    return [_smoothed(beta * (p - q), label_smoothing) for p, q in zip(pol, ref)]


def _aot_unpaired(pc, pr, rc, rr, lc, lr, beta, label_smoothing):
    a = sorted(x - y for x, y in zip(pc, rc))
    b = sorted(x - y for x, y in zip(pr, rr))
    return [_smoothed(beta * (x - y), label_smoothing) for x, y in zip(a, b)]


def _log_odds(m):
    return m - math.log(1 - math.exp(m))


REFERENCES = {
    # Rafailov et al. 2023 eq. 7 with smoothing q = 1 - eps
    "dpo": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, label_smoothing:
                        _smoothed(beta * ((pc - rc) - (pr - rr)), label_smoothing)),
    "cdpo": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, label_smoothing:
                         _smoothed(beta * ((pc - rc) - (pr - rr)), label_smoothing)),
    "robust": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, label_smoothing:
                           ((1 - label_smoothing) * -lsig(beta * ((pc - rc) - (pr - rr)))
                            - label_smoothing * -lsig(-beta * ((pc - rc) - (pr - rr)))) / (1 - 2 * label_smoothing)),
    "ipo": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                        ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2),
    "hinge": _per_example(lambda pc, pr, rc, rr, lc, lr, beta: max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))),
    "simpo": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, gamma: -lsig(beta * pc / lc - beta * pr / lr - gamma)),
    "orpo": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                         -pc / lc + beta * -lsig(_log_odds(pc / lc) - _log_odds(pr / lr))),
    # TRL 1.16 DPOTrainer, loss_type names
    "exo_pair": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, label_smoothing: (
        sig(beta * ((pc - rc) - (pr - rr))) * (lsig(beta * ((pc - rc) - (pr - rr))) - math.log(1 - label_smoothing))
        + sig(-beta * ((pc - rc) - (pr - rr))) * (lsig(-beta * ((pc - rc) - (pr - rr))) - math.log(label_smoothing)))),
    "nca_pair": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                             -lsig(beta * (pc - rc)) - 0.5 * lsig(-beta * (pc - rc)) - 0.5 * lsig(-beta * (pr - rr))),
    # Wang et al. 2024 (f-DPO), Jensen-Shannon: f'(u) = log(2u / (1 + u)) at u = exp(rho)
    "fdpo_js": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                            -lsig(beta * (lsig(pc - rc) - lsig(pr - rr)))),
    "bco_pair": _per_example(lambda pc, pr, rc, rr, lc, lr, beta: -lsig(beta * (pc - rc)) - lsig(-beta * (pr - rr))),
    "sppo_hard": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                              ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2),
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _per_example(lambda pc, pr, rc, rr, lc, lr, beta: 1 - sig(beta * (pc - rc)) + sig(beta * (pr - rr))),
    "apo_down": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                             sig(beta * (pc - rc)) + 1 - sig(beta * ((pc - rc) - (pr - rr)))),
    "discopop": _per_example(lambda pc, pr, rc, rr, lc, lr, beta, discopop_tau: (
        (1 - sig(beta * ((pc - rc) - (pr - rr)) / discopop_tau)) * -lsig(beta * ((pc - rc) - (pr - rr)))
        + sig(beta * ((pc - rc) - (pr - rr)) / discopop_tau) * math.exp(-beta * ((pc - rc) - (pr - rr))))),
    "sigmoid_norm": _per_example(lambda pc, pr, rc, rr, lc, lr, beta:
                                 -lsig(beta * ((pc - rc) / lc - (pr - rr) / lr))),
}

# hyper-parameters off their defaults, so a loss that ignores one is caught
HPARAMS = {"beta": 0.7, "label_smoothing": 0.15, "gamma": 0.3, "discopop_tau": 0.4}

PC, PR = [-3.0, -7.5, -2.2], [-4.0, -6.0, -9.1]
RC, RR = [-3.4, -6.0, -2.0], [-3.5, -6.8, -8.0]
LC, LR = [3.0, 5.0, 2.0], [4.0, 3.0, 6.0]

PAIRED = [name for name, spec in PREFERENCE_LOSSES.items() if spec.paired]


def _hp(name):
    return {k: HPARAMS[k] for k in loss_hparams(name)}


@pytest.mark.parametrize("name", PAIRED)
def test_every_paired_loss_has_a_reference(name):
    assert name in REFERENCES, f"loss {name!r} is registered without a reference in tests/test_losses_registry.py"


@pytest.mark.parametrize("name", [n for n in PAIRED if n in REFERENCES])
def test_loss_values_and_gradients_match_reference(name):
    spec = PREFERENCE_LOSSES.get(name)
    hp = _hp(name)
    t = lambda xs: torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    pc, pr = t(PC), t(PR)
    rc, rr = (torch.tensor(RC, dtype=torch.float64), torch.tensor(RR, dtype=torch.float64)) \
        if spec.needs_reference else (None, None)
    out = spec.fn(pc, pr, rc, rr, chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR), **hp)
    expected = REFERENCES[name](PC, PR, RC, RR, LC, LR, **hp)
    assert out.losses.shape == (3,)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert key in out.metrics
    # gradient of the summed loss against central differences of the reference
    out.losses.sum().backward()
    h = 1e-6
    for which, tensor in (("pc", pc), ("pr", pr)):
        for i in range(3):
            args = {"pc": list(PC), "pr": list(PR)}
            args[which][i] += h
            up = sum(REFERENCES[name](args["pc"], args["pr"], RC, RR, LC, LR, **hp))
            args[which][i] -= 2 * h
            down = sum(REFERENCES[name](args["pc"], args["pr"], RC, RR, LC, LR, **hp))
            assert tensor.grad[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7), (which, i)


def test_trl_multi_loss_is_the_weighted_sum():
    """TRL's ``loss_type: [sigmoid, sft, hinge]`` + ``loss_weights``: the DPO trainer's per-pair loss is
    w0 * dpo + w1 * nll(chosen)/|y_w| + w2 * hinge, computed by hand here."""
    from alignkit.config import build_config
    from alignkit.data.collate import collate_pairs
    from alignkit.testing import tiny_causal_lm
    from alignkit.train.preference import DPOConfig, PreferenceTask

    cfg = build_config(DPOConfig, {"loss_type": ["sigmoid", "sft", "hinge"], "loss_weights": [0.8, 0.3, 0.5],
                                   "beta": 0.5})
    opts = cfg.dpo
    assert (opts.loss, opts.loss_weight, opts.extra_losses, opts.sft_weight) == ("dpo", 0.8, {"hinge": 0.5}, 0.3)
    torch.manual_seed(0)
    model = tiny_causal_lm("llama")

    class Ref:  # fixed reference log-probs: the hand computation below needs them known
        def pair_logps(self, model, batch):
            return torch.tensor([-20.0, -25.0]), torch.tensor([-22.0, -21.0])

    items = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8], "row": 0},
             {"prompt_ids": [9, 2], "chosen_ids": [10, 11, 12], "rejected_ids": [13], "row": 1}]
    task = PreferenceTask(opts, pad_id=0, reference=Ref())
    batch = task.collate(items)
    total, metrics = task.loss(model, batch)
    pc, pr = metrics["logps/chosen"].tolist(), metrics["logps/rejected"].tolist()
    lc = metrics["lengths/chosen"].tolist()
    rc, rr = [-20.0, -25.0], [-22.0, -21.0]
    expected = 0.0
    for i in range(2):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected += 0.8 * -lsig(0.5 * h) + 0.3 * (-pc[i] / lc[i]) + 0.5 * max(0.0, 1 - 0.5 * h)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_trl_loss_names_and_errors():
    from alignkit.config import ConfigError, build_config
    from alignkit.train.preference import DPOConfig

    assert build_config(DPOConfig, {"loss_type": "aot_pair"}).dpo.loss == "aot_unpaired"
    assert build_config(DPOConfig, {"loss_type": ["sigmoid"]}).dpo.loss == "dpo"
    cfg = build_config(DPOConfig, {"loss_type": "discopop", "discopop_tau": 0.2})
    assert cfg.dpo.hparams_for("discopop") == {"discopop_tau": 0.2}
    with pytest.raises(ConfigError, match="loss_weights has 1 weights for 2 losses"):
        build_config(DPOConfig, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
    with pytest.raises(ConfigError, match="no registered loss takes it"):
        build_config(DPOConfig, {"dpo": {"hparams": {"tau": 1.0}}})
    from alignkit.losses import exo_pair_loss
    with pytest.raises(ValueError, match="exo_pair: label_smoothing"):
        exo_pair_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), label_smoothing=0.0)


def test_discopop_slope_at_zero_changes_sign_at_the_documented_tau():
    """d loss / d z at z = 0 is (1 - log 2) / (4 tau) - 3/4 (by hand from eq. 5): positive below tau ~0.102."""
    from alignkit.losses import discopop_loss
    from alignkit.losses.preference_variants import DISCOPOP_MONOTONE_TAU

    for tau in (0.05, 0.2):
        pc = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        discopop_loss(pc, zero, zero, zero, beta=1.0, discopop_tau=tau).losses.sum().backward()
        assert pc.grad.item() == pytest.approx((1 - math.log(2)) / (4 * tau) - 0.75, rel=1e-9)
    assert DISCOPOP_MONOTONE_TAU == pytest.approx(0.10228, abs=1e-5)
