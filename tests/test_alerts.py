"""No silent no-learning: the no-learning, exploding and held-out-regression alerts, and fail_on."""

import json
import random

import pytest
from click.testing import CliRunner

from alignkit.cli import build_cli
from alignkit.config import DiagnosticsConfig, SFTConfig, as_config
from alignkit.eval.diagnostics import ALERT_KINDS, Diagnostics
from alignkit.train.loop import TrainingAborted
from tests.helpers import pref_rows, sft_rows, write_jsonl


def kinds(records, **cfg):
    return [a.kind for a in Diagnostics(DiagnosticsConfig(**cfg)).replay(records)]


def lines(n, **fn):
    """n train records; each keyword is a function step -> value."""
    return [{"step": s, **{k.replace("__", "/"): f(s) for k, f in fn.items()}} for s in range(1, n + 1)]


def test_no_learning_checks_fire_after_stall_steps_only():
    ok_loss = lambda s: 2.0 / s  # noqa: E731
    assert kinds(lines(4, train__grad_norm=lambda s: 0.0, train__loss=ok_loss), stall_steps=5) == []
    assert kinds(lines(5, train__grad_norm=lambda s: 0.0, train__loss=ok_loss), stall_steps=5) == ["zero_grad"]
    # ln(V) for a uniform output: a flat loss, even with a non-zero gradient
    assert kinds(lines(6, train__loss=lambda s: 4.8520, train__grad_norm=lambda s: 1.0), stall_steps=6) \
        == ["stuck_loss"]
    # a loss that moves a little is not stuck
    assert kinds(lines(20, train__loss=lambda s: 4.85 + 1e-3 * (s % 2)), stall_steps=6) == []
    assert kinds(lines(3, rewards__std=lambda s: 0.0), stall_steps=3) == ["constant_reward"]
    assert kinds(lines(3, rewards__zero_std_groups=lambda s: 1.0, rewards__std=lambda s: 0.3), stall_steps=3) \
        == ["constant_reward"]
    assert kinds(lines(3, rewards__zero_std_groups=lambda s: 0.75), stall_steps=3) == []
    assert kinds(lines(3, rollout__eos_rate=lambda s: 0.0), stall_steps=3) == ["all_truncated"]
    assert kinds(lines(3, rollout__eos_rate=lambda s: 0.1 * (s > 2)), stall_steps=3) == []
    assert kinds(lines(3, train__units=lambda s: 0.0), stall_steps=3) == ["all_masked"]
    # a condition that clears (one good step) restarts the count
    trace = lines(3, train__grad_norm=lambda s: 0.0 if s != 2 else 0.5)
    assert kinds(trace, stall_steps=2) == []


def test_exploding_weights_and_gradients():
    w = [{"step": 0, "train/weight_rms": 0.5}, {"step": 1, "train/weight_rms": 1.25},
         {"step": 2, "train/weight_rms": 1.55}]
    d = Diagnostics(DiagnosticsConfig(weight_growth=3.0))
    alerts = d.replay(w)
    assert [a.kind for a in alerts] == ["exploding"] and alerts[0].step == 2
    assert "from 0.5 (step 0) to 1.55 (step 2), 3.1x" in alerts[0].message
    # LoRA: adapters that start near zero may grow several-fold and stay small: not an explosion
    lora = [{"step": 0, "train/weight_rms": 0.01}, {"step": 30, "train/weight_rms": 0.08}]
    assert kinds(lora) == []
    g = lines(9, train__grad_norm=lambda s: 1.0 + 0.1 * s if s < 9 else 400.0)
    assert kinds(g, window=5, grad_growth=100.0, patience=1) == ["exploding"]
    assert kinds(lines(40, train__grad_norm=lambda s: 1.0 + 0.5 * (s % 3))) == []


def heldout_kinds(before, after, key="eval/accuracy", **cfg):
    """Alerts of two evaluations (steps 0 and 30) with per-example values ``before`` and ``after``."""
    d = Diagnostics(DiagnosticsConfig(**cfg))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    out = d.update(0, {key: mean(before)}, examples={key: before})
    return out + d.update(30, {key: mean(after)}, examples={key: after})


