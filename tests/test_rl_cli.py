"""Every online-RL and sampling command end to end from the CLI on the tiny model: rm -> ppo with the
trained reward model (critic initialised from it), GRPO on match:/regex: rewards with reference
answers, RLOO, best-of-N, rejection sampling feeding sft/dpo, and PPO's exact resume."""

import itertools
import json
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from alignkit.cli import build_cli
from tests.test_online_rl import prompt_rows
from tests.test_preference_training import pref_rows

CHAR = "python:alignkit.rewards.toy:char_share"
QUIET = ["log.progress=false", "log.samples=0", "generation.max_new_tokens=6"]


from tests.helpers import free_port  # noqa: E402
from tests.helpers import one_thread as _one_thread  # noqa: E402,F401  (autouse: one thread per module)


def cli(args):
    res = CliRunner().invoke(build_cli(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_rm_then_ppo_with_the_trained_reward_model(tmp_path, tiny_model, jsonl):
    prefs = jsonl("prefs.jsonl", pref_rows(32, 0))
    prompts = jsonl("prompts.jsonl", [{"prompt": r["prompt"]} for r in pref_rows(16, 1)])
    cli(["rm", "--model", tiny_model, "--data", prefs, "--output", tmp_path / "rm", "--max-steps", 3,
         "train.batch_size=8", "optim.lr=1e-3", "log.progress=false"])
    rm_dir = tmp_path / "rm" / "model"
    run = tmp_path / "ppo"
    cli(["ppo", "--model", tiny_model, "--data", prompts, "--output", run, "--max-steps", 2,
         "--reward", f"model:{rm_dir}", "--reward", "length:max=4@0.1", "--gold-reward", CHAR,
         "value.init=reward", "ppo.adaptive_kl=true", "ppo.kl_target=0.5", "ppo.epochs=2", "ppo.num_minibatches=2",
         "train.batch_size=4", "data.eval_fraction=0.25", *QUIET])
    rows = [r for r in metrics(run) if "rewards/mean" in r]
    assert len(rows) == 2
    for key in ("rewards/mean", "rewards/std", "rewards/model", "rewards/length", "rewards/gold", "kl/ref", "kl/coef",
                "policy/entropy", "policy/clip_frac", "policy/approx_kl", "value/loss", "value/explained_variance",
                "rollout/length_mean", "rollout/eos_rate", "diversity/distinct_2", "train/loss", "train/lr"):
        assert key in rows[-1], key
    assert rows[0]["rewards/model"] != 0.0  # the critic-free zero head would give 0; this is the trained RM
    assert rows[1]["kl/coef"] != rows[0]["kl/coef"]  # the adaptive controller moved beta
    cfg = (run / "config.yaml").read_text()
    assert "kind: model" in cfg and "kind: length" in cfg
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model")  # the policy alone, loadable
    assert (run / "report.html").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/rewards/gold" in summary and "eval/rewards/mean_before" in summary


def math_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.randint(0, 7)
        rows.append({"prompt": f"{a}+{7 - a}=", "answer": "7"})
    return rows


def test_grpo_trains_on_match_and_regex_rewards(tmp_path, tiny_model, jsonl):
    data = jsonl("math.jsonl", math_rows(48, 0))
    run = tmp_path / "grpo"
    cli(["grpo", "--model", tiny_model, "--data", data, "--output", run, "--max-steps", 16,
         "--reward", "match:answer", "--reward", "regex:^[0-9]@0.5", "--num-generations", 8,
         "train.batch_size=8", "optim.lr=1e-2", "optim.scheduler=constant", "grpo.aggregation=token_mean", *QUIET])
    rows = metrics(run)
    first, last = rows[:3], rows[-3:]

    def mean(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    print({k: (round(mean(first, k), 3), round(mean(last, k), 3)) for k in ("rewards/match", "rewards/regex")})
    assert mean(last, "rewards/regex") > mean(first, "rewards/regex") + 0.15
    assert mean(last, "rewards/match") > mean(first, "rewards/match") + 0.05
    assert all(0.0 <= r["rewards/match"] <= 1.0 for r in rows)
    assert all(r["rewards/mean"] == pytest.approx(r["rewards/match"] + 0.5 * r["rewards/regex"]) for r in rows)


def test_rloo_and_grpo_variants_run(tmp_path, tiny_model, jsonl):
    data = jsonl("p.jsonl", prompt_rows(16))
    cli(["rloo", "--model", tiny_model, "--data", data, "--output", tmp_path / "rloo", "--max-steps", 2,
         "--reward", CHAR, "--num-generations", 4, "train.batch_size=4", "rloo.epochs=2", "rloo.num_minibatches=2",
         "rloo.aggregation=sequence_mean", "missing_eos_penalty=0.5", *QUIET])
    rows = metrics(tmp_path / "rloo")
    assert rows[-1]["kl/ref"] > 0 and "policy/clip_frac" in rows[-1]  # clipped ratio with 2x2 updates
    # beta = 0 loads no reference and logs no KL; Dr. GRPO (no std scaling, sum_norm)
    cli(["grpo", "--model", tiny_model, "--data", data, "--output", tmp_path / "drgrpo", "--max-steps", 1,
         "--reward", CHAR, "--num-generations", 4, "train.batch_size=4", "grpo.beta=0", "grpo.scale_by_std=false",
         "grpo.aggregation=sum_norm", "--lora", "lora.r=4", *QUIET])
    rows = metrics(tmp_path / "drgrpo")
    assert "kl/ref" not in rows[-1] and "rewards/mean" in rows[-1]


def test_missing_reward_is_a_clear_error(tmp_path, tiny_model, jsonl):
    res = CliRunner().invoke(build_cli(), ["ppo", "--model", str(tiny_model), "--data", str(jsonl("p.jsonl", prompt_rows(2))),
                                           "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no reward: pass --reward" in res.output
    res = CliRunner().invoke(build_cli(), ["grpo", "--reward", "nope:x", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown reward kind 'nope'" in res.output
    res = CliRunner().invoke(build_cli(), ["ppo", "--help"])
    assert "--reward" in res.output and "ppo.kl_target" in res.output and "value.shared" in res.output


def test_bon_and_rejection_sampling_feed_sft_and_dpo(tmp_path, tiny_model, jsonl):
    data = jsonl("p.jsonl", prompt_rows(12))
    res = cli(["bon", "--model", tiny_model, "--data", data, "--output", tmp_path / "bon", "--reward", CHAR,
               "--n", 4, "generation.max_new_tokens=6", "samples_path=" + str(tmp_path / "all.jsonl")])
    assert "best-of-4" in res.output
    rows = [json.loads(l) for l in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and sum(r["chosen"] for r in rows) == 12
    s = json.loads((tmp_path / "bon" / "summary.json").read_text())
    # recompute every number of the summary by hand from the written samples
    by_prompt = {}
    for r in rows:
        visible = [c for c in r["completion"] if not c.isspace()]
        share = sum(c == "a" for c in visible) / len(visible) if visible else 0.0
        assert r["reward"] == pytest.approx(share)  # the reward is the toy gold reward of the text
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    assert len(by_prompt) == 12 and all(len(g) == 4 for g in by_prompt.values())
    for g in by_prompt.values():  # the chosen sample is the first best one
        best = max(range(4), key=lambda j: (g[j]["reward"], -j))
        assert [r["chosen"] for r in g] == [j == best for j in range(4)]
    rewards = [[r["reward"] for r in g] for g in by_prompt.values()]
    assert s["rewards/single_mean"] == pytest.approx(sum(map(sum, rewards)) / 48)
    assert s["rewards/best_of_n_mean"] == pytest.approx(sum(map(max, rewards)) / 12)
    assert s["rewards/worst_of_n_mean"] == pytest.approx(sum(map(min, rewards)) / 12)
    # E[max of 2 of the 4 samples]: the mean over the C(4, 2) = 6 subsets, averaged over prompts
    best_of_2 = sum(sum(max(a, b) for a, b in itertools.combinations(rw, 2)) / 6 for rw in rewards) / 12
    assert s["best_of_k"]["2"] == pytest.approx(best_of_2)
    assert s["best_of_k"]["1"] == pytest.approx(s["rewards/single_mean"])
    assert s["best_of_k"]["4"] == pytest.approx(s["rewards/best_of_n_mean"])
    assert any(len(set(rw)) > 1 for rw in rewards)  # the samples differ, so best-of-4 is a real gain:
    assert s["rewards/best_of_n_mean"] > s["best_of_k"]["2"] > s["rewards/single_mean"]
    # rejection sampling with a reward that ties often (0/1 regex): ties are dropped and counted
    out = tmp_path / "rs"
    res = cli(["rejection-sampling", "--model", tiny_model, "--data", data, "--output", out, "--reward", "regex:[a-m]",
               "--n", 3, "generation.max_new_tokens=4"])
    s = json.loads((out / "summary.json").read_text())
    assert s["sft_rows"] == 12 and s["pairs"] + s["ties_dropped"] == 12 and s["pairs"] > 0
    if s["ties_dropped"]:
        assert "whose best and worst samples tie" in res.output
    pairs = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    assert all(p["reward_chosen"] > p["reward_rejected"] for p in pairs)
    cli(["sft", "--model", tiny_model, "--data", out / "sft.jsonl", "--output", tmp_path / "sft", "--max-steps", 1,
         "log.progress=false", "log.samples=0"])
    cli(["dpo", "--model", tiny_model, "--data", out / "pairs.jsonl", "--output", tmp_path / "dpo", "--max-steps", 1,
         "log.progress=false", "log.samples=0"])


def test_ppo_resume_is_identical_to_a_straight_run(tmp_path, tiny_model, jsonl, monkeypatch):
    from tests.helpers import Crash, crash_after_save

    data = jsonl("p.jsonl", prompt_rows(24))
    base = ["ppo", "--model", tiny_model, "--data", data, "--max-steps", 4, "--reward", CHAR, "train.batch_size=4",
            "optim.lr=1e-2", "ppo.adaptive_kl=true", "ppo.kl_target=0.1", "ppo.kl_horizon=100",
            "ppo.normalize_reward=true", "ppo.epochs=2", "log.save_every=2", *QUIET]
    cli(base + ["--output", tmp_path / "straight"])
    undo = crash_after_save(monkeypatch, 2)
    with pytest.raises(Crash):
        cli(base + ["--output", tmp_path / "resumed"])
    undo()
    cli(base + ["--output", tmp_path / "resumed", "--resume"])
    for part in ("model/model.safetensors", "checkpoints/step-00000004/model.safetensors"):  # policy; policy+critic
        a, b = load_file(tmp_path / "straight" / part), load_file(tmp_path / "resumed" / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    sa = json.loads((tmp_path / "straight/checkpoints/step-00000004/trainer_state.json").read_text())
    sb = json.loads((tmp_path / "resumed/checkpoints/step-00000004/trainer_state.json").read_text())
    assert sa["task"] == sb["task"] and sa["task"]["kl_ctl"]["value"] != 0.05  # the adapted beta, restored
    ka = [r["kl/coef"] for r in metrics(tmp_path / "straight")]
    kb = [r["kl/coef"] for r in metrics(tmp_path / "resumed")]
    assert ka == kb and len(set(ka)) == 4


def test_ppo_on_two_processes(tmp_path, tiny_model, jsonl):
    """Policy + separate critic in one module under DDP (gloo, CPU), rewards normalized over both processes."""
    import os
    import subprocess
    import sys

    data = jsonl("p.jsonl", prompt_rows(16))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "ppo"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "alignkit.cli", "ppo", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
            "--max-steps", "2", "--reward", "regex:[a-m]", "train.batch_size=4", "ppo.num_minibatches=2",
            "ppo.num_generations=1", "optim.lr=1e-2", "ppo.normalize_reward=true", *QUIET]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # the start of the run says how many processes share the rollout (printed once, by rank 0)
    said = " ".join((res.stdout + res.stderr).split())
    assert said.count("rollout: 8 prompts x 1 generations = 8 completions per step on 2 processes") == 1, said[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["kl/ref"] > 0  # the policy moved
    a, start = load_file(out / "model" / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)
