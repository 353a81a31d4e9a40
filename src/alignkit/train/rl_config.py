"""Configs of the online-RL commands (ppo, grpo, rloo) and of sampling (bon, rejection-sampling).

Every field has a docstring: it becomes ``alignkit CMD --help``, the YAML docs and the validation
errors, as for the other commands. Reward lists accept the CLI shorthand ``KIND:ARG[@WEIGHT]`` or
the YAML mapping form of :class:`alignkit.rewards.RewardSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from alignkit.advantages import ADVANTAGES
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig, Section
from alignkit.losses.base import Registry
from alignkit.losses.policy import AGGREGATIONS, RL_POLICY_LOSSES
from alignkit.ops.kl import KLKind
from alignkit.rewards import REWARD_KINDS, RewardSpec
from alignkit.rollout.generate import GenerationConfig
from alignkit.rollout.job import NSamplesJob, SamplingJob
from alignkit.train.rl_stages import KL_PLACEMENTS


class RewardsMixin(Section):
    rewards: List[RewardSpec] = []
    """Reward components to optimize, summed with their weights: KIND:ARG[@WEIGHT] strings (CLI: --reward,
    repeatable) or mappings {kind, arg, weight, options, name}. Kinds: model:PATH, ensemble:P1,P2[;mode],
    match:FIELD, regex:PATTERN, length:..., python:MODULE:FN (see docs/online-rl.md)."""
    gold_reward: List[RewardSpec] = []
    """Reward scored on every rollout and logged as rewards/gold but never optimized (e.g. a held-out
    judge or the true task reward), to catch over-optimization of the proxy reward."""

    reward_weights: Optional[List[float]] = None
    """TRL's reward_weights: one weight per entry of rewards (reward_funcs), in order; sets each
    component's weight (empty: the weights the rewards carry, 1.0 by default)."""
    reward_timeout_s: Optional[float] = Field(120.0, ge=0)
    """Deadline in seconds of each call of a reward that runs user code (python:, trl: functions, judges;
    also spelled rewards.timeout_s): a call that runs longer is stopped and the run ends with one Error
    line naming the function and the batch. 0 or empty: no deadline."""

    @field_validator("rewards", "gold_reward", mode="before")
    @classmethod
    def _coerce_specs(cls, v: Any) -> List[RewardSpec]:
        return RewardSpec.coerce_list(v)

    @model_validator(mode="after")
    def _need_reward(self):
        if not self.rewards:
            raise ValueError("no reward: pass --reward KIND:ARG[@WEIGHT] (repeatable), a `rewards:` list or TRL's "
                             "`reward_funcs:`; kinds: " + ", ".join(REWARD_KINDS.names()))
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_reward_weights(cls, data: Any) -> Any:
        """TRL's reward_weights: the i-th weight is the i-th reward's (checked: one per reward)."""
        if not isinstance(data, dict) or data.get("reward_weights") is None:
            return data
        data = dict(data)
        weights = data["reward_weights"]
        weights = [weights] if isinstance(weights, (int, float, str)) else list(weights)
        specs = RewardSpec.coerce_list(data.get("rewards"))
        if len(weights) != len(specs):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(specs)} rewards "
                             f"({', '.join(s.shorthand() for s in specs) or 'none'}); give one per reward")
        data["rewards"] = [s.model_copy(update={"weight": float(w)}) for s, w in zip(specs, weights)]
        data["reward_weights"] = [float(w) for w in weights]
        return data


def _choice(registry: Registry) -> Any:
    """The Literal type of a config field whose values are a registry's names (read when the class is built,
    so a name is declared once: by registering it)."""
    return Literal[tuple(registry.names())]  # type: ignore[valid-type]


KLPlacement = _choice(KL_PLACEMENTS)
AdvantageKind = _choice(ADVANTAGES)
PolicyLossKind = _choice(RL_POLICY_LOSSES)
AggregationKind = _choice(AGGREGATIONS)
WhitenScope = Literal["global", "process"]