def test_heldout_regression_fires_on_a_significant_drop_only():
    # a real drop on 40 pairs: before training every pair ties (0.5); after, 32 ranked wrong, 8 right.
    # Per-pair change -0.5 (x32) and +0.5 (x8): mean -0.3, sd 0.4051, se 0.06405, t(39) = -4.68
    before, after = [0.5] * 40, [0.0] * 32 + [1.0] * 8
    (alert,) = heldout_kinds(before, after)
    assert alert.kind == "heldout_regression" and alert.step == 30
    assert "fell from 0.500 at step 0 to 0.200 at step 30" in alert.message
    assert "paired t test over 40 held-out examples: change -0.3, 95% interval -0.43 to -0.17" in alert.message
    assert "the check needs at least 20 examples" in alert.message
    # the reported case: 12 pairs whose margins moved by ~1e-6, so ties split either way (0.5 -> 0.333):
    # below the minimum count, and not significant either (change -1/6, t(11) = -1.17, p = 0.27)
    noise = [0.0] * 8 + [1.0] * 4
    assert heldout_kinds([0.5] * 12, noise) == []
    assert heldout_kinds([0.5] * 12, noise, heldout_min_examples=2) == []
    # the same split on 48 pairs (0.5 -> 0.333) is a finding, not noise:
    # change -1/6, sd 0.4764, se 0.06876, t(47) = -2.42 (p = 0.019): the check fires
    assert [a.kind for a in heldout_kinds([0.5] * 48, noise * 4)] == ["heldout_regression"]
    # a significant but tiny drop (every pair 0.02 lower) is below heldout_drop: quiet
    assert heldout_kinds([0.6] * 30, [0.58] * 30) == []
    # an improvement never fires
    assert heldout_kinds([0.5] * 40, [1.0] * 30 + [0.0] * 10) == []


def test_heldout_regression_loss_and_missing_examples():
    # the held-out loss of 30 examples: +10% on each, with spread: significant -> fires
    before = [2.0 + 0.1 * (i % 5) for i in range(30)]
    after = [v * 1.1 + 0.01 * (i % 3 - 1) for i, v in enumerate(before)]
    (alert,) = heldout_kinds(before, after, key="eval/loss")
    assert "held-out loss (eval/loss) rose" in alert.message and "over 30 held-out examples" in alert.message
    # +10% on average, but half the examples up and half down: not significant
    mixed = [v * (1.6 if i % 2 else 0.6) for i, v in enumerate(before)]
    assert sum(mixed) / 30 > 1.05 * sum(before) / 30
    assert heldout_kinds(before, mixed, key="eval/loss") == []
    # without per-example values (a replay of metrics.jsonl) the check does not judge
    assert kinds([{"step": 0, "eval/accuracy": 0.5}, {"step": 9, "eval/accuracy": 0.1}]) == []
    # the baseline given back on resume counts as the values before training
    d = Diagnostics(DiagnosticsConfig())
    d.replay([{"step": 0, "eval/accuracy": 0.5}])
    d.set_heldout_baseline({"eval/accuracy": [0.5] * 40})
    assert [a.kind for a in d.update(50, {"eval/accuracy": 0.2},
                                     examples={"eval/accuracy": [0.0] * 32 + [1.0] * 8})] == ["heldout_regression"]


def test_diagnostics_config_is_one_class_and_validates():
    from alignkit import config

    assert config.DiagnosticsSection is DiagnosticsConfig
    assert SFTConfig.model_fields["diagnostics"].annotation is DiagnosticsConfig
    # the reported case: window=2 passed the section's validation, then crashed at start
    res = CliRunner().invoke(build_cli(), ["sft", "diagnostics.window=2"])
    assert res.exit_code == 2 and "diagnostics.window: Input should be greater than or equal to 3" in res.output
    res = CliRunner().invoke(build_cli(), ["sft", "diagnostics.fail_on=[stuck_los]"])
    assert res.exit_code == 2 and "unknown alert kind(s) ['stuck_los']" in res.output
    assert as_config(SFTConfig, {}, {"diagnostics.fail_on": "any"}).diagnostics.fail_on == ["any"]
    assert set(ALERT_KINDS) >= {"zero_grad", "stuck_loss", "constant_reward", "all_truncated", "all_masked",
                                "exploding", "heldout_regression"}


