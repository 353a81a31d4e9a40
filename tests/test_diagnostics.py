"""Each failure-mode alert fires on a trace showing it and stays silent on healthy traces."""

import math
import random

import pytest

from alignkit.eval.diagnostics import Alert, Diagnostics, DiagnosticsConfig, fit_trend

STEPS = 80


# per-key noise scale (standard deviation at noise=1.0), roughly batch-to-batch noise of real runs
NOISE = {"train/loss": 0.05, "kl/ref": 1.0, "rollout/length_mean": 8.0, "rewards/mean": 0.05,
         "diversity/distinct_2": 0.03, "rewards/margin": 0.1, "logps/chosen": 1.5,
         "eval/rewards/gold": 0.015}


def healthy(s: int) -> dict:
    """One train line of a well-behaved run, before noise: reward and margin rise and saturate,
    KL stays under budget, length and diversity roughly flat, chosen log-probs roughly flat."""
    return {
        "train/loss": 1.0 * math.exp(-s / 30) + 0.2,
        "kl/ref": 6.0 * (1 - math.exp(-s / 25)),
        "rollout/length_mean": 120 + 0.05 * s,
        "rewards/mean": 1 - math.exp(-s / 20),
        "diversity/distinct_2": 0.62 - 0.0008 * s,
        "rewards/margin": 2 * (1 - math.exp(-s / 20)),
        "logps/chosen": -80 - 0.02 * s,
    }


def healthy_gold(s: int) -> float:
    return 0.3 + 0.3 * (1 - math.exp(-s / 25))


def trace(noise=0.0, seed=0, steps=STEPS, train=None, gold=healthy_gold):
    """metrics.jsonl-like records: a train line per step, an eval line every 5 steps.
    ``train(s, line)`` may overwrite keys of the clean healthy line to inject a failure;
    Gaussian noise (``noise`` times the NOISE scales) is added afterwards."""
    rng = random.Random(seed)
    records = []
    for s in range(steps):
        line = healthy(s)
        if train is not None:
            train(s, line)
        records.append({"step": s, **{k: v + rng.gauss(0, NOISE[k] * noise) for k, v in line.items()}})
        if s % 5 == 0:
            g = gold(s) + rng.gauss(0, NOISE["eval/rewards/gold"] * noise)
            records.append({"step": s, "eval/rewards/gold": g})
    return records


def kinds(records, config=None):
    return [a.kind for a in Diagnostics(config).replay(records)]


def kl_blowup(s, line):
    if s >= 30:
        line["kl/ref"] = 6.0 + 1.0 * (s - 30)  # +1 nat per step past step 30


def verbose(s, line):
    line["rollout/length_mean"] = 120 * (1 + 0.03 * s)  # 120 -> 404 tokens as reward rises


def collapse(s, line):
    line["diversity/distinct_2"] = 0.62 * math.exp(-s / 25)


def proxy_up(s, line):
    line["rewards/mean"] = 0.02 * s  # proxy keeps rising linearly


def overopt_gold(s):
    # gold rises to 0.6 at step 40, then falls back (Gao et al. 2022's hump)
    return 0.3 + 0.3 * s / 40 if s < 40 else 0.6 - 0.3 * (s - 40) / 40


def displaced(s, line):
    line["logps/chosen"] = -80 - 0.5 * s  # chosen falls 40 nats while the margin grows


FAILURES = {
    "kl_blowup": dict(train=kl_blowup),
    "verbosity": dict(train=verbose),
    "mode_collapse": dict(train=collapse),
    "overoptimization": dict(train=proxy_up, gold=overopt_gold),
    "likelihood_displacement": dict(train=displaced),
}


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_each_alert_fires_once_on_its_failure(kind, noise):
    # exactly that kind, exactly once (the condition persists, so it never re-fires)
    assert kinds(trace(noise=noise, seed=1, **FAILURES[kind])) == [kind]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("noise", [0.0, 1.0, 1.5])
def test_healthy_traces_are_silent(seed, noise):
    assert kinds(trace(noise=noise, seed=seed, steps=150)) == []


