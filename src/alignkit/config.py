"""Run configuration: one pydantic model per command, sharing sections.

Every field carries a docstring; pydantic turns it into the field description
(``use_attribute_docstrings``), and that one text becomes ``alignkit CMD --help``, the YAML docs and
the validation errors. Configs load from YAML plus dotted overrides (``optim.lr=1e-5``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Literal, Optional, Sequence, Type, TypeVar, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Section", "ModelConfig", "HubConfig", "LoraConfig", "DataConfig", "TrainConfig", "OptimConfig", "LogConfig",
    "DiagnosticsConfig", "RunConfig", "SFTConfig", "RMConfig", "ScoreConfig", "ConfigError", "load_config",
    "apply_overrides", "ALERT_KINDS", "known_names",
]


def known_names(value: Any, known: Sequence[str], what: str, label: str = "known",
                also: Sequence[str] = ()) -> List[str]:
    """``value`` (one name or a list; empty: none) as a list, when every name is in ``also`` or ``known``;
    else ``ValueError("unknown WHAT(s) [...]; LABEL: ALSO..., KNOWN...")``. The check of every option
    that lists names from a registry (alert kinds, probes)."""
    names = [value] if isinstance(value, str) else list(value or [])
    unknown = [n for n in names if n not in known and n not in also]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; {label}: {', '.join([*also, *known])}")
    return names


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, field docstrings are descriptions.

    A sub-section's default may differ from its class's own defaults: ``optim: OptimConfig =
    OptimConfig(scheduler="constant")`` in a command's config. A user who sets some keys of that
    sub-section (``optim.lr=1e-3``) keeps the command's values of the others (``scheduler`` stays constant);
    only the keys given replace them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              protected_namespaces=())
    #: False for a section type whose values a command fills otherwise (online RL's stage options come
    #: from the preset): a field of this type does not start from its default's values
    inherit_defaults: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        """Start each sub-section given as a mapping from the values its field's default sets explicitly
        (the mapping's keys win); without this pydantic would build it from the sub-section class's
        defaults and silently drop the command's."""
        if not isinstance(data, dict):
            return data
        merged = None
        for name, field in cls.model_fields.items():
            default, given = field.default, data.get(name)
            if not (isinstance(default, Section) and default.inherit_defaults and default.model_fields_set
                    and isinstance(given, dict)):
                continue
            base = {k: getattr(default, k) for k in default.model_fields_set if k not in given}
            if base:
                merged = merged if merged is not None else dict(data)
                merged[name] = {**base, **given}
        return data if merged is None else merged


class ModelConfig(Section):
    name_or_path: Optional[str] = None
    """Hugging Face model id or local directory. Empty: the embedded default (SmolLM2-135M-Instruct)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto: float32 for trained weights (bf16 autocast where bf16 is native), bfloat16 for
    frozen models (scorers, judges, eval) where bf16 is native (a GPU, or a CPU with AMX/AVX512-BF16)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repository (off unless you ask)."""
    attn_implementation: Optional[str] = None
    """Attention backend passed to transformers (e.g. sdpa, eager, flash_attention_2)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    gradient_checkpointing_kwargs: Dict[str, Any] = {}
    """Arguments of transformers' gradient_checkpointing_enable (default {use_reentrant: false})."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when loading by id."""
    chat_template: Optional[str] = None
    """Chat template for a tokenizer without one (or to replace its own): a Jinja file (.jinja/.j2/.txt)
    or a named template (chatml, zephyr, llama3). Saved with the tokenizer in OUTPUT/model."""
    load_in_4bit: bool = False
    """QLoRA: load the trained model's base weights in 4 bits (bitsandbytes, an optional extra:
    pip install 'alignkit[qlora]'); train LoRA adapters on top (lora.enabled)."""
    load_in_8bit: bool = False
    """Load the base weights in 8 bits (bitsandbytes)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (NormalFloat, Dettmers et al. 2023) or fp4."""
    bnb_4bit_use_double_quant: bool = False
    """Double quantization: the quantization constants quantized too (QLoRA, Dettmers et al. 2023)."""
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Dtype of the 4-bit layers' matrix products (empty: bfloat16 where bf16 is native, else float32)."""


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters instead of all weights (peft)."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch. Must be in [0, 1): a probability, and 1 drops the whole branch."""
    target_modules: Union[str, List[str]] = "all-linear"
    """Module names to adapt, or all-linear."""
    save: Literal["merged", "adapter"] = "merged"
    """What OUTPUT/model holds after a LoRA run: merged full weights or the adapter only."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale = alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA, a trained magnitude per output feature (Liu et al. 2024)."""
    target_parameters: Optional[List[str]] = None
    """Parameters (not modules) to adapt, e.g. mixture-of-experts weights stored as nn.Parameter
    (peft's target_parameters)."""
    task_type: Optional[str] = None
    """peft task type (CAUSAL_LM, SEQ_CLS); empty: the command's own (SEQ_CLS for rm, else CAUSAL_LM)."""


class HubConfig(Section):
    push: bool = False
    """Upload OUTPUT/model (weights, tokenizer, model card) to the Hugging Face Hub at the end of the run
    (huggingface_hub; the token comes from HF_TOKEN or `hf auth login`, never from the config)."""
    model_id: Optional[str] = None
    """Hub repository to push to (user/name). Empty: the output directory's name under your account."""
    private: bool = False
    """Create the Hub repository as private."""


class MixSource(Section):
    """One dataset of ``data.mix``."""

    path: str
    """A file, a dataset directory or a hub name (as data.path)."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight: this dataset gives weight / (sum of weights) of the mixed training examples."""
    split: str = "train"
    """Split to read from a dataset directory or hub dataset."""
    subset: Optional[str] = None
    """Configuration (subset) of a hub dataset (default: data.subset)."""

    @classmethod
    def coerce(cls, v: Any) -> Any:
        """``"PATH@WEIGHT"`` (or ``"PATH"``) strings become ``{path, weight}``."""
        if isinstance(v, str):
            path, at, weight = v.rpartition("@")
            if at and weight.replace(".", "", 1).replace("e-", "", 1).isdigit():
                return {"path": path, "weight": float(weight)}
            return {"path": v}
        return v


class DataConfig(Section):
    path: Optional[str] = None
    """Training data: a JSONL/JSON/Parquet/CSV file, a datasets.save_to_disk directory, or a hub name."""
    split: str = "train"
    """Split to read from a dataset directory or hub dataset."""
    subset: Optional[str] = None
    """Configuration (subset) of a hub dataset, e.g. 'en' (load_dataset's name argument)."""
    eval_path: Optional[str] = None
    """Held-out data (same formats). Empty: the training dataset's eval_split or test twin, else
    eval_fraction of its rows."""
    eval_split: Optional[str] = None
    """Split of the held-out data (of eval_path, else of path). Empty: the test twin of split when the
    dataset has one (test_prefs for train_prefs, test for train) and eval_fraction is 0, else
    eval_fraction of the training rows."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Fraction of the training data held out for evaluation when there is no eval_path, eval_split or
    test twin: whole prompts (see eval_split_by), about this fraction of the rows.
    Must be in [0, 1): 1 would leave nothing to train on."""
    eval_split_by: Literal["prompt", "row"] = "prompt"
    """How eval_fraction holds data out. prompt: whole prompts (rows grouped by normalized prompt text:
    Unicode NFKC, case-folded, whitespace collapsed; a conversation by its turns before the first
    assistant reply), so no held-out row shares its prompt with training; row: single rows (the pairs
    of one ranking row still stay together), which lets a prompt's other replies sit in training."""
    max_length: int = Field(1024, gt=1)
    """Maximum tokens of prompt plus response."""
    max_prompt_length: Optional[int] = Field(None, gt=0)
    """Maximum prompt tokens kept when a row is too long (default: half of max_length)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Too-long rows: truncate (prompt from the left, then the response from the right) or drop.
    Either way the rows are counted and reported."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: apply the tokenizer's chat template to message-list rows only; always: also wrap plain
    prompt strings as a user turn; never: plain text only (message rows are an error)."""
    max_rows: Optional[int] = Field(None, gt=0)
    """Read at most this many rows (after shuffling is not applied: the first rows)."""
    num_proc: int = Field(1, ge=1)
    """Processes for tokenization (datasets.map)."""
    mix: List[MixSource] = []
    """Several training datasets sampled by weight, instead of data.path: a list of {path, weight, split,
    subset} (or "PATH@WEIGHT" strings). Each gives weight / (sum of weights) of the training examples;
    data_report.json lists each dataset's share and how many of its examples were drawn (docs/data.md)."""
    streaming: bool = False
    """Read the training data lazily as training goes (large files, hub datasets) instead of all at
    start. Needs train.max_steps; data order is the stream's (see shuffle_buffer), and a resumed run
    reads exactly the rows a straight run would at each step."""
    shuffle_buffer: int = Field(0, ge=0)
    """With data.streaming: shuffle the stream within a buffer of this many examples (seeded by
    train.seed); 0 keeps the stream's own order."""

    @field_validator("mix", mode="before")
    @classmethod
    def _coerce_mix(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        return [MixSource.coerce(x) for x in v] if isinstance(v, list) else v


class TrainConfig(Section):
    batch_size: int = Field(8, gt=0)
    """Micro-batch size per process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step. Global batch = batch_size x grad_accum x processes."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: Optional[int] = Field(None, gt=0)
    """Optimizer steps to run; overrides epochs."""
    seed: int = 42
    """Seed for weights init, data order and sampling."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision: auto is bf16 autocast (fp32 master weights) wherever bf16 is native (a GPU, or a
    CPU with AMX or AVX512-BF16), else fp32. fp32 for bit-exact comparisons."""
    logprob_chunk: int = Field(1024, ge=0)
    """Label positions per chunk when computing log-probs (never a full [B, T, V] logits tensor);
    0 computes full logits: faster on a GPU, far more memory (see bench/logprobs_memory.py)."""
    packing: bool = True
    """Padding-free packing (sft, rm, dpo family): several sequences per row with position ids restarting
    per sequence and attention that never crosses a boundary (flash-attention varlen on a GPU). Checked
    on the model at start; a model that cannot pack exactly gets padded batches and a message."""
    prefix_sharing: bool = True
    """Paired losses (dpo family, rm): prompt, chosen and rejected in one sequence, each response seeing
    the prompt and itself, so the prompt runs once per pair. Online RL with groups (GRPO, RLOO, ...; no
    critic): a micro-batch's samples of one prompt share it in the loss, old-log-prob and reference
    passes. Needs packing and a mask-capable attention; checked on the model at start."""
    max_tokens_per_batch: Optional[int] = Field(None, gt=0)
    """Micro-batches by a token budget: consecutive items while their tokens fit (one over the budget
    goes alone) instead of batch_size items. The items per step (batch_size x grad_accum x processes)
    and the loss normalization are unchanged."""
    max_bad_steps: int = Field(5, gt=0)
    """Abort after this many consecutive steps with a NaN/Inf loss or gradient (each is skipped)."""


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate. Must be > 0: 0 trains nothing and a negative rate ascends the loss."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay. Must be >= 0: a negative decay pushes every weight away from 0."""
    betas: List[float] = Field([0.9, 0.999], min_length=2, max_length=2)
    """AdamW betas (beta1, beta2). Must be in [0, 1): they are the decay rates of the moment averages,
    and 1 or more never forgets (or grows) the first gradients."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon. Must be > 0: it keeps the update finite where the second moment is 0."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of steps spent warming up linearly from 0. Must be in [0, 1): a fraction of the run
    that leaves at least one step at the peak rate."""
    warmup_steps: Optional[int] = Field(None, ge=0)
    """Warmup steps (overrides warmup_ratio)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Learning rate at the end of the decay, as a fraction of lr. Must be in [0, 1]: a decay ends at or
    below the peak and never below 0."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (empty: no clipping). Must be > 0: a norm of 0 would
    zero every update (leave it empty to turn clipping off)."""
    resume_schedule: Literal["continue", "restart"] = "continue"
    """When a resumed run is longer than the checkpoint's (train.max_steps raised): continue the schedule
    recomputed for the new length from the checkpoint's step, or restart warmup and decay over the
    remaining steps. The log says which."""
    optimizer: str = "adamw"
    """Optimizer: adamw (fused where possible; transformers' adamw_torch, adamw_torch_fused, adamw_hf),
    adam, sgd, adagrad, rmsprop, adafactor, or with bitsandbytes adamw_8bit, paged_adamw_8bit,
    paged_adamw_32bit (TRL's optim key)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: List[float]) -> List[float]:
        bad = [b for b in v if not 0 <= b < 1]
        if bad:
            raise ValueError(f"{bad} outside [0, 1). " + field_reason(cls, ("betas",)))
        return v

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        # deferred: a module-level import would load torch into annotate
        from alignkit.train.optim import canonical_optimizer

        return canonical_optimizer(v)


class LogConfig(Section):
    every: int = Field(1, gt=0)
    """Log metrics every N optimizer steps."""
    eval_every: Optional[int] = Field(None, gt=0)
    """Evaluate on the held-out split every N steps (always at the end when there is one)."""
    evaluate: bool = True
    """Held-out evaluation (before, every eval_every steps, at the end); false: none (TRL's
    eval_strategy: no). Report samples (log.samples) are still answered."""
    save_every: Optional[int] = Field(None, gt=0)
    """Write a checkpoint every N steps (atomic; resume with --resume)."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept (oldest deleted first)."""
    report_to: List[Literal["tensorboard", "wandb", "trackio"]] = []
    """Extra trackers beside OUTPUT/metrics.jsonl (each training call opens and finishes its own run)."""
    progress: bool = True
    """Show a progress bar with ETA and live metrics."""
    run_name: Optional[str] = None
    """Run name for trackers (default: the output directory name)."""
    samples: int = Field(4, ge=0)
    """Held-out prompts answered (greedy) before and after training, shown in report.html."""
    sample_tokens: int = Field(48, gt=0)
    """Longest sample answer, in tokens."""


#: every check of :class:`~alignkit.eval.diagnostics.Diagnostics` (its ``kind``); ``fail_on`` names them. Here,
#: beside the section that configures them, so that the config does not import the diagnostics
ALERT_KINDS = ("kl_blowup", "verbosity", "reward_marker", "mode_collapse", "overoptimization", "likelihood_displacement",
               "zero_grad", "stuck_loss", "constant_reward", "all_truncated", "all_masked", "exploding",
               "heldout_regression")


class DiagnosticsConfig(Section):
    """Live failure-mode checks (:mod:`alignkit.eval.diagnostics`): the ``diagnostics`` section of every
    run config and the thresholds :class:`~alignkit.eval.diagnostics.Diagnostics` reads. Defined once."""

    enabled: bool = True
    """Watch the logged metrics for failure modes and warn (log, alerts.jsonl, report.html)."""
    kl_budget: float = Field(10.0, gt=0)
    """Warn when the KL to the reference (nats per sequence, kl/ref) exceeds this."""
    length_growth: float = Field(0.2, gt=0)
    """Warn when response length rises by this fraction while the reward rises (verbosity bias)."""
    diversity_drop: float = Field(0.5, gt=0, lt=1)
    """Warn when distinct-2 falls below (1 - this) of its first value (mode collapse)."""
    gold_drop: float = Field(0.05, gt=0)
    """Warn when the gold reward falls by this much while the proxy reward rises (over-optimization)."""
    marker_corr: float = Field(0.6, gt=0, le=1)
    """Warn when the reward's correlation with a probe marker (rewards/corr_length, _hedging, _list,
    _agreement), averaged over the window, exceeds this: the reward pays for a surface feature."""
    logp_drop: float = Field(0.1, gt=0)
    """Warn when chosen log-probs fall by this fraction while DPO margins grow (likelihood displacement)."""
    window: int = Field(5, ge=3)
    """Observations in the short trend window (at least 3, to fit a trend with an error estimate)."""
    long_window: int = Field(50, ge=0)
    """A second, longer trend horizon (observations) that catches slow drifts; <= window disables it."""
    trend_t: float = Field(3.0, gt=0)
    """Minimum |slope / standard error| for a least-squares trend to count as real, not noise."""
    patience: int = Field(2, ge=1)
    """Consecutive evaluations a trend condition must hold before its alert fires (filters noise)."""
    clear_after: int = Field(20, ge=1)
    """Consecutive evaluations a fired condition must be false before it may fire again."""
    stall_steps: int = Field(10, ge=2)
    """Logged steps in a row that a no-learning condition must hold before it alerts: a zero gradient
    norm, a flat loss, equal rewards or zero-variance groups, every completion truncated, every label
    masked."""
    weight_growth: float = Field(3.0, gt=1)
    """Alert (exploding) when the root mean square of the trained weights exceeds this multiple of its
    value before training (and 1.0)."""
    grad_growth: float = Field(100.0, gt=1)
    """Alert (exploding) when the gradient norm exceeds this multiple of its median over the first
    window logged steps."""
    heldout_drop: float = Field(0.05, gt=0)
    """Alert (heldout_regression) when held-out accuracy falls this much (absolute) below its value
    before training, and the fall is significant (paired t test over the held-out examples, 95%)."""
    heldout_rise: float = Field(0.05, gt=0)
    """Alert (heldout_regression) when the held-out loss rises by this fraction above its value before
    training, and the rise is significant (paired t test over the held-out examples, 95%)."""
    heldout_min_examples: int = Field(20, ge=2)
    """Fewest held-out examples (pairs for accuracy, sequences for the loss) on which heldout_regression
    judges: on fewer, a change cannot be told from noise and the alert stays quiet."""
    fail_on: List[str] = []
    """Alert kinds that abort the run (exit code 1) instead of only warning, e.g. [zero_grad,
    stuck_loss, constant_reward]; [any] aborts on every alert."""

    @field_validator("fail_on", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("fail_on")
    @classmethod
    def _known_kinds(cls, v: List[str]) -> List[str]:
        return known_names(v, ALERT_KINDS, "alert kind", also=("any",))


DiagnosticsSection = DiagnosticsConfig  # the section's name in earlier releases


class RunConfig(Section):
    """Sections shared by every training command."""

    command: str = "run"
    """The command this config is for (set automatically)."""
    output: str = "runs/alignkit"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/ and model/ go here."""
    model: ModelConfig = ModelConfig()
    """The model to train."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters (peft)."""
    data: DataConfig = DataConfig()
    """Training and evaluation data."""
    train: TrainConfig = TrainConfig()
    """Batching, steps, precision and seeding."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    log: LogConfig = LogConfig()
    """Logging, evaluation and checkpoints."""
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    """Live failure-mode warnings."""
    hub: HubConfig = HubConfig()
    """Pushing the trained model to the Hugging Face Hub."""
    resume: Optional[str] = None
    """Resume from a checkpoint directory, or 'latest' for OUTPUT's newest checkpoint. The checkpoint's
    config must match (only log, diagnostics, a larger train.max_steps and the like may change)."""
    overwrite: bool = False
    """Replace a finished or unfinished run already in OUTPUT (without it such a run is never overwritten).
    Only a directory that alignkit marked as its run (.alignkit-run.json) is cleared, and only the files
    it lists."""
    resume_anyway: bool = False
    """Resume even though an input (data file, model or reference weights, Hub revision) changed since the
    checkpoint was written (--resume refuses that otherwise, naming the input)."""


class SFTOptions(Section):
    loss_reduction: Literal["token", "sequence"] = "token"
    """token: mean over all response tokens of the global batch; sequence: mean of per-sequence means."""


class SFTConfig(RunConfig):
    """Supervised fine-tuning: next-token loss on response tokens only."""

    command: Literal["sft"] = "sft"
    sft: SFTOptions = SFTOptions()
    """SFT-specific options."""


class RMOptions(Section):
    loss: Literal["bradley_terry", "plackett_luce"] = "bradley_terry"
    """Loss over each prompt's ranking (one batch element per prompt): bradley_terry = every implied pair
    (InstructGPT; a plain pair row is one pair), plackett_luce = the whole ranking's likelihood
    (listwise; equal to bradley_terry on pairs). See docs/human-feedback.md for a comparison."""
    margin_field: Optional[str] = None
    """Row field holding a per-pair margin m: loss = -log sigmoid(r_w - r_l - m) (Llama 2)."""
    center_rewards_coef: float = Field(0.0, ge=0)
    """Weight of a (r_w + r_l)^2 penalty that keeps rewards centred near zero."""


class RMConfig(RunConfig):
    """Reward model: causal-LM backbone with a scalar head, Bradley-Terry (all pairs) or Plackett-Luce loss."""

    command: Literal["rm"] = "rm"
    rm: RMOptions = RMOptions()
    """Reward-model options."""


class ScoreConfig(Section):
    """Score rows with a trained reward model."""

    command: Literal["score"] = "score"
    reward_model: str
    """Directory of a reward model saved by `alignkit rm`."""
    data: DataConfig = DataConfig()
    """Rows to score (preference pairs get a score per response)."""
    output: Optional[str] = None
    """Where to write the scored rows (JSONL). Default: print a summary only, scores to stdout."""
    batch_size: int = Field(8, gt=0)
    """Rows per forward pass."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype."""


C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config value is invalid: the message names the field."""


def _coerce_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: List[str], cls: Optional[type] = None) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it.

    With ``cls``, familiar names (``learning_rate=1e-5``, see :mod:`alignkit.aliases`) map to our fields."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), _coerce_scalar(value), cls, item)
    return data


def _set_dotted(data: Dict[str, Any], key: str, value: Any, cls: Optional[type], origin: str) -> None:
    """Set one dotted key (an alias resolved first when ``cls`` is given); later layers win."""
    # deferred: CLI start-up: the aliases table loads when a config is built, not for `--help`
    from alignkit.aliases import UnusableKey, resolve_key, set_dotted

    try:
        pairs = resolve_key(cls, key, value) if cls is not None else [(key, value)]
        for target, val in pairs:
            set_dotted(data, target, val, cls)
    except UnusableKey as e:
        raise ConfigError(f"override {origin!r}: {e}") from None


#: pydantic's error types for a value outside a Field's gt/ge/lt/le range.
RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})

_REASON = re.compile(r"Must be .*?(?:\.(?=\s)|\.?$)", re.S)


def _section_in(annotation: Any) -> Optional[type]:
    """The pydantic model inside a field's annotation (``Section``, ``Optional[Section]``...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_in(arg)
        if found is not None:
            return found
    return None


def field_reason(cls: type, loc: tuple) -> Optional[str]:
    """The "Must be ..." sentence of the field at ``loc`` (its docstring states a range's reason once;
    error messages quote it from there), or None."""
    model: Optional[type] = cls
    info = None
    for part in loc:
        if isinstance(part, int):  # an item of a list field: same field
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = _section_in(info.annotation)
    found = _REASON.search(info.description or "") if info is not None else None
    return " ".join(found.group(0).split()) if found else None


def format_validation_error(err: ValidationError, cls: Optional[type] = None,
                            ignore: Optional[Callable[[tuple], bool]] = None) -> str:
    """One line per error, naming the field (with a "did you mean" for unknown keys of ``cls``);
    ``ignore(loc)`` drops errors (a pipeline's pending values)."""
    # deferred: CLI start-up: the aliases table loads when a config is built, not for `--help`
    from alignkit.aliases import suggest

    lines = []
    for e in err.errors():
        if ignore is not None and ignore(tuple(e["loc"])):
            continue
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + (suggest(cls, loc) if cls is not None else "")
        got = e.get("input")
        extra = f" (got {got!r})" if got is not None and e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        reason = field_reason(cls, tuple(e["loc"])) if cls is not None and e["type"] in RANGE_ERRORS else None
        lines.append(f"  {loc}: {msg}{extra}" + (f". {reason}" if reason else ""))
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(cls: Type[C], data: Dict[str, Any]) -> C:
    """Validate ``data`` as ``cls`` after mapping familiar names (TRL, transformers) to our fields."""
    # deferred: CLI start-up: the aliases table loads when a config is built, not for `--help`
    from alignkit.aliases import UnusableKey, normalize

    try:
        data = normalize(cls, data)
    except UnusableKey as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls)) from None