def _alerts(out):
    path = out / "alerts.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_lr_1e4_raises_the_alerts_and_fail_on_aborts(tmp_path, tiny_model, jsonl):
    from alignkit.train.sft import train_sft

    data = jsonl("sft.jsonl", sft_rows(16))
    base = {"model.name_or_path": str(tiny_model), "data.path": str(data), "train.batch_size": 8,
            "optim.lr": 1e4, "train.max_steps": 6, "log.progress": False, "log.samples": 0,
            "diagnostics.stall_steps": 3}
    train_sft(**base, output=str(tmp_path / "warn"))  # exit 0 as before, but not silent
    found = {a["kind"] for a in _alerts(tmp_path / "warn")}
    assert "exploding" in found and found & {"stuck_loss", "zero_grad"}, found
    report = (tmp_path / "warn" / "report.html").read_text()
    assert "exploding" in report
    args = ["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "abort"),
            "--max-steps", "6", "optim.lr=1e4", "train.batch_size=8", "log.progress=false", "log.samples=0",
            "diagnostics.stall_steps=3", "diagnostics.fail_on=[stuck_loss]"]
    res = CliRunner().invoke(build_cli(), args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "step 4: stuck_loss alert, and diagnostics.fail_on includes it" in " ".join(res.output.split())
    assert [a["kind"] for a in _alerts(tmp_path / "abort")][-1] == "stuck_loss"
    steps = [json.loads(l)["step"] for l in (tmp_path / "abort" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # stopped at the alert, not at max_steps
    assert not (tmp_path / "abort" / "model").exists()
    assert (tmp_path / "abort" / "report.html").exists()
    # [any]: the first alert of all (exploding, at step 1) stops the run
    args = [str(tmp_path / "any") if a == str(tmp_path / "abort") else a for a in args[:-1]]
    res = CliRunner().invoke(build_cli(), args + ["diagnostics.fail_on=any"])
    assert res.exit_code == 1 and "step 1: exploding alert" in " ".join(res.output.split())
    assert [a["kind"] for a in _alerts(tmp_path / "any")] == ["exploding"]


def test_every_label_masked_is_caught_before_the_first_step(tmp_path, tiny_model, jsonl):
    from alignkit.data import prepare
    from alignkit.models.loading import load_causal_lm, load_tokenizer
    from alignkit.train.common import start_run
    from alignkit.train.loop import Trainer
    from alignkit.train.sft import SFTTask

    cfg = as_config(SFTConfig, {"model": {"name_or_path": str(tiny_model)},
                                "data": {"path": str(jsonl("d.jsonl", sft_rows(8)))}, "output": str(tmp_path / "r"),
                                "log": {"progress": False}, "train": {"max_steps": 2},
                                "diagnostics": {"fail_on": ["all_masked"]}}, {})
    acc = start_run(cfg)
    tok = load_tokenizer(cfg.model)
    prep = prepare("sft", cfg.data, tok)
    for it in prep.train:  # a masking bug: no label survives
        it["loss_mask"] = [0] * len(it["loss_mask"])
    tr = Trainer(cfg, SFTTask(tok.pad_token_id), load_causal_lm(cfg.model), prep.train, accelerator=acc)
    with pytest.raises(TrainingAborted, match="step 0: all_masked alert"):
        tr.fit()
    assert tr.step == 0
    assert [a["kind"] for a in _alerts(tmp_path / "r")] == ["all_masked"]


CONST = "def const(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"


def test_constant_reward_raises_the_alert_and_fail_on_aborts(tmp_path, tiny_model):
    from alignkit.train.grpo import train_grpo

    (tmp_path / "r.py").write_text(CONST)
    rng = random.Random(0)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w:" + "".join(rng.choice("mnop") for _ in range(3))}
                                                 for _ in range(8)])
    base = {"model.name_or_path": str(tiny_model), "data.path": str(prompts), "rewards": [f"python:{tmp_path / 'r.py'}:const"],
            "generation.max_new_tokens": 4, "train.batch_size": 4, "grpo.num_generations": 2, "train.max_steps": 3,
            "log.progress": False, "log.samples": 0, "diagnostics.stall_steps": 3}
    train_grpo(**base, output=str(tmp_path / "warn"))
    found = [a["kind"] for a in _alerts(tmp_path / "warn")]
    assert "constant_reward" in found, found
    with pytest.raises(TrainingAborted, match="constant_reward alert, and diagnostics.fail_on includes it"):
        train_grpo(**base, output=str(tmp_path / "abort"), **{"diagnostics.fail_on": ["constant_reward"]})


def test_demo_style_dpo_regression_raises_the_alert(tmp_path, tiny_model):
    """Training prefers consonants, the held-out pairs prefer vowels: held-out accuracy falls below
    its 0.5 before training, significantly over 24 pairs, and alerts.jsonl says so."""
    from alignkit.train.preference import train_dpo

    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                   for r in pref_rows(24, 1)])
    held = write_jsonl(tmp_path / "held.jsonl", pref_rows(24, 2))
    s = train_dpo(**{"model.name_or_path": str(tiny_model), "data.path": str(train), "data.eval_path": str(held),
                     "train.epochs": 2, "train.batch_size": 8, "optim.lr": 2e-3, "log.progress": False,
                     "log.samples": 0}, output=str(tmp_path / "dpo"))
    assert s["eval/accuracy_before"] == pytest.approx(0.5) and s["eval/accuracy"] < 0.3, s
    alerts = _alerts(tmp_path / "dpo")
    assert [a["kind"] for a in alerts if a["kind"] == "heldout_regression"] == ["heldout_regression"]
    message = next(a["message"] for a in alerts if a["kind"] == "heldout_regression")
    assert "Held-out accuracy (eval/accuracy) fell from 0.500 at step 0" in message
    assert "paired t test over 24 held-out examples" in message
    # the per-pair values before training, kept for a resume
    assert json.loads((tmp_path / "dpo" / "heldout_examples_before.json").read_text())["eval/accuracy"] == [0.5] * 24


