"""Iterative DPO and SPIN: pairing, config checks, and on controlled tasks with a tiny model, each
measurably improves what it optimizes (run from the CLI end to end)."""

import json
import random

import pytest

from alignkit.config import ConfigError, build_config
from alignkit.feedback.iterative import IterativeDPOConfig, best_vs_worst, round_slice
from alignkit.feedback.spin import SPINConfig

FAST = ["log.progress=false", "log.samples=0", "diagnostics.enabled=false", "optim.scheduler=constant"]


def test_best_vs_worst_pairs_ties_and_empties():
    texts = ["a", "bb", "c", "", "x", "y", "z", "only", ""]
    rewards = [0.1, 0.9, 0.5, 5.0, 0.3, 0.3, 0.3, 1.0, 2.0]
    groups = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    pairs, counts = best_vs_worst(texts, rewards, groups)
    assert pairs == [(0, "bb", "a", 0.9, 0.1)]  # the empty sample (reward 5.0) is left out
    assert counts == {"empty_samples": 2, "too_few_samples": 1, "ties": 1}
    pairs, counts = best_vs_worst(["a", "b"], [0.5, 0.45], [0, 0], min_gap=0.1)
    assert pairs == [] and counts["ties"] == 1


def test_round_slice_cycles():
    items = list(range(5))
    assert round_slice(items, 1, None) == items
    assert round_slice(items, 1, 2) == [0, 1] and round_slice(items, 3, 2) == [4, 0]


def test_config_errors_name_the_field():
    base = {"iterative": {"reward": "python:alignkit.rewards.toy:char_share"}}
    assert IterativeDPOConfig.model_validate(base).iterative.reward == ["python:alignkit.rewards.toy:char_share"]
    with pytest.raises(ValueError, match="unknown reward kind 'bogus'"):
        IterativeDPOConfig.model_validate({"iterative": {"reward": "bogus:x"}})
    with pytest.raises(ConfigError, match="  iterative.reward: Field required"):
        build_config(IterativeDPOConfig, {"iterative": {"rounds": 2}})
    with pytest.raises(ConfigError, match="  iterative.reward: Field required"):
        build_config(IterativeDPOConfig, {})
    with pytest.raises(ValueError, match="dpo.loss='kto' is unpaired"):
        IterativeDPOConfig.model_validate({**base, "dpo": {"loss": "kto"}})
    with pytest.raises(ValueError, match="dpo.ref_model is set per round"):
        SPINConfig.model_validate({"dpo": {"ref_model": "x"}})


def prompt_rows(n, seed):
    rng = random.Random(seed)
    return [{"prompt": "w:" + "".join(rng.choice("mnop") for _ in range(3))} for _ in range(n)]


