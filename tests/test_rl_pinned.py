"""Today's ``alignkit ppo|grpo|rloo`` results, pinned before the online-RL stages refactor (issue 14).

The numbers below were produced by the trainers as they were before the refactor (commit 1aee7be,
each with its own hand-written ``plan()``), on the tiny random model, one thread, the settings
listed, sampling with ``generation.engine=hf`` (transformers generate, the only engine then; the fast
engine that became the default later samples other tokens from the same distribution). Each run is one
rollout step; we pin the logged first-step metrics and the size of the
first step's change to the weights. The refactored task (presets of one staged task) must give the
same numbers with the same settings. Where the defaults changed since (reward normalization,
issue 14 item 6) the old value is passed explicitly, so this is also the recipe for today's results.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)
from tests.helpers import write_jsonl
from tests.test_online_rl import prompt_rows

CHAR = "python:alignkit.rewards.toy:char_share"

# algorithm -> (trainer path, options giving the behaviour of the pre-refactor defaults)
# (one sample per PPO prompt, GAE lambda 0.95 and one update per GRPO/RLOO epoch were the defaults then)
SETTINGS = {
    "ppo": ("alignkit.train.ppo:train_ppo",
            {"ppo.epochs": 2, "ppo.num_minibatches": 2, "ppo.kl_coef": 0.05, "ppo.normalize_reward": False,
             "ppo.num_generations": 1, "ppo.lam": 0.95}),
    "ppo_critic": ("alignkit.train.ppo:train_ppo",
                   {"ppo.epochs": 1, "ppo.num_minibatches": 1, "value.shared": False, "ppo.kl_coef": 0.05,
                    "ppo.normalize_reward": False, "ppo.num_generations": 1, "ppo.lam": 0.95}),
    "grpo": ("alignkit.train.grpo:train_grpo", {"grpo.num_generations": 4, "grpo.num_minibatches": 1}),
    "grpo_multi": ("alignkit.train.grpo:train_grpo",
                   {"grpo.num_generations": 4, "grpo.epochs": 2, "grpo.num_minibatches": 1, "grpo.clip_eps_high": 0.28,
                    "grpo.aggregation": "token_mean"}),
    "rloo": ("alignkit.train.grpo:train_rloo",
             {"rloo.num_generations": 4, "rloo.num_minibatches": 1, "rloo.kl_coef": 0.05,
              "rloo.normalize_reward": False}),
}

# pinned on commit 1aee7be (before the refactor): step-1 metrics and ||w_1 - w_0||_2 over all weights
PINNED = {
    "grpo": {
        "train/loss": -1.1175870895385742e-08,
        "train/grad_norm": 1.2479093074798584,
        "rewards/mean": -0.06875000149011612,
        "policy/clip_frac": 0.0,
        "policy/approx_kl": 0.0,
        "weights/delta_norm": 1.584151235631972,
        "weights/delta_dot_w0": -0.08033559868670723,
    },
    "grpo_multi": {
        "train/loss": -0.2268461072167685,
        "train/grad_norm": 0.4344247132539749,
        "rewards/mean": -0.06875000149011612,
        "policy/clip_frac": 0.2616279074965521,
        "policy/approx_kl": 0.02071434911340475,
        "weights/delta_norm": 2.506170100936078,
        "weights/delta_dot_w0": 0.010377892010889254,
    },
    "ppo": {
        "train/loss": -0.02705836296081543,
        "train/grad_norm": 2.3235312700271606,
        "rewards/mean": -0.05833333730697632,
        "policy/clip_frac": 0.2499999925494194,
        "policy/approx_kl": 0.02278983942233026,
        "value/loss": 0.008688696980243549,
        "weights/delta_norm": 3.516459296817771,
        "weights/delta_dot_w0": -0.5556324854114848,
    },
    "ppo_critic": {
        "train/loss": 0.00014163569236795107,
        "train/grad_norm": 1.6566731929779053,
        "rewards/mean": -0.05833333730697632,
        "policy/clip_frac": 0.0,
        "policy/approx_kl": 0.0,
        "value/loss": 0.0014186417683959007,
        "weights/delta_norm": 1.5651369133882995,
        "weights/delta_dot_w0": -0.1723496961485075,
    },
    "rloo": {
        "train/loss": 0.09683279693126678,
        "train/grad_norm": 0.06617192178964615,
        "rewards/mean": -0.06875000149011612,
        "weights/delta_norm": 1.5798860814182563,
        "weights/delta_dot_w0": -0.017409453232989362,
    },
}
KEYS = ("train/loss", "train/grad_norm", "rewards/mean", "policy/clip_frac", "policy/approx_kl", "value/loss")


def _run(algo, tiny_model, prompts, out):
    import importlib

    path, opts = SETTINGS[algo]
    mod, fn = path.split(":")
    train = getattr(importlib.import_module(mod), fn)
    train(**{"model.name_or_path": str(tiny_model), "data.path": str(prompts), "rewards": [CHAR, "length:target=3@0.1"],
             # the pinned rollouts were sampled by transformers' generate (the fast engine draws other samples)
             "generation.engine": "hf", "train.precision": "fp32",  # pinned in fp32 (auto: bf16 where native)
             "generation.max_new_tokens": 6, "train.max_steps": 1, "train.batch_size": 4, "optim.lr": 1e-2,
             "log.progress": False, "log.samples": 0, **opts}, output=str(out))
    row = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l][0]
    w0 = load_file(str(tiny_model / "model.safetensors"))
    w1 = load_file(str(out / "model" / "model.safetensors"))
    delta = sum(float((w1[k].double() - w0[k].double()).square().sum()) for k in w0) ** 0.5
    got = {k: row[k] for k in KEYS if k in row}
    got["weights/delta_norm"] = delta
    # Adam's first step is nearly lr * sign(grad): the norm barely depends on the gradient, so also pin
    # the direction, as the dot product of the change with the starting weights
    got["weights/delta_dot_w0"] = sum(float(((w1[k].double() - w0[k].double()) * w0[k].double()).sum()) for k in w0)
    return got


@pytest.mark.parametrize("algo", sorted(SETTINGS))
def test_first_update_matches_the_pre_refactor_trainers(tmp_path, tiny_model, algo):
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(8, 0))
    got = _run(algo, tiny_model, prompts, tmp_path / algo)
    print(algo, json.dumps(got))
    want = PINNED[algo]
    assert set(want) <= set(got), (sorted(want), sorted(got))
    for k, v in want.items():
        tol = 1e-3 if k.startswith("weights/") else 1e-4
        assert got[k] == pytest.approx(v, rel=tol, abs=1e-7), (k, got[k], v)
    assert got["weights/delta_norm"] > 0