def test_online_eval_hands_per_prompt_accuracy_to_the_heldout_check(tmp_path, tiny_model):
    """GRPO with a reward component named accuracy: its held-out per-prompt means reach the check (and
    the file a resume reads), one value per held-out prompt."""
    from alignkit.train.grpo import train_grpo

    (tmp_path / "r.py").write_text("def acc(prompts, completions, **kw):\n"
                                   "    return [float(len(c) % 2) for c in completions]\n")
    rng = random.Random(0)
    rows = [{"prompt": "w:" + "".join(rng.choice("mnop") for _ in range(3))} for _ in range(10)]
    train = write_jsonl(tmp_path / "p.jsonl", rows[:6])
    held = write_jsonl(tmp_path / "h.jsonl", rows[6:])
    train_grpo(**{"model.name_or_path": str(tiny_model), "data.path": str(train), "data.eval_path": str(held),
                  "rewards": [{"kind": "python", "arg": f"{tmp_path / 'r.py'}:acc", "name": "accuracy"}],
                  "generation.max_new_tokens": 4, "train.batch_size": 2, "grpo.num_generations": 2,
                  "train.max_steps": 1, "eval_samples": 2, "log.progress": False, "log.samples": 0},
               output=str(tmp_path / "g"))
    before = json.loads((tmp_path / "g" / "heldout_examples_before.json").read_text())
    values = before["eval/rewards/accuracy"]
    assert len(values) == 4 and set(values) <= {0.0, 0.5, 1.0}  # 2 samples per prompt, scores 0 or 1
    first = json.loads((tmp_path / "g" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["eval/rewards/accuracy"] == pytest.approx(sum(values) / 4)


def test_end_of_run_reports_conditions_that_held_for_the_whole_short_run():
    """Shorter than stall_steps: nothing live, but the end of the run names every no-learning condition
    that held on each logged step; one good step, or a condition already reported, means no end alert."""
    def end(records, **cfg):
        d = Diagnostics(DiagnosticsConfig(**cfg))
        live = [a.kind for a in d.replay(records)]
        return live, [a.kind for a in d.end_of_run(records[-1]["step"] if records else 0)]

    assert end(lines(3, rewards__std=lambda s: 0.0, train__grad_norm=lambda s: 0.0)) == \
        ([], ["zero_grad", "constant_reward"])
    assert end(lines(1, rewards__zero_std_groups=lambda s: 1.0, rewards__std=lambda s: 0.4)) == ([], ["constant_reward"])
    assert end(lines(2, rollout__eos_rate=lambda s: 0.0, train__units=lambda s: 0.0)) == \
        ([], ["all_truncated", "all_masked"])
    # broken once: not "held for every step"
    assert end(lines(3, rewards__std=lambda s: 0.1 * (s == 2), train__grad_norm=lambda s: 0.5 * (s == 3),
                     rollout__eos_rate=lambda s: 0.25 * (s == 1), rewards__zero_std_groups=lambda s: 0.5)) == ([], [])
    # a flat loss over a short run is not judged (a few equal losses do not show that nothing moved)
    assert end(lines(3, train__loss=lambda s: 4.85)) == ([], [])
    # already reported live (the run reached stall_steps): not again at the end
    assert end(lines(4, train__grad_norm=lambda s: 0.0), stall_steps=3) == (["zero_grad"], [])
    assert end([]) == ([], [])
    d = Diagnostics()
    d.replay(lines(2, rewards__std=lambda s: 0.0))
    (alert,) = d.end_of_run(2)
    assert alert.step == 2 and "in all 2 logged steps of this run" in alert.message and d.alerts == [alert]
    assert "constant_reward" in d.active


def _grpo_base(tmp_path, tiny_model, reward_src, name):
    (tmp_path / f"{name}.py").write_text(reward_src)
    rng = random.Random(0)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w:" + "".join(rng.choice("mnop") for _ in range(3))}
                                                 for _ in range(8)])
    return {"model.name_or_path": str(tiny_model), "data.path": str(prompts),
            "rewards": [f"python:{tmp_path / name}.py:{name}"], "generation.max_new_tokens": 6,
            "train.batch_size": 4, "grpo.num_generations": 4, "train.max_steps": 3, "optim.lr": 1e-2,
            "log.progress": False, "log.samples": 0}