def load_config(cls: Type[C], path: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None,
                **flat: Any) -> C:
    """Build a config from an optional YAML file, dotted overrides, then keyword overrides."""
    data: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data.update(_normalized(cls, loaded, f"config file {p}"))
    if overrides:
        apply_overrides(data, list(overrides), cls)
    for k, v in flat.items():
        if v is None:
            continue
        _set_dotted(data, k, v, cls, k)
    return build_config(cls, data)


def _normalized(cls: type, data: Dict[str, Any], where: str) -> Dict[str, Any]:
    # deferred: CLI start-up: the aliases table loads when a config is built, not for `--help`
    from alignkit.aliases import UnusableKey, normalize

    try:
        return normalize(cls, data)
    except UnusableKey as e:
        raise ConfigError(f"{where}: {e}") from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def as_config(cls: Type[C], config: Union[C, Dict[str, Any], None], overrides: Dict[str, Any]) -> C:
    """The Python API's config: a model instance or dict, plus keyword overrides.

    Keywords use dots or double underscores for sections: ``optim__lr=1e-4`` or ``**{"optim.lr": 1e-4}``.
    """
    if config is None:
        data: Dict[str, Any] = {}
    elif isinstance(config, BaseModel):
        data = config.model_dump()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        raise TypeError(f"expected {cls.__name__} or dict, got {type(config).__name__}")
    data = _normalized(cls, data, "config")
    for k, v in overrides.items():
        _set_dotted(data, k.replace("__", "."), v, cls, k)
    return build_config(cls, data)