class RLOptions(Section):
    """The stage choices of the one online-RL task (docs/online-rl.md, "Stages"). A preset fills every
    field the user leaves out; the class defaults below are those of the grpo preset."""

    #: the preset fills every field the user leaves out (OnlineRLConfig._fill_from_preset), not the
    #: command's default section: ``rloo --preset dapo`` must not keep RLOO's own values
    inherit_defaults: ClassVar[bool] = False

    num_generations: int = Field(8, ge=1)
    """Samples per prompt (G). Group advantages (group, leave_one_out) compare the samples of a prompt."""
    epochs: int = Field(1, gt=0)
    """Passes over each rollout batch (more than one update per rollout uses the clipped ratio)."""
    num_minibatches: int = Field(8, gt=0)
    """Optimizer updates per epoch: each epoch splits the shuffled rollout into this many minibatches (8:
    eight Adam steps per rollout learn measurably more than one on the same samples, docs/online-rl.md,
    "Defaults"; 1 is TRL's GRPO shape and skips the behaviour-policy pass). A process with fewer
    completions per step makes one update per completion (the run's first line says so)."""
    # ---- reward shaping (every algorithm)
    normalize_reward: bool = False
    """Normalize sequence rewards with the running mean/std of every reward seen so far (all processes;
    saved in checkpoints): makes kl_coef and the loss scale independent of the reward's scale."""
    reward_clip: Optional[float] = Field(None, gt=0)
    """Clip (normalized) sequence rewards to [-reward_clip, reward_clip]."""
    overlong_buffer: float = Field(0.0, ge=0, lt=1)
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13): the last overlong_buffer x max_new_tokens
    tokens are a zone where the penalty grows linearly from 0 to overlong_penalty (0: off)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Largest overlong penalty (reached at generation.max_new_tokens)."""
    # ---- KL to the reference
    kl_placement: KLPlacement = Field("loss", description="Where the KL to the reference acts: "
                                      + KL_PLACEMENTS.describe() + ".")
    kl_coef: float = Field(0.04, ge=0)
    """KL coefficient beta (initial value when adaptive); 0 with kl_placement none loads no reference."""
    kl_estimator: KLKind = "k3"
    """Per-token KL estimate (Schulman 2020): k1 log-ratio, k2 half squared log-ratio, k3 (r-1)-log r."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target (Ziegler et al. 2019, eq. 2); the coefficient is saved in checkpoints."""
    kl_target: float = Field(6.0, gt=0)
    """Target KL to the reference, nats per sequence (adaptive_kl)."""
    kl_horizon: float = Field(10000.0, gt=0)
    """Horizon of the adaptive controller, in samples: larger adapts more slowly."""
    # ---- advantage
    advantage: AdvantageKind = Field("group", description="Advantage estimator: " + ADVANTAGES.describe() + ".")
    scale_by_std: bool = True
    """group: divide by the group std (false: Dr. GRPO, Liu et al. 2025)."""
    whiten_advantages: bool = False
    """Whiten advantages (zero mean, unit variance) over the response tokens of the rollout."""
    whiten_scope: WhitenScope = "global"
    """Statistics for whitening and the batch-level estimators: global (every process's rollout) or process
    (its own)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    # ---- policy loss and aggregation
    policy_loss: PolicyLossKind = Field("clipped_token", description="Policy loss: " + RL_POLICY_LOSSES.describe()
                                        + ".")
    clip_eps: float = Field(0.2, gt=0)
    """Lower clip range of the ratio (Schulman et al. 2017, eq. 7)."""
    clip_eps_high: Optional[float] = Field(None, gt=0)
    """Upper clip range (DAPO clip-higher; empty: clip_eps)."""
    aggregation: AggregationKind = Field("sequence_mean", description="Token reduction of the loss: "
                                         + AGGREGATIONS.describe() + ".")
    ent_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    # ---- critic (advantage: gae)
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    vf_clip: Optional[float] = Field(0.2, gt=0)
    """Clip range of the value around its rollout-time estimate (empty: unclipped value loss)."""
    # ---- dynamic sampling (DAPO)
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (no signal) and sample more prompts until the batch is full
    (Yu et al. 2025, eq. 11); needs num_generations >= 2."""
    max_sampling_rounds: int = Field(4, ge=1)
    """Cap on rollout rounds per step with dynamic_sampling; a batch still short after it is topped up with
    dropped groups (counted in sampling/short_groups)."""
    # ---- TRL's GRPOConfig options without an alignkit twin
    std_scope: Literal["group", "batch"] = "group"
    """group advantages with scale_by_std: divide by the std of the prompt's group (GRPO) or of the whole
    rollout batch, every process (TRL's scale_rewards=batch; group mean, batch std: Liu et al. 2025,
    "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", sec. 4.1)."""
    mask_truncated_completions: bool = False
    """TRL's mask_truncated_completions: responses cut at generation.max_new_tokens (no EOS) contribute no
    loss (their tokens are masked; they still count in the group statistics and the reward metrics)."""


