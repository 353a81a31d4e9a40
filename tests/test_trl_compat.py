"""A TRL user's GRPO setup runs unchanged: TRL-style reward functions (by import path in YAML and on the
command line, as callables in the Python API) with TRL's keyword contract, TRL's GRPOConfig keys with
TRL's meaning (batch sizes in completions), completions tables, and rewards with a deadline (one Error
line for a hang or an exception, the run's lock released)."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from alignkit.cli import build_cli
from alignkit.config import ConfigError, load_config
from alignkit.train.rl_config import GRPOConfig, RLConfig
from tests import trl_style_rewards as R
from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)

ROOT = Path(__file__).resolve().parents[1]
MOD = "tests.trl_style_rewards"
QUIET = {"log.progress": False, "log.samples": 0}


def math_rows(n=16):
    rows = []
    for k in range(n):
        a, b = k % 5, (k * 3) % 4
        row = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        if k % 4 == 3:
            del row["answer"]  # the accuracy function does not apply to these rows (None)
        rows.append(row)
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trl_yaml(tmp_path, tiny_model, data, out, **extra):
    """A GRPO config written with TRL's names only."""
    cfg = {"model_name_or_path": str(tiny_model), "dataset_name": str(data), "output_dir": str(out),
           "reward_funcs": [f"{MOD}.reward_len", f"{ROOT}/tests/trl_style_rewards.py:format_reward",
                            f"{MOD}.accuracy_reward", f"{MOD}:ids_length"],
           "reward_weights": [0.5, 1.0, 2.0, 0.0],
           "num_generations": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
           "max_steps": 2, "max_completion_length": 6, "temperature": 0.9, "top_p": 0.95, "top_k": 50,
           "learning_rate": 1e-3, "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "dapo",
           "scale_rewards": "group", "mask_truncated_completions": False, "importance_sampling_level": "token",
           "num_iterations": 1, "log_completions": True, "logging_steps": 1, "use_vllm": False,
           "report_to": "none", "seed": 3, **extra}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def by_step(rows):
    out = {}
    for r in rows:
        out.setdefault(r["step"], []).append(r)
    return out


# ------------------------------------------------------------------------- TRL reward functions, CLI + YAML

