"""On a controlled task with a known gold reward (share of the character "a" in an 8-token completion),
PPO, GRPO and RLOO each raise the gold reward well above the starting policy, and best-of-N's reward
rises with N. The random tiny model starts near 1/96 (uniform over printable characters)."""

import json

import pytest

from alignkit.train.grpo import train_grpo, train_rloo
from alignkit.train.ppo import train_ppo
from tests.helpers import write_jsonl
from tests.test_online_rl import prompt_rows

CHAR = "python:alignkit.rewards.toy:char_share"


from tests.helpers import one_thread as _one_thread  # noqa: E402,F401  (autouse: one thread per module)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    for name, rows in (("train.jsonl", prompt_rows(64, 0)), ("eval.jsonl", prompt_rows(32, 1))):
        write_jsonl(d / name, rows)
    return d / "train.jsonl", d / "eval.jsonl"


# algorithm -> (trainer, options); each run is 14 rollout batches of 64 sequences
SETTINGS = {
    "ppo": (train_ppo, {"train.batch_size": 32, "train.grad_accum": 2, "ppo.kl_coef": 0.01, "ppo.vf_coef": 0.5}),
    "grpo": (train_grpo, {"train.batch_size": 8, "grpo.num_generations": 8}),
    "rloo": (train_rloo, {"train.batch_size": 8, "rloo.num_generations": 8, "rloo.kl_coef": 0.01}),
}


@pytest.mark.parametrize("algo", sorted(SETTINGS))
def test_online_rl_raises_the_gold_reward(tmp_path, tiny_model, prompt_files, algo):
    train, opts = SETTINGS[algo]
    s = train(**{"model.name_or_path": str(tiny_model), "data.path": str(prompt_files[0]),
                 "data.eval_path": str(prompt_files[1]), "rewards": [CHAR], "gold_reward": [CHAR],
                 "generation.max_new_tokens": 8, "train.max_steps": 14, "optim.lr": 1e-2,
                 "optim.scheduler": "constant", "eval_samples": 4, "log.progress": False, "log.samples": 0,
                 **opts}, output=str(tmp_path / algo))
    before, after = s["eval/rewards/gold_before"], s["eval/rewards/gold"]  # 32 prompts x 4 samples each
    print(f"{algo}: gold reward {before:.4f} -> {after:.4f}")
    assert before < 0.05
    assert after > before + 0.15 and after > 3 * before, (before, after)
    rows = [json.loads(l) for l in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "rewards/mean" in r]
    assert len(train_rows) == 14
    for key in ("rewards/mean", "rewards/std", "rewards/gold", "rollout/length_mean", "rollout/eos_rate",
                "diversity/distinct_2", "policy/entropy"):
        assert key in train_rows[-1], key
    assert train_rows[0]["kl/ref"] == 0.0 and train_rows[-1]["kl/ref"] > 0.1  # drifted from the reference
    if algo == "ppo":
        for key in ("kl/coef", "policy/clip_frac", "policy/approx_kl", "value/loss", "value/explained_variance"):
            assert key in train_rows[-1], key


def test_best_of_n_reward_rises_with_n(tmp_path, tiny_model, prompt_files):
    from alignkit.rollout.sampling import best_of_n

    means = {}
    for n in (1, 4, 16):  # independent samples for each N, same 64 prompts
        s = best_of_n(**{"model.name_or_path": str(tiny_model), "data.path": str(prompt_files[0]),
                         "rewards": [CHAR], "generation.max_new_tokens": 8, "n": n, "seed": n},
                      output=str(tmp_path / f"bon{n}"))
        means[n] = s["rewards/best_of_n_mean"]
        assert s["prompts"] == 64
    print("best-of-N gold reward:", means)
    assert means[4] > means[1] + 0.015 and means[16] > means[4] + 0.03, means
    rows = [json.loads(l) for l in (tmp_path / "bon16" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 64 * 16 and sum(r["chosen"] for r in rows) == 64
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    for group in by_prompt.values():  # the chosen sample is a best one
        best = max(r["reward"] for r in group)
        assert [r["reward"] for r in group if r["chosen"]] == [best]