def test_three_step_grpo_on_a_constant_reward_says_so_at_the_end(tmp_path, tiny_model, capsys):
    """The default stall_steps (10) is longer than the run: the alert comes at the end, in the log,
    alerts.jsonl and report.html; fail_on applies. A run whose rewards differ gets no such alert."""
    from alignkit.train.grpo import train_grpo

    base = _grpo_base(tmp_path, tiny_model, CONST, "const")
    assert DiagnosticsConfig().stall_steps == 10
    train_grpo(**base, output=str(tmp_path / "warn"))
    alerts = _alerts(tmp_path / "warn")
    const = [a for a in alerts if a["kind"] == "constant_reward"]
    assert len(const) == 1 and const[0]["step"] == 3, alerts
    assert "every reward equal in all 3 logged steps of this run" in const[0]["message"]
    assert "constant_reward" in " ".join(capsys.readouterr().err.split())
    assert "constant_reward" in (tmp_path / "warn" / "report.html").read_text()
    with pytest.raises(TrainingAborted, match=r"end of run \(step 3\): constant_reward alert, and diagnostics.fail_on"):
        train_grpo(**base, output=str(tmp_path / "abort"), **{"diagnostics.fail_on": ["constant_reward"]})
    assert not (tmp_path / "abort" / "model").exists()

    vowels = "def vowels(prompts, completions, **kw):\n    return [sum(c in 'aeiou' for c in x) / (1 + len(x)) for x in completions]\n"
    learn = _grpo_base(tmp_path, tiny_model, vowels, "vowels")
    train_grpo(**learn, output=str(tmp_path / "learn"))
    metrics = [json.loads(l) for l in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rewards/std"] > 0 for m in metrics if "rewards/std" in m)
    kinds = {a["kind"] for a in _alerts(tmp_path / "learn")}
    assert not kinds & {"constant_reward", "zero_grad", "all_masked"}, kinds