def test_trl_grpo_yaml_and_trl_reward_functions_run_unchanged(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    R.SEEN["steps"].clear()
    R.SEEN["ids"].clear()
    data = write(tmp_path / "math.jsonl", math_rows())
    out = tmp_path / "run"
    res = invoke(["grpo", "--config", trl_yaml(tmp_path, tiny_model, data, out), *[f"{k}={v}" for k, v in QUIET.items()]])
    assert res.exit_code == 0, res.output
    # TRL's batch: 4 completions per device x 2 accumulation steps = 8 completions per optimizer step
    assert "rollout: 2 prompts x 4 generations = 8 completions per step on 1 process" in " ".join(res.output.split())
    table = by_step(records(out / "completions.jsonl"))
    assert sorted(table) == [1, 2]
    metrics = [r for r in records(out / "metrics.jsonl") if "rewards/mean" in r]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for step, rows in table.items():
        assert len(rows) == 8 and len({r["prompt"] for r in rows}) == 2  # completions (not prompts) per step
        for r in rows:  # each function saw the completion we logged, as a string (standard format)
            c = r["completion"]
            assert r["reward_len"] == -abs(4 - len(c))
            assert r["format_reward"] == float(bool(re.match(r"^[0-9]+$", c)))
            weighted = [w * r[k] for k, w in (("reward_len", 0.5), ("format_reward", 1.0),
                                              ("accuracy_reward", 2.0)) if r[k] is not None]
            assert r["reward"] == pytest.approx(sum(weighted))  # reward_weights; None left out of the sum
        m = metrics[step - 1]
        for name in ("reward_len", "format_reward", "ids_length"):  # TRL's keys, by function name
            vals = [r[name] for r in rows]
            assert m[f"rewards/{name}/mean"] == pytest.approx(sum(vals) / len(vals))
            sd = math.sqrt(sum((v - sum(vals) / 8) ** 2 for v in vals) / 7)
            assert m[f"rewards/{name}/std"] == pytest.approx(sd, abs=1e-6)
        for r in rows:  # rows without an answer (exactly the prompts "a+1=") gave None
            assert (r["accuracy_reward"] is None) == ("+1=" in r["prompt"])
        acc = [r["accuracy_reward"] for r in rows if r["accuracy_reward"] is not None]
        if acc:
            assert m["rewards/accuracy_reward/mean"] == pytest.approx(sum(acc) / len(acc))
    # completion_ids are the sampled tokens of each completion; trainer_state counts the steps done
    assert R.SEEN["ids"] and all(tok.decode(ids, skip_special_tokens=True) == c for ids, c in R.SEEN["ids"])
    assert R.SEEN["steps"] == [0, 1]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["grpo"]["aggregation"] == "token_mean" and cfg["grpo"]["clip_eps_high"] == 0.28
    assert cfg["generation"] == {**cfg["generation"], "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95,
                                 "top_k": 50, "engine": "fast"}
    assert [s["weight"] for s in cfg["rewards"]] == [0.5, 1.0, 2.0, 0.0]
    html = (out / "report.html").read_text()
    assert "Rollout samples by step" in html and 'data-step="2"' in html and "reward_len" in html


def test_trl_batch_semantics_with_steps_per_generation_and_its_errors(tmp_path, tiny_model):
    # TRL: generation batch = per_device_train_batch_size x steps_per_generation completions per device,
    # trained in steps_per_generation / gradient_accumulation_steps optimizer steps
    cfg = load_config(GRPOConfig, None, ["per_device_train_batch_size=4", "steps_per_generation=4",
                                         "gradient_accumulation_steps=2", "num_generations=4", "reward_funcs=a.b"])
    plan = cfg.rollout_plan(2)
    assert (plan.prompts, plan.generations, plan.micro_rows, plan.updates, plan.completions) == (4, 4, 4, 2, 32)
    assert "8 prompts x 4 generations = 32 completions per step on 2 processes" in plan.describe()
    # alignkit's own names keep alignkit's meaning: train.batch_size counts prompts
    mine = load_config(GRPOConfig, None, ["train.batch_size=4", "grpo.num_generations=4", "reward_funcs=a.b"])
    assert mine.rollout_plan(1).completions == 16 and not mine.rollout_plan(1).trl
    with pytest.raises(ConfigError, match=r"3 x 1 = 3 completions per process is not a multiple of num_generations"):
        load_config(GRPOConfig, None, ["per_device_train_batch_size=3", "num_generations=4", "reward_funcs=a.b"])
    with pytest.raises(ConfigError, match="steps_per_generation counts micro-batches"):
        load_config(GRPOConfig, None, ["steps_per_generation=2", "reward_funcs=a.b"])
    data = write(tmp_path / "math.jsonl", math_rows())
    out = tmp_path / "spg"
    res = invoke(["grpo", "--config", trl_yaml(tmp_path, tiny_model, data, out, steps_per_generation=4, max_steps=1),
                  "log.progress=false", "log.samples=0"])
    assert res.exit_code == 0, res.output
    assert "4 prompts x 4 generations = 16 completions per step on 1 process; micro-batches of 4 completions, " \
           "2 optimizer updates" in " ".join(res.output.split())
    assert len(by_step(records(out / "completions.jsonl"))[1]) == 16
    # the same TRL YAML through the Python API: the same batch
    from alignkit.train.grpo import train_grpo

    cfg = yaml.safe_load(trl_yaml(tmp_path, tiny_model, data, tmp_path / "api", max_steps=1).read_text())
    train_grpo(cfg, **QUIET)
    rows = records(tmp_path / "api" / "completions.jsonl")
    assert len(rows) == 8 and len({r["prompt"] for r in rows}) == 2


# ------------------------------------------------------------------------- Python API, conversational prompts

def test_python_api_callables_and_conversational_completions(tmp_path, tiny_model):
    from alignkit.train.grpo import train_grpo

    rows = [{"prompt": [{"role": "user", "content": f"{k}+1="}], "answer": str(k + 1)} for k in range(8)]
    data = write(tmp_path / "chat.jsonl", rows)
    seen = []

    def digits_and_messages(prompts, completions, **kwargs):
        seen.append((prompts[0], completions[0]))
        return R.conversational_digits(completions)

    summary = train_grpo(**{"model_name_or_path": str(tiny_model), "dataset_name": str(data),
                            "output_dir": str(tmp_path / "api"), "reward_funcs": [digits_and_messages, R.reward_len],
                            "num_generations": 2, "per_device_train_batch_size": 4, "max_steps": 1,
                            "max_completion_length": 5, "log_completions": True, **QUIET})
    prompt, completion = seen[0]
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"  # TRL's conversational shape
    table = records(tmp_path / "api" / "completions.jsonl")
    assert len(table) == 4  # 4 completions per device: 2 prompts x 2 generations
    for r in table:
        c = r["completion"]
        assert r["digits_and_messages"] == pytest.approx(sum(ch.isdigit() for ch in c) / max(len(c), 1))
        assert r["reward_len"] == -3  # as in TRL, every function sees the message list (len 1) here
    assert summary["rewards/digits_and_messages/mean"] == pytest.approx(
        sum(r["digits_and_messages"] for r in table) / 4)
    cfg = yaml.safe_load((tmp_path / "api" / "config.yaml").read_text())
    assert [s["name"] for s in cfg["rewards"]] == ["digits_and_messages", "reward_len"]


# ------------------------------------------------------------------------- config keys, unit level

def test_trl_signatures_work_under_python_and_alignkit_signatures_under_trl():
    from alignkit.rewards import build_reward

    # TRL's reward_len under alignkit's python: kind (completions stay strings) and alignkit's older
    # positional fn(p, c, **kw) under trl:; options and row fields reach both
    reward = build_reward([f"python:{MOD}:reward_len", "python:alignkit.rewards.toy:char_share@0.5",
                           f"trl:{MOD}.accuracy_reward"])
    total = reward(["1+1=", "2+2="], ["2", "xx4x"], [{"answer": "2"}, {}], completion_ids=[[5], [6, 6, 7, 6]])
    assert reward.last_components == {"reward_len": [-3.0, 0.0], "char_share": [0.0, 0.0],
                                      "accuracy_reward": [1.0, reward.last_components["accuracy_reward"][1]]}
    assert math.isnan(reward.last_components["accuracy_reward"][1])  # None: does not apply
    assert total == [-3.0 + 1.0, 0.0]  # the None entry is left out of the weighted total
    legacy = build_reward([f"trl:{MOD}.positional_pair"])  # fn(p, c, **fields): prompts, completions by position
    assert legacy(["p", "q"], ["abc", "d"], [{"k": 2}, {"k": 3}]) == [6.0, 3.0]


@pytest.mark.parametrize("loss_type,field,value", [
    ("grpo", "aggregation", "sequence_mean"), ("dapo", "aggregation", "token_mean"),
    ("bnpo", "aggregation", "token_mean"), ("dr_grpo", "aggregation", "sum_norm")])
def test_trl_loss_types_are_aggregations(loss_type, field, value):
    cfg = load_config(GRPOConfig, None, [f"loss_type={loss_type}", "reward_funcs=a.b"])
    assert getattr(cfg.grpo, field) == value and cfg.preset is None


def test_trl_grpo_keys_map_to_their_fields(caplog):
    cfg = load_config(RLConfig, None, ["loss_type=gspo", "reward_funcs=a.b", "epsilon=0.1", "epsilon_high=0.3",
                                       "scale_rewards=none", "importance_sampling_level=sequence", "num_iterations=2",
                                       "mask_truncated_completions=true", "rewards.timeout_s=7", "top_k=null",
                                       "use_vllm=true", "vllm_mode=server", "max_prompt_length=64"])
    assert cfg.preset == "gspo" and cfg.rl.clip_eps == 0.1 and cfg.rl.clip_eps_high == 0.3
    assert cfg.rl.scale_by_std is False and cfg.rl.policy_loss == "clipped_sequence" and cfg.rl.epochs == 2
    assert cfg.rl.mask_truncated_completions and cfg.reward_timeout_s == 7 and cfg.generation.top_k == 0
    assert cfg.rewards[0].kind == "trl" and cfg.rewards[0].arg == "a.b" and cfg.data.max_prompt_length == 64
    assert cfg.generation.engine == "fast"  # no vLLM / GPU here: warned with the reason, not silently kept
    text = caplog.text
    assert "use_vllm=true ignored" in text and ("not installed" in text or "CUDA" in text)
    assert "vllm_mode=server ignored" in text
    batch = load_config(GRPOConfig, None, ["scale_rewards=batch", "reward_funcs=a.b"])
    assert batch.grpo.scale_by_std and batch.grpo.std_scope == "batch"
    with pytest.raises(ConfigError, match="unknown loss type 'cispo'"):
        load_config(GRPOConfig, None, ["loss_type=cispo", "reward_funcs=a.b"])
    with pytest.raises(ConfigError, match="reward_weights has 1 weights for 2 rewards"):
        load_config(GRPOConfig, None, ["reward_funcs=[a.b, c.d]", "reward_weights=[1.0]"])


def test_scale_rewards_batch_is_group_mean_over_batch_std():
    import torch

    from alignkit.advantages import ADVANTAGES, AdvantageInputs, batch_std
    from alignkit.train.rl_config import RLOptions

    scores = torch.tensor([1.0, 2.0, 3.0, 5.0])  # two groups of two
    opts = RLOptions(std_scope="batch")
    adv = ADVANTAGES.get("group")(AdvantageInputs(scores, torch.zeros(4, 1), torch.ones(4, 1), 2), opts)["advantages"]
    sd = math.sqrt(sum((x - 11 / 4) ** 2 for x in (1, 2, 3, 5)) / 3)  # by hand: sample std 1.708
    assert adv.tolist() == pytest.approx([-0.5 / sd, 0.5 / sd, -1 / sd, 1 / sd], rel=1e-5)
    # two processes: the std of all four scores, from one reduction of (n, sum, sum of squares)
    halves = [scores[:2], scores[2:]]
    summed = lambda t: sum(torch.stack([torch.tensor([2.0, float(h.sum()), float((h * h).sum())], dtype=t.dtype)  # noqa: E731
                                        for h in halves]))
    assert float(batch_std(halves[0], summed)) == pytest.approx(sd, rel=1e-6)
    group = ADVANTAGES.get("group")(AdvantageInputs(scores, torch.zeros(4, 1), torch.ones(4, 1), 2),
                                    RLOptions())["advantages"]
    assert group.tolist() == pytest.approx([-0.7071, 0.7071, -0.7071, 0.7071], abs=1e-3)  # GRPO's group std


def test_trl_list_flags_take_several_values():
    from alignkit.aliases import cli_tokens_to_overrides

    assert cli_tokens_to_overrides(["--reward_funcs", "m.f", "m.g", "--learning_rate", "1e-5"]) == \
        ['reward_funcs=["m.f", "m.g"]', "learning_rate=1e-5"]
    cfg = load_config(GRPOConfig, None, cli_tokens_to_overrides(["--reward_funcs", "m.f", "m:g", "--reward_weights",
                                                                 "1", "0.5"]))
    assert [(s.kind, s.arg, s.weight) for s in cfg.rewards] == [("trl", "m.f", 1.0), ("trl", "m:g", 0.5)]


def test_mask_truncated_completions_leaves_cut_responses_out_of_the_loss(tmp_path, tiny_model):
    from alignkit.train.grpo import train_grpo

    data = write(tmp_path / "m.jsonl", math_rows(8))
    units = {}
    for masked in (False, True):  # 2 new tokens: the random tiny model never ends that early
        out = tmp_path / f"m{masked}"
        train_grpo(**{"model_name_or_path": str(tiny_model), "dataset_name": str(data), "output_dir": str(out),
                      "reward_funcs": [R.reward_len], "num_generations": 2, "per_device_train_batch_size": 4,
                      "max_steps": 1, "max_completion_length": 2, "loss_type": "dapo",
                      "mask_truncated_completions": masked, **QUIET})
        row = records(out / "metrics.jsonl")[-1]
        ended = sum(r["ended"] for r in records(out / "completions.jsonl"))
        units[masked] = (row["train/units"], ended)
    assert units[False][0] == 4 * 2  # token_mean: 4 completions x 2 tokens
    assert units[True][0] <= 2 * units[True][1] and units[True][0] < units[False][0]  # only the ended ones count


# ------------------------------------------------------------------------- completions to the trackers

def test_completions_table_reaches_wandb_and_tensorboard_before_the_run_closes(tmp_path, tiny_model, monkeypatch):
    import types

    pytest.importorskip("tensorboard")  # a test extra; CI installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Run:
        def log(self, m, step=None):
            events.append(("log", step, m))

        def finish(self):
            events.append(("finish", None, {}))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: Run()
    fake.Table = Table
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from alignkit.train.grpo import train_grpo

    out = tmp_path / "tr"
    train_grpo(**{"model_name_or_path": str(tiny_model), "dataset_name": str(write(tmp_path / "m.jsonl", math_rows(8))),
                  "output_dir": str(out), "reward_funcs": [R.reward_len, R.format_reward], "num_generations": 2,
                  "per_device_train_batch_size": 4, "max_steps": 2, "max_completion_length": 4,
                  "log_completions": True, "report_to": ["wandb", "tensorboard"], **QUIET})
    tables = [(step, m["completions"]) for kind, step, m in events if kind == "log" and "completions" in m]
    assert [s for s, _ in tables] == [1, 2]
    t = tables[0][1]
    assert t.columns == ["step", "prompt", "completion", "reward_len", "format_reward", "reward", "advantage", "ended"]
    assert len(t.data) == 4 and all(row[0] == 1 for row in t.data)
    finish = [i for i, e in enumerate(events) if e[0] == "finish"]
    assert finish and max(i for i, e in enumerate(events) if e[0] == "log" and "completions" in e[2]) < finish[0]
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    ea.Reload()
    tag = next(t for t in ea.Tags()["tensors"] if t.startswith("completions"))
    texts = [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(tag)]
    assert len(texts) == 2 and "| prompt | completion | reward_len |" in texts[0]


# ------------------------------------------------------------------------- deadlines and one-line errors

def _grpo_args(tmp_path, tiny_model, reward, *extra):
    data = write(tmp_path / "m.jsonl", math_rows(8))
    reward = ["--reward", reward] if ":" in reward.split(".")[0] else ["--reward_funcs", reward]  # TRL's flag
    return ["grpo", "--model", tiny_model, "--data", data, "--output", tmp_path / "run", *reward,
            "--num-generations", 2, "--max-steps", 1, "train.batch_size=2", "generation.max_new_tokens=3",
            "log.progress=false", "log.samples=0", *extra]


def _one_error_line(res):
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return " ".join(res.output[res.output.index("Error:"):].split())


@pytest.mark.parametrize("fn,kind", [("hangs", "trl"), ("spins", "python")])
def test_a_hanging_reward_times_out_with_one_error_line_and_no_lock(tmp_path, tiny_model, fn, kind):
    t0 = time.perf_counter()
    res = invoke(_grpo_args(tmp_path, tiny_model, f"{kind}:{MOD}:{fn}", "rewards.timeout_s=1"))
    text = _one_error_line(res)
    assert f"reward function '{MOD}:{fn}' (rewards/{fn}) did not return within 1 s at step 1 " \
           "(rollout of 2 prompts x 2 = 4 completions)" in text and "rewards.timeout_s" in text
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "run" / ".alignkit.lock").exists()