@dataclass(frozen=True)
class PresetSpec:
    """A named bundle of stage choices: RLOptions field -> value. A field the user sets wins over its preset's
    value. ``doc``: the algorithm and its paper."""

    name: str
    settings: Dict[str, Any]
    doc: str = ""


#: preset name -> :class:`PresetSpec`; ``preset`` and ``--preset`` choices come from here.
PRESETS: Registry[PresetSpec] = Registry("online-RL", PresetSpec, what="preset")


def add_preset(name: str, doc: str, **settings: Any) -> PresetSpec:
    """File a preset in :data:`PRESETS`. Its settings are checked against :class:`RLOptions` here, so a
    misspelled option or stage name fails at import, naming the preset."""
    try:
        RLOptions(**settings)
    except ValueError as e:
        raise ValueError(f"preset {name!r}: {e}") from None
    return PRESETS.add(PresetSpec(name, settings, doc))


# ppo, grpo and rloo share one rollout shape by default: 8 samples per prompt, 8 minibatch updates per epoch
# (issue 31, item 6: measured in docs/online-rl.md); the other presets keep the shapes they had.
add_preset("ppo", "PPO with a critic (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022)",
           num_generations=8, epochs=1, num_minibatches=8, kl_placement="token_reward", kl_coef=0.05,
           kl_estimator="k1", advantage="gae", lam=1.0, whiten_advantages=True, policy_loss="clipped_token",
           aggregation="token_mean", normalize_reward=True)
add_preset("grpo", "GRPO (Shao et al. 2024)",
           num_generations=8, num_minibatches=8, kl_placement="loss", kl_coef=0.04, kl_estimator="k3",
           advantage="group", scale_by_std=True, policy_loss="clipped_token", aggregation="sequence_mean")
add_preset("dr_grpo", "Dr. GRPO (Liu et al. 2025): no std scaling, no length normalization per response, no KL",
           num_generations=8, num_minibatches=1, kl_placement="none", kl_coef=0.0, advantage="group",
           scale_by_std=False, policy_loss="clipped_token", aggregation="sum_norm")
add_preset("dapo", "DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, overlong shaping, no KL",
           num_generations=8, num_minibatches=1, kl_placement="none", kl_coef=0.0, advantage="group",
           scale_by_std=True, policy_loss="clipped_token", clip_eps=0.2, clip_eps_high=0.28,
           aggregation="token_mean", dynamic_sampling=True, overlong_buffer=0.2)
add_preset("gspo", "GSPO (Zheng et al. 2025): length-normalized sequence ratio, small clip range",
           num_generations=8, kl_placement="none", kl_coef=0.0, advantage="group", scale_by_std=True,
           policy_loss="clipped_sequence", clip_eps=3e-4, clip_eps_high=4e-4, aggregation="sequence_mean",
           num_minibatches=2)