def test_iterative_dpo_raises_the_gold_reward(tmp_path, tiny_model, jsonl):
    """Controlled task: reward = share of 'a' among the characters of a reply. A random tiny model writes
    'a' about 1% of the time; two rounds of on-policy best-vs-worst DPO make it far more frequent."""
    from alignkit.cli import build_cli

    train, held = jsonl("train.jsonl", prompt_rows(32, 0)), jsonl("eval.jsonl", prompt_rows(8, 1))
    out = tmp_path / "it"
    args = ["iterative-dpo", "--model", str(tiny_model), "--data", str(train), "--output", str(out),
            "--reward", "python:alignkit.rewards.toy:char_share", "--rounds", "2",
            f"data.eval_path={held}", "iterative.samples_per_prompt=8", "iterative.eval_samples=8",
            "generation.max_new_tokens=8", "generation.batch_size=64", "train.epochs=4",
            "train.batch_size=16", "optim.lr=3e-2", "iterative.keep_round_models=false", *FAST]
    build_cli().main(args, standalone_mode=False)
    s = json.loads((out / "summary.json").read_text())
    r = s["reward_per_round"]
    assert len(r) == 3 and s["eval_split"] == "eval"
    assert r[0] < 0.03  # about 1/97
    assert r[-1] > r[0] + 0.1, r  # measured: 0.013 -> 0.048 -> 0.48 (CPU)
    assert all(p > 0 for p in s["pairs_per_round"])
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds] == [0, 1, 2]
    pairs = [json.loads(line) for line in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == rounds[1]["pairs"] and all(p["reward_chosen"] > p["reward_rejected"] for p in pairs)
    samples = (out / "round-1" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 32 * 8
    d = rounds[1]["dropped"]
    assert rounds[1]["pairs"] + d["too_few_samples"] + d["ties"] == 32  # every prompt is accounted for
    # keep_round_models=false: round 1's weights went once round 2 existed; the final model stays
    assert not (out / "round-1" / "model").exists() and (out / "round-2" / "model").is_dir()
    assert s["model_dir"] == str(out / "round-2" / "model")

    # --resume with the same config skips the finished rounds (their DONE hash matches) and reproduces
    # the summary without training again, though round 1's model was deleted
    build_cli().main(args + ["--resume", "latest"], standalone_mode=False)
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["reward_per_round"] == r and resumed["eval_split"] == "eval"
    events = [json.loads(x) for x in (out / "pipeline.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["action"]) for e in events[-3:]] == [(f"round-{k}", "skipped") for k in range(3)]


def test_spin_raises_data_likelihood_over_own_generations(tmp_path, tiny_model, jsonl):
    """SFT data: reply to "w:XYZ" with "ZYXok". SPIN's rounds make the data's responses far more likely
    than the model's own generations (the margin log p(y) - log p(y'), summed over response tokens)."""
    from alignkit.cli import build_cli

    rng = random.Random(0)
    rows = []
    for _ in range(24):
        p = "".join(rng.choice("mnop") for _ in range(3))
        rows.append({"prompt": "w:" + p, "completion": p[::-1] + "ok"})
    rows.append({"text": "no prompt here"})
    data = jsonl("sft.jsonl", rows)
    out = tmp_path / "spin"
    build_cli().main(["spin", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--rounds", "2",
                      "generation.max_new_tokens=8", "generation.batch_size=64", "train.epochs=4",
                      "train.batch_size=8", "optim.lr=1e-2", *FAST], standalone_mode=False)
    s = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:  # every prompt is a pair or counted (empty generations appear as the model learns EOS)
        assert r["pairs"] + sum(r["dropped"].values()) == 24 and r["pairs"] >= 12
    for before, after in zip(s["margin_before_per_round"], s["margin_after_per_round"]):
        assert after > before + 10, s  # each round widens the gap on its own pairs (measured +31, +29)
    # the final model on round 1's pairs (data vs the starting model's generations): measured 12 -> 60+
    assert s["margin_final"] > s["margin_initial"] + 20, s
    assert s["logp_data_final"] > s["logp_data_initial"] + 10, s  # measured -27.4 -> -9
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"SPIN needs a prompt to generate from ({text} rows have none)": 1}
    pairs = [json.loads(line) for line in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] == p["prompt"][2:][::-1] + "ok" and p["rejected"] != p["chosen"] for p in pairs)


def _events(out):
    return [(e["stage"], e["action"]) for e in map(json.loads, (out / "pipeline.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("command", ["iterative-dpo", "spin"])
def test_rounds_rerun_when_the_config_changes_and_skip_when_it_does_not(command, tmp_path, tiny_model, jsonl):
    """Rounds are stages of a generated pipeline on the one resumable runner: --resume skips a finished
    round only when its config hash matches; a changed config reruns the rounds; more rounds keep the
    finished ones."""
    from alignkit.cli import build_cli

    out = tmp_path / command
    if command == "spin":
        data = jsonl("d.jsonl", [{"prompt": f"w:{c}", "completion": c * 3 + "ok"} for c in "mnopqr"])
        extra = []
    else:
        data = jsonl("d.jsonl", prompt_rows(6, 0))
        extra = ["--reward", "python:alignkit.rewards.toy:char_share", "iterative.samples_per_prompt=4",
                 "iterative.eval_samples=1"]
    base = [command, "--model", str(tiny_model), "--data", str(data), "--output", str(out), *extra,
            "generation.max_new_tokens=4", "train.max_steps=1", "train.batch_size=4", *FAST]
    first = 0 if command == "iterative-dpo" else 1
    names = [f"round-{k}" for k in range(first, 2)]

    def run(*more):
        build_cli().main(base + list(more), standalone_mode=False)
        return json.loads((out / "summary.json").read_text())

    s1 = run("--rounds", "1")
    assert _events(out) == [(n, "ran") for n in names]
    stamp = (out / "round-1" / "DONE").stat().st_mtime_ns
    s2 = run("--rounds", "1", "--resume", "latest")  # unchanged: every round skipped, same numbers
    assert _events(out)[len(names):] == [(n, "skipped") for n in names]
    assert (out / "round-1" / "DONE").stat().st_mtime_ns == stamp and s2 == s1
    run("--rounds", "1", "--resume", "latest", "dpo.beta=0.5")  # changed: every round runs again
    assert _events(out)[2 * len(names):] == [(n, "ran") for n in names]
    assert (out / "round-1" / "DONE").stat().st_mtime_ns != stamp
    assert json.loads((out / "round-1" / "DONE").read_text())["config_hash"] != \
        json.loads((out / "pipeline.jsonl").read_text().splitlines()[len(names) - 1])["hash"]
    s4 = run("--rounds", "2", "--resume", "latest", "dpo.beta=0.5")  # one more round: the others stay
    assert _events(out)[3 * len(names):] == [(n, "skipped") for n in names] + [("round-2", "ran")]
    assert len(s4["pairs_per_round"]) == 2
    run("--rounds", "2", "dpo.beta=0.5")  # without --resume every round runs afresh
    assert _events(out)[3 * len(names) + len(names) + 1:] == [(n, "ran") for n in names + ["round-2"]]
