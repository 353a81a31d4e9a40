"""Familiar vocabulary: TRL / transformers / LLaMA-Factory argument names as aliases of our fields.

This module is the ONE table of aliases. :func:`normalize` rewrites a config mapping (YAML, dotted
overrides, keyword overrides, ``--trl_style value`` flags) into our own field names before pydantic
validates it, so a TRL user's ``dpo.yaml`` (``model_name_or_path``, ``dataset_name``, ``learning_rate``,
``per_device_train_batch_size``, ``beta``, ...) runs unchanged. It also accepts a scalar where a
one-item list is expected (``log.report_to=tensorboard``) and suggests a field for every unknown key
(:func:`suggest`).

An alias may name several targets: the first field the command's config has wins (``beta`` is
``dpo.beta`` for DPO and ``grpo.beta`` for GRPO). Keys of other frameworks that have no meaning here
(``remove_unused_columns``, ``logging_strategy``, ...) are accepted and reported as ignored, never
dropped silently.
"""

from __future__ import annotations

import difflib
import json
import logging
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from pydantic import BaseModel

log = logging.getLogger("alignkit")

SKIP = object()  # a converter's "nothing to set" (e.g. bf16: false keeps the default precision)


def _scheduler(v: Any) -> Any:
    """transformers' lr_scheduler_type names -> ours."""
    return {"constant_with_warmup": "constant", "cosine_with_min_lr": "cosine",
            "cosine_with_restarts": "cosine"}.get(v, v)


#: TRL loss_type names that differ from our registry's (sigmoid is the DPO loss; aot_pair is the
#: older name of aot_unpaired)
_TRL_LOSS_NAMES = {"sigmoid": "dpo", "aot_pair": "aot_unpaired"}


def _loss_type(v: Any) -> Any:
    """TRL's DPOConfig.loss_type names -> our preference-loss registry; a list (TRL's multi-loss,
    weighted by loss_weights) keeps its order and is split by DPOOptions."""
    if isinstance(v, (list, tuple)):
        names = [_TRL_LOSS_NAMES.get(x, x) for x in v]
        return names[0] if len(names) == 1 else names
    return _TRL_LOSS_NAMES.get(v, v)


def _report_to(v: Any) -> Any:
    """transformers' report_to: "none" means no tracker; "all" means every tracker we support."""
    if v in ("none", None, "None"):
        return []
    if v == "all":
        return ["tensorboard", "wandb"]
    if isinstance(v, list):
        return [x for x in v if x not in ("none", "None")]
    return v


def _target_modules(v: Any) -> Any:
    """LLaMA-Factory's lora_target: all / comma-separated names."""
    if v == "all":
        return "all-linear"
    if isinstance(v, str) and "," in v:
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


def _flag(value: str) -> Callable[[Any], Any]:
    """bf16: true -> train.precision=bf16; false keeps the default (nothing set)."""
    return lambda v: value if v else SKIP


def _lora_on(v: Any) -> Any:
    """use_peft: true / finetuning_type: lora -> lora.enabled."""
    if isinstance(v, str):
        return v.lower() == "lora"
    return bool(v)


@dataclass(frozen=True)
class Sets:
    """A converter's result that sets other fields than the alias's target (dotted -> value), e.g. TRL's
    ``loss_type: gspo`` on an online-RL command picks the preset."""

    values: Dict[str, Any]


class BadValue(ValueError):
    """A converter refuses a value; resolve_key names the key in the message."""


