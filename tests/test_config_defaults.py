"""A command's own default for a sub-section survives a user's override of another key of it.

Before the fix, pydantic built a sub-section given as a mapping from its class's defaults, so
``generation.temperature=0.5`` on bon silently dropped its max_new_tokens of 128 to the class's 64,
and ``target_generation.max_new_tokens=64`` on redteam made the greedy target (temperature 0) sample at 1.0.
"""

import pytest

from alignkit.config import SFTConfig, load_config
from alignkit.redteam.attack import RedteamConfig
from alignkit.rollout.generate import GenerationConfig
from alignkit.train.rl_config import (PRESETS, GRPOConfig, PPOConfig, RLConfig, RLOOConfig, RLOptions,
                                      SamplingConfig)


def test_sampling_job_keeps_its_max_new_tokens_when_another_generation_key_is_set():
    assert GenerationConfig().max_new_tokens == 64  # the class's own default, which used to win
    cfg = load_config(SamplingConfig, overrides=["generation.temperature=0.5", "rewards=[length:chars]"])
    assert (cfg.generation.max_new_tokens, cfg.generation.temperature) == (128, 0.5)
    cfg = load_config(SamplingConfig, overrides=["generation.max_new_tokens=16", "rewards=[length:chars]"])
    assert cfg.generation.max_new_tokens == 16  # a key the user gives wins


def test_redteam_target_stays_greedy_when_its_length_is_set():
    cfg = RedteamConfig.model_validate({"judge": "regex:x", "goal": "g", "target_generation": {"max_new_tokens": 64},
                                        "attack_generation": {"temperature": 0.7}})
    assert (cfg.target_generation.max_new_tokens, cfg.target_generation.temperature) == (64, 0.0)
    assert (cfg.attack_generation.max_new_tokens, cfg.attack_generation.temperature) == (32, 0.7)
    # the RL attacker's LoRA is on by default; setting its rank keeps it on (it used to switch it off)
    cfg = RedteamConfig.model_validate({"judge": "regex:x", "goal": "g", "rl": {"lora": {"r": 8}}})
    assert (cfg.rl.lora.enabled, cfg.rl.lora.r) == (True, 8)


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig, RLOOConfig, RLConfig])
def test_online_rl_lr_schedule_is_constant_unless_set(cls):
    # issue 31, item 6: online RL keeps its peak rate (the rollouts are new every step); other commands decay
    cfg = load_config(cls, overrides=["optim.lr=1e-3", "rewards=[length:chars]"])
    assert (cfg.optim.lr, cfg.optim.scheduler) == (1e-3, "constant")
    cfg = load_config(cls, overrides=["optim.scheduler=cosine", "rewards=[length:chars]"])
    assert cfg.optim.scheduler == "cosine"
    assert load_config(SFTConfig, overrides=["optim.lr=1e-3"]).optim.scheduler == "cosine"


def test_a_preset_on_another_command_gets_the_presets_options_not_the_commands():
    # online RL's stage options come from the preset alone: rloo --preset dapo keeps none of RLOO's values
    cfg = load_config(RLOOConfig, overrides=["preset=dapo", "rloo.kl_coef=0.1", "rewards=[length:chars]"])
    assert cfg.rloo == RLOptions(**{**PRESETS.get("dapo").settings, "kl_coef": 0.1})
    assert (cfg.rloo.normalize_reward, cfg.rloo.kl_estimator) == (False, "k3")  # RLOO's own: True, k1


def test_a_rollout_smaller_than_num_minibatches_makes_one_update_per_completion_and_says_so():
    cfg = load_config(GRPOConfig, overrides=["train.batch_size=1", "grpo.num_generations=2", "rewards=[length:chars]"])
    plan = cfg.rollout_plan(1)
    assert (plan.completions, plan.updates) == (2, 2)  # 8 minibatches asked (the default), 2 completions
    assert "2 optimizer updates per epoch of the rollout (num_minibatches=8: at most one per completion" \
        in plan.describe()
    full = load_config(GRPOConfig, overrides=["rewards=[length:chars]"]).rollout_plan(1)
    assert (full.completions, full.updates) == (64, 8) and "(num_minibatches" not in full.describe()