def test_kl_message_has_numbers_and_advice():
    diag = Diagnostics(DiagnosticsConfig(kl_budget=10.0))
    assert diag.update(0, {"kl/ref": 14.2}) == []  # patience 2: one observation is not enough
    alerts = diag.update(1, {"kl/ref": 14.2})
    assert [a.kind for a in alerts] == ["kl_blowup"]
    msg = alerts[0].message
    assert "14.2 nats/sequence" in msg and "budget 10.0" in msg and "beta" in msg
    assert alerts[0].step == 1 and diag.active == {"kl_blowup"}
    assert alerts[0].to_dict() == {"step": 1, "kind": "kl_blowup", "message": msg}


def test_fires_again_only_after_clearing():
    cfg = DiagnosticsConfig(kl_budget=10.0, window=3, patience=1, clear_after=5)
    diag = Diagnostics(cfg)
    fired = []
    # 10 steps over budget, 10 well under (window mean falls below budget at the 3rd, clears
    # after 5 false evaluations), then over budget again
    values = [20.0] * 10 + [1.0] * 10 + [20.0] * 10
    for s, v in enumerate(values):
        fired += [a.step for a in diag.update(s, {"kl/ref": v})]
    assert fired == [0, 21]  # step 21: window mean (1 + 20 + 20) / 3 = 13.7 > 10 again


def test_brief_dip_does_not_refire():
    diag = Diagnostics(DiagnosticsConfig(window=3, patience=1, clear_after=5))
    values = [20.0] * 5 + [1.0] * 4 + [20.0] * 5  # only 4 steps under: not cleared
    fired = [a.step for s, v in enumerate(values) for a in diag.update(s, {"kl/ref": v})]
    assert fired == [0]


def test_nan_kl_fires_immediately():
    diag = Diagnostics()
    diag.update(0, {"kl/ref": 1.0})
    alerts = diag.update(1, {"kl/ref": float("nan")})
    assert [a.kind for a in alerts] == ["kl_blowup"] and "nan" in alerts[0].message


def test_missing_keys_skip_checks():
    diag = Diagnostics()
    assert diag.update(0, {}) == []
    for s in range(50):  # only unrelated, wildly changing keys
        assert diag.update(s, {"train/loss": 100.0 - 2 * s, "optim/lr": 1e-5 * s}) == []
    # length explodes but no reward is logged: verbosity cannot be judged, stays silent
    for s in range(50):
        assert diag.update(s, {"rollout/length_mean": 100.0 * (1 + 0.1 * s)}) == []


def test_messages_are_readable_sentences():
    for kind, spec in FAILURES.items():
        (alert,) = Diagnostics().replay(trace(**spec))
        assert isinstance(alert, Alert) and alert.kind == kind
        assert alert.message.endswith(".") and any(ch.isdigit() for ch in alert.message)
    (over,) = Diagnostics().replay(trace(**FAILURES["overoptimization"]))
    assert "Gao et al. 2022" in over.message
    assert "best gold reward (0.600 at step 40)" in over.message
    (disp,) = Diagnostics().replay(trace(**FAILURES["likelihood_displacement"]))
    assert "Razin et al. 2024" in disp.message and "Smaug" in disp.message


def test_fit_trend():
    # y = 2x + 1 on x = 0..4: slope 2, start 1, end 9, exact line -> t = inf
    tr = fit_trend([(x, 2 * x + 1) for x in range(5)])
    assert tr.slope == pytest.approx(2.0) and tr.start == pytest.approx(1.0)
    assert tr.end == pytest.approx(9.0) and tr.change == pytest.approx(8.0) and tr.t == math.inf
    assert tr.rising(7.9, 3.0) and not tr.rising(8.1, 3.0) and not tr.falling(0.0, 3.0)
    # y = [0, 1, 0, 1, 0]: mean 0.4, Σ(x-2)(y-0.4) = (-1)(0.6) + (1)(0.6) + ... = 0 -> slope 0
    flat = fit_trend([(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)])
    assert flat.slope == pytest.approx(0.0) and not flat.rising(0.0, 0.0)
    const = fit_trend([(x, 0.1) for x in range(5)])
    assert const.t == 0.0 and not const.rising(0.0, 0.0) and not const.falling(0.0, 0.0)
    assert fit_trend([(0, 1), (1, 2)]) is None
    assert fit_trend([(0, 1), (1, float("nan")), (2, 3)]) is None  # only 2 finite points


def test_config_validation():
    with pytest.raises(ValueError):
        DiagnosticsConfig(window=2)
    with pytest.raises(ValueError):
        DiagnosticsConfig(patience=0)