def _single(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v


#: TRL's GRPOConfig.loss_type -> our token aggregation (TRL's loss types differ only in how the per-token
#: losses are reduced). bnpo normalizes by the tokens of TRL's local batch; ours by the update's tokens
#: (TRL's dapo): the same on one process without accumulation.
TRL_RL_LOSS_TYPES = {"grpo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "sum_norm"}


def _any_loss_type(v: Any, target: str) -> Any:
    """loss_type: TRL's DPO loss names for the dpo family; for online RL TRL's GRPO loss types (an
    aggregation) or, beyond TRL's, the name of one of alignkit's presets (gspo, rloo, reinforce_pp, ppo)."""
    if target == "dpo.loss":
        return _loss_type(v)
    # deferred: torch stays out of this module's import
    from alignkit.train.rl_config import PRESET_NAMES

    v = _single(v)
    if v in TRL_RL_LOSS_TYPES:
        return TRL_RL_LOSS_TYPES[v]
    if v in PRESET_NAMES:
        return Sets({"preset": v})
    raise BadValue(f"unknown loss type {v!r} for online RL; TRL's: {', '.join(TRL_RL_LOSS_TYPES)}; "
                   f"alignkit's presets: {', '.join(p for p in PRESET_NAMES if p not in TRL_RL_LOSS_TYPES)}")


def _scale_rewards(v: Any, target: str) -> Any:
    """TRL's scale_rewards: group (true) divides a group's advantages by its std, batch by the whole
    batch's std, none (false) by nothing."""
    section = target.split(".")[0]
    if v in (True, "group", "true", "True"):
        return Sets({target: True, f"{section}.std_scope": "group"})
    if v in (False, "none", "false", "False", None):
        return False
    if v == "batch":
        return Sets({target: True, f"{section}.std_scope": "batch"})
    raise BadValue(f"expected group, batch, none, true or false, got {v!r}")


def _is_level(v: Any) -> Any:
    """TRL's importance_sampling_level: token (PPO/GRPO ratio per token) or sequence (GSPO)."""
    levels = {"token": "clipped_token", "sequence": "clipped_sequence"}
    if v not in levels:
        raise BadValue(f"expected token or sequence, got {v!r}")
    return levels[v]


def _top_k(v: Any) -> Any:
    return 0 if v is None else v


def _vllm_unavailable() -> Optional[str]:
    """Why vLLM cannot run here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'alignkit[vllm]')"
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and there is none"
    return None


def _use_vllm(v: Any) -> Any:
    """TRL's use_vllm: generation.engine=vllm where vLLM can run, else a warning and the fast engine."""
    if not v or v in ("false", "False"):
        return SKIP
    reason = _vllm_unavailable()
    if reason:
        log.warning("config: use_vllm=true ignored: %s; rollouts use alignkit's fast engine (generation.engine=fast)",
                    reason)
        return SKIP
    return "vllm"


def _vllm_mode(v: Any) -> Any:
    """TRL's vllm_mode: alignkit's vLLM engine always runs inside the training process (TRL's colocate)."""
    if v not in (None, "colocate"):
        log.warning("config: vllm_mode=%s ignored: alignkit runs vLLM inside the training process (TRL's colocate "
                    "mode); there is no separate vLLM server", v)
    return SKIP


def _reward_funcs(v: Any) -> Any:
    """TRL's reward_funcs: import paths (module:function, module.function, file.py:function) or, in the
    Python API, callables -> ``trl`` reward specs (TRL's calling contract); a directory is a reward model."""
    from pathlib import Path

    items = v if isinstance(v, (list, tuple)) else [v]
    out = []
    for item in items:
        if isinstance(item, str) and ":" not in item.split("/")[0] and Path(item).is_dir():
            out.append({"kind": "model", "arg": item})
        elif isinstance(item, str):
            out.append({"kind": "trl", "arg": item})
        else:
            out.append(item)  # a callable or a spec: RewardSpec.coerce takes it
    return out


def _rl(name: str) -> Tuple[str, ...]:
    """The field ``name`` of every online-RL command's stage section."""
    return (f"ppo.{name}", f"grpo.{name}", f"rloo.{name}", f"rl.{name}")


@dataclass(frozen=True)
class Alias:
    targets: Tuple[str, ...]  # dotted fields; the first one the config class has wins
    convert: Optional[Callable[[Any], Any]] = None
    index: Optional[int] = None  # the value is item `index` of the target list (adam_beta1 -> optim.betas[0])
    convert_for: Optional[Callable[[Any, str], Any]] = None  # a converter that depends on the chosen target


def _a(*targets: str, convert=None, index=None, convert_for=None) -> Alias:
    return Alias(tuple(targets), convert, index, convert_for)


# name in TRL / transformers.TrainingArguments / LLaMA-Factory -> our field(s)
ALIASES: Dict[str, Alias] = {
    # model
    "model_name_or_path": _a("model.name_or_path"),
    "model_revision": _a("model.revision"),
    "torch_dtype": _a("model.dtype"),
    "dtype": _a("model.dtype"),
    "trust_remote_code": _a("model.trust_remote_code"),
    "attn_implementation": _a("model.attn_implementation"),
    "gradient_checkpointing": _a("model.gradient_checkpointing"),
    "chat_template": _a("model.chat_template"),
    "chat_template_path": _a("model.chat_template"),
    "template": _a("model.chat_template"),  # LLaMA-Factory
    # data
    "dataset_name": _a("data.path"),
    "dataset": _a("data.path"),  # LLaMA-Factory (a file or hub name here, not a dataset_info.json key)
    "dataset_train_split": _a("data.split"),
    "dataset_test_split": _a("data.eval_split"),
    "dataset_config": _a("data.subset"),
    "dataset_config_name": _a("data.subset"),
    "max_length": _a("data.max_length"),
    "max_seq_length": _a("data.max_length"),
    "cutoff_len": _a("data.max_length"),  # LLaMA-Factory
    "max_prompt_length": _a("data.max_prompt_length"),
    "max_samples": _a("data.max_rows"),  # LLaMA-Factory
    "val_size": _a("data.eval_fraction"),  # LLaMA-Factory
    "dataset_streaming": _a("data.streaming"),  # TRL ScriptArguments
    "streaming": _a("data.streaming"),  # LLaMA-Factory
    "buffer_size": _a("data.shuffle_buffer"),  # LLaMA-Factory: the streaming shuffle buffer
    "dataset_num_proc": _a("data.num_proc"),
    "preprocessing_num_workers": _a("data.num_proc"),
    # batching and steps
    # online RL: TRL's per_device_train_batch_size counts completions (the other commands: rows)
    "per_device_train_batch_size": _a("completions_per_device", "train.batch_size"),
    "gradient_accumulation_steps": _a("train.grad_accum"),
    "num_train_epochs": _a("train.epochs"),
    "max_steps": _a("train.max_steps"),
    "seed": _a("train.seed"),
    "bf16": _a("train.precision", convert=_flag("bf16")),
    "fp16": _a("train.precision", convert=_flag("fp16")),
    # optimizer
    "learning_rate": _a("optim.lr"),
    "weight_decay": _a("optim.weight_decay"),
    "adam_beta1": _a("optim.betas", index=0),
    "adam_beta2": _a("optim.betas", index=1),
    "adam_epsilon": _a("optim.eps"),
    "lr_scheduler_type": _a("optim.scheduler", convert=_scheduler),
    "warmup_ratio": _a("optim.warmup_ratio"),
    "warmup_steps": _a("optim.warmup_steps"),
    "max_grad_norm": _a("optim.max_grad_norm"),
    # logging and checkpoints
    "output_dir": _a("output"),
    "logging_steps": _a("log.every"),
    "eval_steps": _a("log.eval_every"),
    "save_steps": _a("log.save_every"),
    "save_total_limit": _a("log.save_total_limit"),
    "report_to": _a("log.report_to", convert=_report_to),
    "run_name": _a("log.run_name"),
    "disable_tqdm": _a("log.progress", convert=lambda v: not v),
    "resume_from_checkpoint": _a("resume"),
    # hub
    "push_to_hub": _a("hub.push"),
    "hub_model_id": _a("hub.model_id"),
    "hub_private_repo": _a("hub.private"),
    # LoRA (TRL ModelConfig, LLaMA-Factory)
    "use_peft": _a("lora.enabled", convert=_lora_on),
    "finetuning_type": _a("lora.enabled", convert=_lora_on),
    "lora_r": _a("lora.r"),
    "lora_rank": _a("lora.r"),
    "lora_alpha": _a("lora.alpha"),
    "lora_dropout": _a("lora.dropout"),
    "lora_target_modules": _a("lora.target_modules", convert=_target_modules),
    "lora_target": _a("lora.target_modules", convert=_target_modules),
    # preference / RL losses
    "beta": _a("dpo.beta", "grpo.kl_coef", "ppo.kl_coef", "rloo.kl_coef", "rl.kl_coef"),
    "pref_beta": _a("dpo.beta"),
    "loss_type": _a("dpo.loss", *_rl("aggregation"), convert_for=_any_loss_type),
    "pref_loss": _a("dpo.loss", convert=_loss_type),
    "loss_weights": _a("dpo.loss_weights"),
    "discopop_tau": _a("dpo.hparams", convert=lambda v: {"discopop_tau": v}),
    "label_smoothing": _a("dpo.label_smoothing"),
    "simpo_gamma": _a("dpo.gamma"),
    "rpo_alpha": _a("dpo.sft_weight"),
    "ref_model_name_or_path": _a("dpo.ref_model"),
    "precompute_ref_log_probs": _a("dpo.reference", convert=lambda v: "precomputed" if v else SKIP),
    "desirable_weight": _a("dpo.desirable_weight"),
    "undesirable_weight": _a("dpo.undesirable_weight"),
    "num_generations": _a("grpo.num_generations", "rloo.num_generations", "rl.num_generations"),
    "kl_coef": _a("ppo.kl_coef", "rloo.kl_coef", "grpo.kl_coef", "rl.kl_coef"),
    "cliprange": _a("ppo.clip_eps"),
    "vf_coef": _a("ppo.vf_coef"),
    "num_ppo_epochs": _a("ppo.epochs"),
    "num_mini_batches": _a("ppo.num_minibatches", "grpo.num_minibatches", "rloo.num_minibatches",
                           "rl.num_minibatches"),
    "reward_model_path": _a("rewards", convert=lambda v: [f"model:{v}"] if isinstance(v, str) else v),
    # TRL's GRPOConfig / GRPOTrainer (docs/training.md, "Coming from TRL": the GRPO key table)
    "reward_funcs": _a("rewards", convert=_reward_funcs),
    "max_completion_length": _a("generation.max_new_tokens"),
    "temperature": _a("generation.temperature"),
    "top_p": _a("generation.top_p"),
    "top_k": _a("generation.top_k", convert=_top_k),
    "epsilon": _a(*_rl("clip_eps")),
    "epsilon_high": _a(*_rl("clip_eps_high")),
    "scale_rewards": _a(*_rl("scale_by_std"), convert_for=_scale_rewards),
    "mask_truncated_completions": _a(*_rl("mask_truncated_completions")),
    "importance_sampling_level": _a(*_rl("policy_loss"), convert=_is_level),
    "num_iterations": _a(*_rl("epochs")),
    "use_vllm": _a("generation.engine", convert=_use_vllm),
    "vllm_mode": _a("generation.engine", convert=_vllm_mode),
    # DPO recipes / peft (h34b)
    "gradient_checkpointing_kwargs": _a("model.gradient_checkpointing_kwargs"),
    "use_rslora": _a("lora.use_rslora"),
    "use_dora": _a("lora.use_dora"),
    "lora_task_type": _a("lora.task_type"),
    "lora_target_parameters": _a("lora.target_parameters", convert=lambda v: [v] if isinstance(v, str) else v),
    "load_in_4bit": _a("model.load_in_4bit"),
    "load_in_8bit": _a("model.load_in_8bit"),
    "bnb_4bit_quant_type": _a("model.bnb_4bit_quant_type"),
    "use_bnb_nested_quant": _a("model.bnb_4bit_use_double_quant"),
    "bnb_4bit_use_double_quant": _a("model.bnb_4bit_use_double_quant"),
    "bnb_4bit_compute_dtype": _a("model.bnb_4bit_compute_dtype"),
    "eval_strategy": _a("log.evaluate", convert=lambda v: _eval_strategy("eval_strategy", v)),
    "evaluation_strategy": _a("log.evaluate", convert=lambda v: _eval_strategy("evaluation_strategy", v)),
}

#: dotted spellings of fields that cannot be nested where they read naturally (``rewards`` is a list)
DOTTED_ALIASES: Dict[str, str] = {"rewards.timeout_s": "reward_timeout_s", "reward.timeout_s": "reward_timeout_s"}

# DPO recipes / peft (h34b): a scalar given where we have a section sets one field of it
# (transformers' ``optim: adamw_torch`` names the optimizer; our ``optim`` is the optimizer section)
SECTION_SCALARS: Dict[str, str] = {"optim": "optim.optimizer"}


def _eval_strategy(key: str, v: Any) -> Any:
    """transformers' eval_strategy: no -> log.evaluate=false (YAML reads a bare no as false); steps and
    epoch keep evaluation on, at log.eval_every (eval_steps) and at the end, and are reported."""
    if v is False or v is None or str(v).strip().lower() in ("no", "none", "false"):
        return False
    log.warning("config: %s=%r ignored: %s", key, v,
                "evaluation runs before and after training and every log.eval_every (eval_steps) steps")
    return SKIP

# keys of other frameworks that have no meaning here: accepted, reported as ignored
IGNORED: Dict[str, str] = {
    "remove_unused_columns": "alignkit keeps the fields it uses and reports the rest",
    "save_strategy": "set log.save_every (save_steps) to write checkpoints",
    "logging_strategy": "metrics are logged every log.every (logging_steps) steps",
    "logging_first_step": "the first step is always logged",
    "overwrite_output_dir": "a run writes into its output directory; resume with --resume",
    "do_train": "every command trains",
    "do_eval": "evaluation runs when there is held-out data",
    "plot_loss": "every run writes report.html with its curves",
    "stage": "the command name selects the method",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "dataloader_num_workers": "data is tokenized up front (data.num_proc)",
    "ddp_timeout": "set through accelerate's launcher",
    "logging_dir": "trackers log under the output directory",
    "hub_token": "tokens never go into configs: use HF_TOKEN or `hf auth login`",
    "use_liger_kernel": "not supported (no liger-kernel integration)",
    "num_completions_to_print": "log_completions writes every completion of a logged step to completions.jsonl",
    "wandb_log_unique_prompts": "log_completions logs every row of the step's rollout",
    "vllm_gpu_memory_utilization": "the vLLM engine takes the memory it needs beside the policy",
    "vllm_tensor_parallel_size": "the vLLM engine runs on the training process's GPU",
    "vllm_server_host": "there is no separate vLLM server (vllm_mode colocate)",
    "vllm_server_port": "there is no separate vLLM server (vllm_mode colocate)",
    "ds3_gather_for_generation": "DeepSpeed ZeRO-3 is not tested here",
}


# ------------------------------------------------------------------ the config class's fields

def _field_type(cls: type, dotted: str) -> Tuple[bool, Any]:
    """(exists, annotation) of a dotted field of a pydantic model class."""
    node: Any = cls
    ann: Any = None
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return False, None
        ann = node.model_fields[part].annotation
        node = _model_of(ann)
    return True, ann


def _model_of(ann: Any) -> Any:
    """The pydantic model inside an annotation (Optional[Section] -> Section), else the annotation."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return ann


def _is_plain_list(ann: Any) -> bool:
    """List[...] or Optional[List[...]], but not Union[str, List[str]] (a scalar is valid there)."""
    if typing.get_origin(ann) in (list, List):
        return True
    if typing.get_origin(ann) is typing.Union:
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return len(inner) == 1 and typing.get_origin(inner[0]) in (list, List)
    return False


def leaf_names(cls: type, prefix: str = "") -> List[str]:
    """Every dotted field name of ``cls`` (sections included)."""
    out = []
    for name, f in cls.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        sub = _model_of(f.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out.extend(leaf_names(sub, key + "."))
    return out


# ------------------------------------------------------------------ resolving one key

def resolve_key(cls: type, dotted: str, value: Any) -> List[Tuple[str, Any]]:
    """(our dotted field, value) pairs for one key as written by the user; [] when it is ignored.

    Our own names pass through unchanged (pydantic reports them if unknown). ``optim.learning_rate``
    works like ``learning_rate`` when the alias's target lies in that section.
    """
    if dotted in SECTION_SCALARS and not isinstance(value, dict):  # optim: adamw_torch
        return [(SECTION_SCALARS[dotted], value)]
    if _field_type(cls, dotted)[0]:
        return [(dotted, value)]
    if dotted in DOTTED_ALIASES and _field_type(cls, DOTTED_ALIASES[dotted])[0]:
        return [(DOTTED_ALIASES[dotted], value)]
    section, _, name = dotted.rpartition(".")
    alias = ALIASES.get(name)
    if alias is not None:
        targets = [t for t in alias.targets if not section or t.startswith(section + ".") or t == section]
        for target in targets:
            if _field_type(cls, target)[0]:
                try:
                    new = (alias.convert_for(value, target) if alias.convert_for else
                           alias.convert(value) if alias.convert else value)
                except BadValue as e:
                    raise UnusableKey(dotted, f"{dotted}={value!r}: {e}") from None
                if new is SKIP:
                    return []
                if isinstance(new, Sets):
                    return list(new.values.items())
                if alias.index is not None:
                    return [(f"{target}[{alias.index}]", new)]
                return [(target, new)]
        if targets:
            raise UnusableKey(dotted, f"{dotted!r} (alias of {' / '.join(alias.targets)}) has no meaning for "
                                      f"this command ({_command_name(cls)})")
    if not section and name in IGNORED:
        log.warning("config: %s=%r ignored: %s", name, value, IGNORED[name])
        return []
    return [(dotted, value)]


def _command_name(cls: type) -> str:
    f = cls.model_fields.get("command")
    return str(f.default) if f is not None and f.default is not None else cls.__name__


class UnusableKey(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ------------------------------------------------------------------ whole mappings

def set_dotted(data: Dict[str, Any], dotted: str, value: Any, cls: Optional[type] = None) -> Any:
    """Set ``a.b.c`` (or ``a.b[i]``, one item of a list field) in a nested dict; returns the value set."""
    index = None
    if dotted.endswith("]"):
        dotted, _, idx = dotted[:-1].rpartition("[")
        index = int(idx)
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UnusableKey(dotted, f"{p!r} is not a section")
        node = nxt
    key = parts[-1]
    if index is not None:  # one item of a list field (adam_beta1 -> optim.betas[0])
        current = node.get(key)
        if not isinstance(current, list):
            current = list((_default_of(cls, dotted) if cls is not None else None) or [])
        current = list(current)
        while len(current) <= index:
            current.append(None)
        current[index] = value
        value = current
    node[key] = value
    return value


def _default_of(cls: type, dotted: str) -> Any:
    node: Any = cls
    f = None
    for part in dotted.split("."):
        f = node.model_fields[part]
        node = _model_of(f.annotation)
    return None if f is None or f.is_required() else f.get_default(call_default_factory=True)


def normalize(cls: type, data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``data`` with aliases replaced by our field names and scalars wrapped where a list is
    expected. Raises :class:`UnusableKey` for an alias this command cannot use or two keys that set
    one field to different values."""
    out: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    for key, value in data.items():
        sub = _model_of(_field_type(cls, key)[1]) if isinstance(key, str) else None
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            # a section: resolve its keys one by one (optim: {learning_rate: ...})
            for k, v in value.items():
                for target, val in resolve_key(cls, f"{key}.{k}", v):
                    _set_once(out, target, val, cls, f"{key}.{k}", seen)
            out.setdefault(key, {})
            continue
        for target, val in resolve_key(cls, str(key), value):
            _set_once(out, target, val, cls, str(key), seen)
    _wrap_scalars(cls, out)
    return out


def _set_once(out: Dict[str, Any], target: str, value: Any, cls: type, origin: str, seen: Dict[str, Any]) -> None:
    """Within one mapping, two spellings of one field must agree (learning_rate and optim.lr)."""
    if target in seen and seen[target][1] != value:
        raise UnusableKey(origin, f"{origin!r} and {seen[target][0]!r} both set {target} (to different values)")
    seen[target] = (origin, value)
    set_dotted(out, target, value, cls)


def _wrap_scalars(cls: type, data: Dict[str, Any]) -> None:
    """``report_to: tensorboard`` -> ``[tensorboard]`` wherever the field is a plain list."""
    for key, value in list(data.items()):
        f = cls.model_fields.get(key) if isinstance(key, str) else None
        if f is None:
            continue
        sub = _model_of(f.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if isinstance(value, dict):
                _wrap_scalars(sub, value)
        elif _is_plain_list(f.annotation) and isinstance(value, (str, int, float, bool)):
            data[key] = [value]


# ------------------------------------------------------------------ did you mean

def suggest(cls: type, dotted: str) -> str:
    """' (did you mean X?)' for an unknown dotted key: the closest field, alias or section member;
    without a close one, the fields of that section."""
    section, _, name = dotted.rpartition(".")
    names = leaf_names(cls)
    alias_hits = difflib.get_close_matches(name, list(ALIASES), n=1, cutoff=0.75)
    local = [n.rpartition(".")[2] for n in names if n.rpartition(".")[0] == section]
    exact = [n for n in names if n.rpartition(".")[2] == name and n != dotted]
    if exact:  # the same name in another section: lr -> optim.lr
        return " (did you mean " + " or ".join(exact[:3]) + "?)"
    hits = difflib.get_close_matches(name, local, n=2, cutoff=0.6)
    if hits:
        return " (did you mean " + " or ".join(f"{section + '.' if section else ''}{h}" for h in hits) + "?)"
    # a close name in another section: batchsize -> train.batch_size
    anywhere = [n for n in names if difflib.get_close_matches(name, [n.rpartition(".")[2]], n=1, cutoff=0.8)]
    if alias_hits:
        a = ALIASES[alias_hits[0]]
        target = next((t for t in a.targets if _field_type(cls, t)[0]), a.targets[0])
        return f" (did you mean {target}, also spelled {alias_hits[0]}?)"
    if anywhere:
        return " (did you mean " + " or ".join(anywhere[:3]) + "?)"
    if local:
        return f" (fields of {section or 'the top level'}: {', '.join(sorted(local))})"
    return ""


#: TRL flags that take several values (``nargs="+"``)
LIST_FLAGS = frozenset({"reward_funcs", "reward_weights", "report_to", "lora_target_modules"})


def cli_tokens_to_overrides(tokens: List[str]) -> List[str]:
    """TRL-style flags among the extra arguments -> ``key=value`` overrides.

    ``--learning_rate 5e-7`` and ``--learning-rate=5e-7`` -> ``learning_rate=5e-7``; a flag followed by
    another flag or nothing is ``true`` (``--gradient_checkpointing``); ``--no_KEY`` is ``KEY=false``.
    Other tokens pass through unchanged.
    """
    out: List[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and len(tok) > 2:
            body = tok[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and "=" not in tokens[i + 1]:
                key, value = body, tokens[i + 1]
                i += 1
                if key.replace("-", "_") in LIST_FLAGS:  # TRL's nargs="+": --reward_funcs a.f b.g
                    values = [value]
                    while i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and "=" not in tokens[i + 1]:
                        values.append(tokens[i + 1])
                        i += 1
                    if len(values) > 1:
                        value = json.dumps(values)
            elif body.startswith("no_") or body.startswith("no-"):
                key, value = body[3:], "false"
            else:
                key, value = body, "true"
            out.append(f"{key.replace('-', '_')}={value}")
        else:
            out.append(tok)
        i += 1
    return out