def test_a_reward_that_raises_is_one_error_line_naming_function_line_and_batch(tmp_path, tiny_model):
    res = invoke(_grpo_args(tmp_path, tiny_model, f"{MOD}.raises"))  # --reward_funcs tests.trl_style_rewards.raises
    text = _one_error_line(res)
    assert re.search(rf"reward function '{MOD}.raises' \(rewards/raises\) raised ZeroDivisionError: division by zero "
                     r"at trl_style_rewards\.py:\d+ at step 1 \(rollout of 2 prompts x 2 = 4 completions\)", text), text
    assert not (tmp_path / "run" / ".alignkit.lock").exists()


@pytest.mark.parametrize("fn,message", [
    ("needs_a_column", "needs argument(s) ['solution'], which are neither reward arguments (prompts, completions, "
                       "completion_ids, trainer_state), options nor columns of the data (columns: answer)"),
    ("fits_neither", "fits neither TRL's reward signature")])
def test_a_signature_that_fits_neither_is_one_line_before_the_model_loads(tmp_path, tiny_model, monkeypatch, fn,
                                                                           message):
    import alignkit.models.loading as loading

    def no_model(*a, **k):
        raise AssertionError("the policy must not load")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    res = invoke(_grpo_args(tmp_path, tiny_model, f"trl:{MOD}.{fn}"))
    assert message in _one_error_line(res)
    assert not (tmp_path / "run" / ".alignkit.lock").exists()