add_preset("rloo", "RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline",
           num_generations=8, num_minibatches=8, kl_placement="sequence_reward", kl_coef=0.05, kl_estimator="k1",
           advantage="leave_one_out", policy_loss="reinforce", aggregation="sum", normalize_reward=True)
add_preset("reinforce_pp", "REINFORCE++ (Hu 2025): token-level KL in the reward, reward-to-go, global batch "
           "normalization, no critic",
           num_generations=4, num_minibatches=1, kl_placement="token_reward", kl_coef=0.01, kl_estimator="k2",
           advantage="batch_baseline", policy_loss="clipped_token", aggregation="token_mean")
add_preset("reinforce_baseline", "REINFORCE with a batch-mean baseline (Williams 1992): r - mean of the global "
           "batch, no critic, no groups",
           num_generations=4, num_minibatches=1, kl_placement="sequence_reward", kl_coef=0.05, kl_estimator="k1",
           advantage="batch_mean", policy_loss="reinforce", aggregation="sum", normalize_reward=True)
PRESET_NAMES = tuple(PRESETS.names())
#: old option names kept working (GRPO's beta is the KL coefficient)
_LEGACY_FIELDS = {"beta": "kl_coef"}


@dataclass(frozen=True)
class RolloutPlan:
    """One step's rollout: ``prompts`` per process, each sampled ``generations`` times, on ``processes``
    processes; micro-batches of ``micro_rows`` sequences; ``updates`` optimizer updates per epoch.
    ``trl``: the batch was given in TRL's completions (per_device_train_batch_size). ``capped``: the
    ``num_minibatches`` asked for, when a process has fewer completions than that (one update each)."""

    prompts: int
    generations: int
    processes: int
    micro_rows: int
    updates: int
    trl: bool
    capped: Optional[int] = None

    @property
    def completions(self) -> int:
        """Completions per step, every process."""
        return self.prompts * self.generations * self.processes

    def describe(self) -> str:
        """The line every online run prints at its start."""
        p = self.prompts * self.processes
        procs = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        upd = f"{self.updates} optimizer update{'s' if self.updates != 1 else ''} per epoch of the rollout"
        if self.capped is not None:
            upd += f" (num_minibatches={self.capped}: at most one per completion of a process)"
        trl = (f" (TRL's per_device_train_batch_size={self.micro_rows} completions x steps_per_generation="
               f"{self.prompts * self.generations // self.micro_rows} per process)" if self.trl else "")
        return (f"rollout: {p} prompts x {self.generations} generations = {self.completions} completions per step "
                f"on {procs}; micro-batches of {self.micro_rows} completions, {upd}{trl}")


class ValueOptions(Section):
    shared: bool = False
    """Value head on the policy's backbone (one forward pass, less memory) instead of a separate critic."""
    init: str = "policy"
    """Separate critic's starting weights: policy (the policy's backbone, a zero head), reward (the first
    model: reward, head included; InstructGPT) or a model path. It must share the policy's tokenizer."""
    lr: Optional[float] = Field(None, gt=0)
    """Learning rate of the critic (value head or separate critic), its own optimizer group following the
    same schedule (empty: optim.lr)."""
    warmup_steps: int = Field(0, ge=0)
    """Rollout steps at the start that train the critic alone (the policy is not updated), so the first
    policy updates see a fitted baseline. A shared value head trains on detached features meanwhile."""


