"""Online-RL commands: ppo, grpo, rloo; sampling commands: bon, rejection-sampling."""

from alignkit.cli import TRAIN_FLAGS, Command, register_command

_RL = "alignkit.train.rl_config"
_REWARD_FLAGS = {"reward": "rewards", "gold_reward": "gold_reward"}
_KINDS = ("Reward shorthand --reward KIND:ARG[@WEIGHT] (repeatable): model:PATH, ensemble:P1,P2[;mean|min|"
          "mean_minus_std[=K]], match:FIELD, regex:PATTERN, length:target=N|max=N|min=N, python:MODULE:FN.")

register_command(Command(
    "ppo", f"{_RL}:PPOConfig", "alignkit.train.ppo:train_ppo",
    "PPO with a value model, KL penalty to the reference and GAE (Ziegler et al. 2019; Ouyang et al. 2022). "
    + _KINDS, {**TRAIN_FLAGS, **_REWARD_FLAGS}))
register_command(Command(
    "grpo", f"{_RL}:GRPOConfig", "alignkit.train.grpo:train_grpo",
    "GRPO: G samples per prompt, group-normalized advantages, k3 KL loss (Shao et al. 2024). " + _KINDS,
    {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "grpo.num_generations"}))
register_command(Command(
    "rloo", f"{_RL}:RLOOConfig", "alignkit.train.grpo:train_rloo",
    "RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024). " + _KINDS,
    {**TRAIN_FLAGS, **_REWARD_FLAGS, "num_generations": "rloo.num_generations"}))

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