def test_a_reward_that_cannot_be_interrupted_ends_the_process_with_one_line(tmp_path, tiny_model):
    args = [str(a) for a in _grpo_args(tmp_path, tiny_model, f"trl:{MOD}:ignores_signals", "rewards.timeout_s=1")]
    code = ("import alignkit.rewards.deadline as d; d.GRACE_S = 1.0\n"
            "from alignkit.cli import main\n"
            f"main({args!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "ignores_signals" in errors[0] and "stuck outside Python" in errors[0] and "Traceback" not in proc.stderr
    assert time.perf_counter() - t0 < 200
    assert not (tmp_path / "run" / ".alignkit.lock").exists()


def test_python_api_reward_error_frees_the_run_directory(tmp_path, tiny_model):
    from alignkit.rewards.base import RewardError
    from alignkit.train.grpo import train_grpo

    out = tmp_path / "api"
    with pytest.raises(RewardError, match=r"raises.*ZeroDivisionError.*at step 1"):
        train_grpo(**{"model_name_or_path": str(tiny_model), "dataset_name": str(write(tmp_path / "m.jsonl", math_rows(8))),
                      "output_dir": str(out), "reward_funcs": [R.raises], "num_generations": 2,
                      "per_device_train_batch_size": 4, "max_steps": 1, "max_completion_length": 3, **QUIET})
    assert not (out / ".alignkit.lock").exists()


def test_completions_in_the_report_are_text_and_resume_drops_later_steps(tmp_path):
    from alignkit.eval.report import write_report
    from alignkit.train.logging import MetricLogger

    run = tmp_path / "run"
    run.mkdir()
    write(run / "metrics.jsonl", [{"step": s, "rewards/mean": 0.1 * s} for s in (1, 2, 3)])
    rows = [{"step": s, "prompt": "p<b>", "completion": f"<script>alert({s})</script>", "len": None if s == 2 else -1.0,
             "reward": 0.5, "advantage": 0.25, "ended": True} for s in (1, 2, 3)]
    write(run / "completions.jsonl", rows)
    html = write_report(run).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # model text stays text
    assert [int(x) for x in re.findall(r'data-step="(\d+)"', html)] == [1, 2, 3]
    assert re.search(r'data-step="3" open>', html) and "mean reward 0.5" in html
    cfg = load_config(GRPOConfig, None, ["reward_funcs=a.b", f"output={run}"])
    MetricLogger(run, cfg, is_main=True).resumed(2)  # a resume from step 2 drops the rows of step 3
    assert [r["step"] for r in records(run / "completions.jsonl")] == [1, 2]