class OnlineRLConfig(RunConfig, SamplingJob, RewardsMixin):
    """Sections shared by every online-RL command. One step = one rollout batch of
    train.batch_size x train.grad_accum x processes prompts; a forward micro-batch holds train.batch_size of
    them with all their samples (batch_size x num_generations sequences; train.max_tokens_per_batch cuts by
    tokens instead), as an offline micro-batch holds batch_size rows. The stage options live in the command's own section
    (``ppo:``, ``grpo:``, ``rloo:`` or ``rl:``), filled from ``preset``."""

    section: ClassVar[str] = "rl"
    default_preset: ClassVar[str] = "grpo"

    preset: Optional[_choice(PRESETS)] = Field(  # type: ignore[valid-type]
        None, description="Named bundle of stage choices; every option you set overrides its preset's value. "
        "Empty: the command's own algorithm. One of: " + PRESETS.describe() + ".")
    optim: OptimConfig = OptimConfig(scheduler="constant")
    """Optimizer and learning-rate schedule. Online RL keeps its peak rate by default (scheduler: constant,
    as verl's actor): every step trains on new rollouts of the current policy, and a decay to 0 would spend
    a short run's last steps, and half its mean rate, learning almost nothing (docs/online-rl.md)."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=64)
    """Sampling of the rollouts (temperature, top_p, top_k, max_new_tokens, engine hf|vllm)."""
    ref_model: Optional[str] = None
    """Reference model for the KL term (default: the starting policy; with LoRA the adapter is switched
    off instead of loading a second copy)."""
    missing_eos_penalty: Optional[float] = Field(None, ge=0)
    """Subtracted from the reward of responses that hit generation.max_new_tokens without EOS."""
    eval_samples: int = Field(1, gt=0)
    """Samples per held-out prompt when evaluating (eval/rewards/*), drawn with a fixed seed."""
    value: ValueOptions = ValueOptions()
    """Value model (critic) options; used when the advantage is gae."""
    completions_per_device: Optional[int] = Field(None, gt=0)
    """TRL's per_device_train_batch_size for online RL: completions (not prompts) per micro-batch per
    process. When set, a step's rollout is completions_per_device x steps_per_generation completions per
    process (steps_per_generation defaults to train.grad_accum), that is / num_generations prompts, trained
    in steps_per_generation / train.grad_accum optimizer updates per epoch; train.batch_size and the
    section's num_minibatches are then not used. Empty: train.batch_size counts prompts (alignkit's meaning)."""
    steps_per_generation: Optional[int] = Field(None, gt=0)
    """TRL's steps_per_generation: micro-batches of completions_per_device completions per rollout (default
    train.grad_accum). Needs completions_per_device (per_device_train_batch_size)."""
    log_completions: bool = False
    """TRL's log_completions: at every logged step (log.every), write the step's rollout as a table (prompt,
    completion, each reward, advantage) to OUTPUT/completions.jsonl and to the trackers (W&B table,
    TensorBoard text). Without it a few rows per logged step are still kept for report.html."""

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        """Fill the algorithm section with the preset's values for every field the user left out."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("preset") or cls.default_preset
        preset = PRESETS.get(name)  # an unknown name: the error lists the registered presets
        given = data.get(cls.section)
        if isinstance(given, RLOptions):  # an options object is complete (and assignment re-validates it)
            return data
        given = dict(given or {})
        for old, new in _LEGACY_FIELDS.items():
            if old in given:
                if new in given:
                    raise ValueError(f"{cls.section}.{old} and {cls.section}.{new} are the same option; give one")
                given[new] = given.pop(old)
        data[cls.section] = {**preset.settings, **given}
        return data

    @model_validator(mode="after")
    def _check_stages(self):
        o = self.algo
        if ADVANTAGES.get(o.advantage).needs_groups and o.num_generations < 2:
            raise ValueError(f"{self.section}.advantage={o.advantage} compares the samples of a prompt: "
                             f"{self.section}.num_generations must be at least 2")
        if o.dynamic_sampling and o.num_generations < 2:
            raise ValueError(f"{self.section}.dynamic_sampling drops prompts whose samples all got the same "
                             f"reward: {self.section}.num_generations must be at least 2")
        self.rollout_plan(1)  # TRL-style batch sizes must divide into groups
        return self

    def rollout_plan(self, processes: int) -> "RolloutPlan":
        """The shape of one step's rollout on ``processes`` processes (see :class:`RolloutPlan`)."""
        G, accum = self.algo.num_generations, self.train.grad_accum
        B = self.completions_per_device
        if B is None:
            if self.steps_per_generation is not None:
                raise ValueError("steps_per_generation counts micro-batches of per_device_train_batch_size "
                                 "completions (TRL's meaning): set per_device_train_batch_size too, or use "
                                 f"{self.section}.num_minibatches")
            P, asked = self.train.batch_size * accum, self.algo.num_minibatches
            updates = min(asked, P * G)  # a small rollout (tests, quick runs): one update per completion
            return RolloutPlan(P, G, processes, self.train.batch_size * G, updates, False,
                               asked if updates < asked else None)
        S = self.steps_per_generation or accum
        if (B * S) % G:
            raise ValueError(f"per_device_train_batch_size x steps_per_generation = {B} x {S} = {B * S} completions "
                             f"per process is not a multiple of num_generations ({G}): every prompt needs its {G} "
                             f"samples on one process")
        if S % accum:
            raise ValueError(f"steps_per_generation ({S}) must be a multiple of gradient_accumulation_steps "
                             f"({accum}): each optimizer update takes {accum} micro-batches")
        return RolloutPlan(B * S // G, G, processes, B, S // accum, True)


    @property
    def algo(self) -> "RLOptions":
        """The stage options of this command (its ``ppo``/``grpo``/``rloo``/``rl`` section)."""
        return getattr(self, self.section)

    @property
    def preset_name(self) -> str:
        return self.preset or self.default_preset


class PPOConfig(OnlineRLConfig):
    """PPO with a value model (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022)."""

    section: ClassVar[str] = "ppo"
    default_preset: ClassVar[str] = "ppo"
    command: Literal["ppo"] = "ppo"
    ppo: RLOptions = RLOptions(**PRESETS.get("ppo").settings)
    """Stage options (defaults: the ppo preset)."""


class GRPOConfig(OnlineRLConfig):
    """Group relative policy optimization (Shao et al. 2024) and its family (--preset dr_grpo|dapo|gspo)."""

    section: ClassVar[str] = "grpo"
    command: Literal["grpo"] = "grpo"
    grpo: RLOptions = RLOptions(**PRESETS.get("grpo").settings)
    """Stage options (defaults: the grpo preset)."""


class RLOOConfig(OnlineRLConfig):
    """REINFORCE leave-one-out (Ahmadian et al. 2024)."""

    section: ClassVar[str] = "rloo"
    default_preset: ClassVar[str] = "rloo"
    command: Literal["rloo"] = "rloo"
    rloo: RLOptions = RLOptions(**PRESETS.get("rloo").settings)
    """Stage options (defaults: the rloo preset)."""


class RLConfig(OnlineRLConfig):
    """Any online-RL algorithm as a preset of stages (--preset NAME, a :data:`PRESETS` entry)."""

    command: Literal["rl"] = "rl"
    rl: RLOptions = RLOptions()
    """Stage options (defaults: the chosen preset)."""


class SamplingConfig(RewardsMixin, NSamplesJob):
    """Sections shared by bon and rejection-sampling (no training): a sampling job (rollout/job.py) with
    rewards."""

    model: ModelConfig = ModelConfig()
    """The policy to sample from."""
    data: DataConfig = DataConfig()
    """Prompt rows ({prompt, ...} or {messages}); extra fields reach the reward functions."""
    output: str = "runs/sampling"
    """Run directory: samples.jsonl, summary.json (and the datasets of rejection-sampling) go here."""
    samples_path: Optional[str] = None
    """Write every sample with its scores here instead of OUTPUT/samples.jsonl."""


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
