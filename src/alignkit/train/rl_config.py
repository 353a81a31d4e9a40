"""Configs of the online-RL commands (ppo, grpo, rloo) and of sampling (bon, rejection-sampling).

Every field has a docstring: it becomes ``alignkit CMD --help``, the YAML docs and the validation
errors, as for the other commands. Reward lists accept the CLI shorthand ``KIND:ARG[@WEIGHT]`` or
the YAML mapping form of :class:`alignkit.rewards.RewardSpec`.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from alignkit.config import DataConfig, ModelConfig, RunConfig, Section
from alignkit.ops.kl import KLKind
from alignkit.rewards import REWARD_KINDS, RewardSpec
from alignkit.rollout.generate import GenerationConfig

RL_AGGREGATIONS = ("token_mean", "sequence_mean", "sum_norm", "sum")


class RewardsMixin(Section):
    rewards: List[RewardSpec] = []
    """Reward components to optimize, summed with their weights: KIND:ARG[@WEIGHT] strings (CLI: --reward,
    repeatable) or mappings {kind, arg, weight, options, name}. Kinds: model:PATH, ensemble:P1,P2[;mode],
    match:FIELD, regex:PATTERN, length:..., python:MODULE:FN (see docs/online-rl.md)."""
    gold_reward: List[RewardSpec] = []
    """Reward scored on every rollout and logged as rewards/gold but never optimized (e.g. a held-out
    judge or the true task reward), to catch over-optimization of the proxy reward."""

    @field_validator("rewards", "gold_reward", mode="before")
    @classmethod
    def _coerce_specs(cls, v: Any) -> List[RewardSpec]:
        return RewardSpec.coerce_list(v)

    @model_validator(mode="after")
    def _need_reward(self):
        if not self.rewards:
            raise ValueError("no reward: pass --reward KIND:ARG[@WEIGHT] (repeatable) or a `rewards:` list; "
                             "kinds: " + ", ".join(REWARD_KINDS.names()))
        return self


class OnlineRLConfig(RunConfig, RewardsMixin):
    """Sections shared by ppo, grpo and rloo. One step = one rollout batch of
    train.batch_size x train.grad_accum x processes prompts; train.batch_size is also the number of
    sequences per forward micro-batch."""

    generation: GenerationConfig = GenerationConfig(max_new_tokens=64)
    """Sampling of the rollouts (temperature, top_p, top_k, max_new_tokens, engine hf|vllm)."""
    ref_model: Optional[str] = None
    """Reference model for the KL term (default: the starting policy; with LoRA the adapter is switched
    off instead of loading a second copy)."""
    missing_eos_penalty: Optional[float] = Field(None, ge=0)
    """Subtracted from the reward of responses that hit generation.max_new_tokens without EOS."""
    eval_samples: int = Field(1, gt=0)
    """Samples per held-out prompt when evaluating (eval/rewards/*), drawn with a fixed seed."""


class PPOOptions(Section):
    epochs: int = Field(4, gt=0)
    """PPO epochs over each rollout batch."""
    num_minibatches: int = Field(1, gt=0)
    """Optimizer updates per epoch: each epoch splits the shuffled rollout into this many minibatches."""
    clip_eps: float = Field(0.2, gt=0)
    """Clip range of the probability ratio (Schulman et al. 2017, eq. 7)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    vf_clip: Optional[float] = Field(0.2, gt=0)
    """Clip range of the value around its rollout-time estimate (empty: unclipped value loss)."""
    ent_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout's response tokens (zero mean, unit variance)."""
    kl_coef: float = Field(0.05, ge=0)
    """KL-penalty coefficient beta (initial value when adaptive): per-token reward -beta * KL."""
    kl_estimator: KLKind = "k1"
    """Per-token KL estimate in the reward: k1 (log-ratio, Ziegler et al. 2019), k2 or k3."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target (Ziegler et al. 2019, eq. 2); the coefficient is saved in checkpoints."""
    kl_target: float = Field(6.0, gt=0)
    """Target KL to the reference, nats per sequence (adaptive_kl)."""
    kl_horizon: float = Field(10000.0, gt=0)
    """Horizon of the adaptive controller, in samples: larger adapts more slowly."""
    normalize_reward: bool = False
    """Normalize sequence rewards with running mean/std over all rollouts so far (saved in checkpoints)."""
    reward_clip: Optional[float] = Field(None, gt=0)
    """Clip (normalized) sequence rewards to [-reward_clip, reward_clip]."""


class ValueOptions(Section):
    shared: bool = False
    """Value head on the policy's backbone (one forward pass, less memory) instead of a separate critic."""
    init: str = "policy"
    """Separate critic's starting weights: policy (the policy's backbone, a zero head), reward (the first
    model: reward, head included; InstructGPT) or a model path. It must share the policy's tokenizer."""


class PPOConfig(OnlineRLConfig):
    """PPO with a value model (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022)."""

    command: Literal["ppo"] = "ppo"
    ppo: PPOOptions = PPOOptions()
    """PPO options."""
    value: ValueOptions = ValueOptions()
    """Value model (critic) options."""


class GroupOptions(Section):
    """Options shared by the critic-free group methods."""

    num_generations: int = Field(8, ge=2)
    """Samples per prompt (G); advantages compare the samples of one prompt."""
    epochs: int = Field(1, gt=0)
    """Passes over each rollout batch (more than one update per rollout uses the clipped ratio)."""
    num_minibatches: int = Field(1, gt=0)
    """Optimizer updates per epoch over each rollout batch."""
    clip_eps: float = Field(0.2, gt=0)
    """Lower clip range of the ratio when there are several updates per rollout."""
    clip_eps_high: Optional[float] = Field(None, gt=0)
    """Upper clip range (DAPO clip-higher; empty: clip_eps)."""


class GRPOOptions(GroupOptions):
    beta: float = Field(0.04, ge=0)
    """Weight of the k3 KL to the reference in the loss (Shao et al. 2024, eq. 3-4); 0 loads no reference."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group std (false: Dr. GRPO, Liu et al. 2025)."""
    aggregation: Literal["token_mean", "sequence_mean", "sum_norm"] = "sequence_mean"
    """Token reduction: sequence_mean (GRPO paper), token_mean (DAPO: every token of the step weighs the same),
    sum_norm (Dr. GRPO: per-sequence sum / generation.max_new_tokens)."""


class RLOOOptions(GroupOptions):
    num_generations: int = Field(4, ge=2)
    """Samples per prompt (k); each sample's baseline is the mean reward of the other k-1."""
    kl_coef: float = Field(0.05, ge=0)
    """KL penalty folded into the sequence reward: r - kl_coef * sum_t KL_t (0 loads no reference)."""
    kl_estimator: KLKind = "k1"
    """Per-token KL estimate summed into the penalty: k1, k2 or k3."""
    aggregation: Literal["token_mean", "sequence_mean", "sum_norm", "sum"] = "sum"
    """Token reduction: sum (the whole completion is one action, Ahmadian et al. 2024), sequence_mean,
    token_mean or sum_norm."""


class GRPOConfig(OnlineRLConfig):
    """Group relative policy optimization (Shao et al. 2024)."""

    command: Literal["grpo"] = "grpo"
    grpo: GRPOOptions = GRPOOptions()
    """GRPO options."""


class RLOOConfig(OnlineRLConfig):
    """REINFORCE leave-one-out (Ahmadian et al. 2024)."""

    command: Literal["rloo"] = "rloo"
    rloo: RLOOOptions = RLOOOptions()
    """RLOO options."""


class SamplingConfig(RewardsMixin):
    """Sections shared by bon and rejection-sampling (no training)."""

    command: str = "sample"
    """The command this config is for (set automatically)."""
    model: ModelConfig = ModelConfig()
    """The policy to sample from."""
    data: DataConfig = DataConfig()
    """Prompt rows ({prompt, ...} or {messages}); extra fields reach the reward functions."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=128)
    """Sampling settings."""
    n: int = Field(4, gt=0)
    """Samples per prompt (N)."""
    output: str = "runs/sampling"
    """Run directory: samples.jsonl, summary.json (and the datasets of rejection-sampling) go here."""
    samples_path: Optional[str] = None
    """Write every sample with its scores here instead of OUTPUT/samples.jsonl."""
    seed: int = 42
    """Sampling seed."""


class BoNConfig(SamplingConfig):
    """Best-of-N sampling: N samples per prompt, keep the one the reward likes best."""

    command: Literal["bon"] = "bon"


class RejectionSamplingConfig(SamplingConfig):
    """Best samples -> SFT rows; best versus worst -> preference pairs."""

    command: Literal["rejection-sampling"] = "rejection-sampling"
    sft_path: Optional[str] = None
    """SFT dataset {prompt, completion} of the best samples (default OUTPUT/sft.jsonl)."""
    pairs_path: Optional[str] = None
    """Preference dataset {prompt, chosen, rejected} of best versus worst (default OUTPUT/pairs.jsonl)."""
    min_margin: float = Field(0.0, ge=0)
    """Keep a pair only when best - worst reward exceeds this (ties are always dropped, and counted)."""
    min_reward: Optional[float] = None
    """Keep an SFT row only when its best reward is at least this."""
