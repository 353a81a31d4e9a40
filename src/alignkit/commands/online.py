"""Online-RL commands: ppo, grpo, rloo and rl (any preset); sampling commands: bon, rejection-sampling.

Every online-RL command is the same task with a different default preset; ``--preset NAME`` picks
another bundle of stages (a :data:`alignkit.train.rl_config.PRESETS` entry: the flag's choices are read
from that registry) and every option set on top overrides the preset's value (docs/online-rl.md)."""

from alignkit.cli import TRAIN_FLAGS, Command, register_command

_RL = "alignkit.train.rl_config"
_REWARD_FLAGS = {"reward": "rewards", "gold_reward": "gold_reward", "preset": "preset"}
_PRESET_CHOICES = {"preset": f"{_RL}:PRESETS"}  # --preset NAME: the registered presets
_KINDS = ("Reward shorthand --reward KIND:ARG[@WEIGHT] (repeatable): model:PATH, ensemble:P1,P2[;mean|min|"
          "mean_minus_std[=K]], match:FIELD, regex:PATTERN, length:target=N|max=N|min=N, python:MODULE:FN, "
          "trl:MODULE.FN (a TRL reward function; TRL's --reward_funcs a.f b.g works too).")

register_command(Command(
    "ppo", f"{_RL}:PPOConfig", "alignkit.train.ppo:train_ppo",
    "PPO with a value model, KL penalty to the reference and GAE (Ziegler et al. 2019; Ouyang et al. 2022). "
    + _KINDS, {**TRAIN_FLAGS, **_REWARD_FLAGS}, choices=_PRESET_CHOICES))
register_command(Command(
    "grpo", f"{_RL}:GRPOConfig", "alignkit.train.grpo:train_grpo",
    "GRPO: G samples per prompt, group-normalized advantages, k3 KL loss (Shao et al. 2024). " + _KINDS,
    {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "grpo.num_generations"}, choices=_PRESET_CHOICES))
register_command(Command(
    "rloo", f"{_RL}:RLOOConfig", "alignkit.train.grpo:train_rloo",
    "RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024). " + _KINDS,
    {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "rloo.num_generations"}, choices=_PRESET_CHOICES))
register_command(Command(
    "rl", f"{_RL}:RLConfig", "alignkit.train.online:train_rl",
    "Online RL from a preset of stages: --preset NAME (default grpo; the names are listed under --preset and "
    "preset below); rl.* options override the preset field by field. " + _KINDS,
    {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "rl.num_generations"}, choices=_PRESET_CHOICES))
for _name, _preset, _what in (
        ("dapo", "dapo", "DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, overlong shaping"),
        ("dr-grpo", "dr_grpo", "Dr. GRPO (Liu et al. 2025): no std scaling, per-response sum / max_new_tokens, no KL"),
        ("gspo", "gspo", "GSPO (Zheng et al. 2025): clipped length-normalized sequence ratio"),
        ("reinforce-pp", "reinforce_pp", "REINFORCE++ (Hu 2025): token KL reward, global batch baseline, no critic")):
    register_command(Command(
        _name, f"{_RL}:RLConfig", "alignkit.train.online:train_rl",
        f"{_what}; the same as `alignkit rl --preset {_preset}`. " + _KINDS,
        {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "rl.num_generations"}, defaults={"preset": _preset},
        choices=_PRESET_CHOICES))

_SAMPLE_FLAGS = {"model": "model.name_or_path", "data": "data.path", "output": "output", "reward": "rewards",
                 "n": "n"}
register_command(Command(
    "bon", f"{_RL}:BoNConfig", "alignkit.rollout.sampling:best_of_n",
    "Best-of-N: N samples per prompt, all written with their scores, the best one marked; prints best-of-N "
    "versus single-sample reward. " + _KINDS, _SAMPLE_FLAGS))
register_command(Command(
    "rejection-sampling", f"{_RL}:RejectionSamplingConfig", "alignkit.rollout.sampling:rejection_sampling",
    "Rejection sampling: best samples -> SFT JSONL, best vs worst -> preference JSONL (for sft / dpo). " + _KINDS,
    {**_SAMPLE_FLAGS, "sft_path": "sft_path", "pairs_path": "pairs_path"}))
