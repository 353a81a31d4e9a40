"""Load causal LMs, reward models and tokenizers from an HF id, a local directory or the default."""

from __future__ import annotations

import functools
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from alignkit import hardware
from alignkit.config import ConfigError, LoraConfig, ModelConfig
from alignkit.data.templates import resolve_chat_template
from alignkit.models.default import resolve_model_path
from alignkit.ops import attention
from alignkit.ops.wrappers import unwrap

log = logging.getLogger("alignkit")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_device(device: Optional[str] = None) -> torch.device:
    """The device a single-process job (sampling, scoring, judging, evaluation) runs its models on:
    ``device`` when given, else the current CUDA GPU when there is one, else the CPU. The one place
    that choice is written; training places models through accelerate instead."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def native_bf16(device_type: Optional[str] = None) -> bool:
    """Whether bf16 matrix products run faster than fp32 on ``device_type`` (default: the device runs
    use, CUDA when there is one), which is what ``train.precision=auto``, ``model.dtype=auto`` and
    ``generation.dtype=auto`` pick bf16 on.

    - A CUDA GPU: when it supports bf16.
    - A CPU with AMX tiles (Intel Sapphire Rapids and later): yes; oneDNN ran bf16 products ~6x faster
      than fp32 on the 2-core development VM (2.0 vs 0.33 TFLOP/s).
    - A CPU with AVX512-BF16 but no AMX: measured, because the flag does not settle it. On 2 Zen 4 cores
      bf16 products reached ~420 GFLOP/s; on 2 Xeon cores that expose AVX512-BF16 without AMX they ran
      2x *slower* than fp32 (164 vs 329 GFLOP/s), so bf16 autocast there halved training speed.
      :func:`cpu_bf16_speedup` times one product of a training shape both ways, once per process.
    - Any other CPU (AVX2 or AVX512 without bf16, aarch64): no (bf16 is emulated).

    The CPU class is :func:`alignkit.hardware.cpu_isa`: the chip's flags limited by the process's
    settings (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``ALIGNKIT_CPU_ISA``) and by whether
    oneDNN really has bf16 kernels here, so ``ALIGNKIT_CPU_ISA=avx2`` forces the fp32 fallback anywhere."""
    device_type = device_type or best_device().type
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    isa = hardware.cpu_isa()
    if isa == "amx":
        return True
    return isa == "avx512_bf16" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


BF16_MIN_SPEEDUP = 1.2
"""bf16 must beat fp32 by this factor to be chosen: below it the speed gain does not pay for bf16's
coarser products."""


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(rows: int = 256, n_in: int = 1024, n_out: int = 1024, repeats: int = 9) -> float:
    """fp32 time over bf16 time of one ``(rows, n_in) x (n_in, n_out)`` linear layer on this CPU with
    the current thread count (~20 ms at the default shape, a micro-batch's worth of rows through a
    1024-wide layer). Cached per process: it is a fact about the machine, not a setting. > 1 means bf16
    is faster.

    Each dtype is warmed up once (oneDNN builds its kernel on the first call), then the two products
    are timed in turn ``repeats`` times and the best time of each is kept. Taking turns matters on a
    shared machine: timing all fp32 products first and all bf16 products after let a burst of load from
    other processes land on one dtype only, and a Zen 4 whose bf16 runs 2x faster was then measured at
    under 1.2x and trained a whole demo in fp32."""
    import time

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=gen)
    w = torch.randn(n_out, n_in, generator=gen)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.to(torch.bfloat16), w.to(torch.bfloat16))}
    best = {dt: float("inf") for dt in pairs}
    for a, b in pairs.values():
        torch.nn.functional.linear(a, b)  # warm-up
    for _ in range(repeats):
        for dt, (a, b) in pairs.items():
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    speedup = best[torch.float32] / max(best[torch.bfloat16], 1e-9)
    log.debug("bf16 linear %dx%dx%d: %.2fx fp32's speed on this CPU", rows, n_in, n_out, speedup)
    return speedup


def load_frozen(load: Callable[[str], torch.nn.Module], dtype: str, device: torch.device):
    """``(model, autocast context)`` of a frozen scoring model (an eval reference, a reward scorer);
    ``load(dtype)`` loads it in the dtype given. With ``dtype=auto`` where bf16 is native it is loaded in
    fp32, frozen, its linear layers stored in bf16 (:func:`precast_frozen_linears`), and it runs under
    bf16 autocast, as a training run's frozen reference does: the residual stream stays fp32, closer to
    fp32 than a pure-bf16 copy and exact enough for the layout probe (SmolLM2 in pure bf16 fails it).
    Otherwise it is loaded in ``dtype`` and runs without autocast."""
    import contextlib
    from types import SimpleNamespace

    if dtype != "auto" or not native_bf16(device.type):
        return load(dtype), contextlib.nullcontext()
    model = load("float32")
    for q in model.parameters():
        q.requires_grad_(False)
    precast_frozen_linears(model, SimpleNamespace(mixed_precision="bf16"))
    return model, torch.autocast(device.type, dtype=torch.bfloat16)


def precast_frozen_linears(model, accelerator) -> int:
    """Store a frozen model's linear weights in the accelerator's autocast dtype once, instead of
    autocast casting each of them again on every forward (a reference model's whole weight set per
    micro-batch). Autocast rounds an fp32 weight to bf16/fp16 the same way at every call, so the outputs
    are bit-identical (tests/test_preference_training.py); embeddings, norms and the output head keep
    their dtype (a tied head shares the embedding's weight), so the residual stream stays as it was.
    Only parameters that do not require grad are touched. Returns the number of layers cast (0 without
    mixed precision)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(getattr(accelerator, "mixed_precision", "no")))
    if dtype is None:
        return 0
    inner = unwrap(model)
    keep = {id(m.weight) for m in inner.modules() if isinstance(m, torch.nn.Embedding)}
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        keep.add(id(head.weight))
    n = 0
    for m in inner.modules():
        if not isinstance(m, torch.nn.Linear) or id(m.weight) in keep:
            continue
        params = [q for q in (m.weight, m.bias) if q is not None]
        if any(q.requires_grad or q.dtype != torch.float32 for q in params):
            continue
        for q in params:
            q.data = q.data.to(dtype)
        n += 1
    return n


def resolve_dtype(name: str, device: Optional[torch.device] = None, trainable: bool = False) -> torch.dtype:
    """auto: float32 for weights we train (bf16 autocast does the fast math where it is native, the
    optimizer updates fp32 master weights, so small updates are not rounded away), bfloat16 for frozen
    models wherever bf16 is native (:func:`native_bf16`: a GPU, or a CPU with AMX/AVX512-BF16)."""
    if name != "auto":
        return _DTYPES[name]
    if trainable:
        return torch.float32
    return torch.bfloat16 if native_bf16(device.type if device is not None else None) else torch.float32


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    """Tokenizer with a pad token (the EOS token when the model has none)."""
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    with _one_line_hub_errors(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    template = resolve_chat_template(cfg.chat_template)
    if template is not None:  # saved with the tokenizer, so OUTPUT/model chats the same way
        tok.chat_template = template
    tok.padding_side = padding_side
    return tok


@contextmanager
def _one_line_hub_errors(path: str):
    """A Hub id that does not exist (or is gated) raises transformers' multi-line OSError: make it one
    line naming the model (FileNotFoundError, which the CLI prints without a traceback)."""
    try:
        yield
    except OSError as e:
        if Path(path).exists() or isinstance(e, FileNotFoundError):
            raise
        first = " ".join(str(e).split())[:300]
        raise FileNotFoundError(f"model {path}: could not be loaded from the Hugging Face Hub ({first})") from None


def _common_kwargs(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
              revision=cfg.revision)
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    return kw


def load_causal_lm(cfg: ModelConfig, dtype: Optional[torch.dtype] = None, trainable: bool = True):
    """A causal LM; ``trainable=False`` (references, scorers) lets dtype=auto pick bf16 on a GPU."""
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name_or_path)
    dtype = dtype or resolve_dtype(cfg.dtype, trainable=trainable)
    with _one_line_hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, **_common_kwargs(cfg, dtype), **quantization_kwargs(cfg))
    attention.use_for(model)  # CPU: sdpa whose training pass runs in fp32 (ops/attention.py)
    prepare_for_training(model, cfg, trainable)
    return model


def checkpointing_kwargs(cfg: ModelConfig) -> dict:
    """transformers' gradient_checkpointing_kwargs: ``model.gradient_checkpointing_kwargs`` over our
    default (non-reentrant checkpoints, which work with frozen inputs and LoRA)."""
    return {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {})}


def prepare_for_training(model, cfg: ModelConfig, trainable: bool = True) -> None:
    """Gradient checkpointing (with ``model.gradient_checkpointing_kwargs``) and, for a quantized
    (QLoRA) base, peft's k-bit preparation: norms in fp32, inputs that require grad."""
    if trainable and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        # deferred: peft loads only when LoRA is used
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
    if cfg.gradient_checkpointing:
        model.config.use_cache = False


def quantization_kwargs(cfg: ModelConfig) -> dict:
    """``quantization_config`` for ``model.load_in_4bit`` / ``load_in_8bit`` (bitsandbytes, an optional
    extra imported only here); {} otherwise. QLoRA (Dettmers et al. 2023): a frozen 4-bit NormalFloat
    base (``bnb_4bit_quant_type=nf4``), optionally with its quantization constants quantized again
    (``bnb_4bit_use_double_quant``), and LoRA adapters trained in higher precision on top."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit: choose one")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        raise ConfigError(f"model.{flag} (QLoRA) needs bitsandbytes, an optional extra that is not installed: "
                          f"pip install 'alignkit[qlora]' (or pip install bitsandbytes), or drop {flag}")
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute = cfg.bnb_4bit_compute_dtype
    compute_dtype = _DTYPES[compute] if compute else (torch.bfloat16 if native_bf16() else torch.float32)
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute_dtype)}


def load_reward_model(cfg: ModelConfig, pad_token_id: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    """A causal-LM backbone with a scalar head (``num_labels=1``); a fresh head is zero-initialised."""
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name_or_path)
    dtype = dtype or resolve_dtype(cfg.dtype, trainable=True)
    # deferred: transformers is slow to import; it loads when a model does
    import transformers

    # a causal-LM checkpoint has no score head: silence the "newly initialized" warning, we init it.
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_common_kwargs(cfg, dtype),
                                                                   **quantization_kwargs(cfg))
    finally:
        transformers.logging.set_verbosity(prev)
    attention.use_for(model)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    archs = getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code), "architectures", None) or []
    head = getattr(model, "score", None)
    if head is not None and not any(a.endswith("ForSequenceClassification") for a in archs):
        # a fresh head starts at zero, so the initial rewards are 0 for every response, not noise
        torch.nn.init.zeros_(head.weight)
    prepare_for_training(model, cfg)
    return model


def apply_lora(model, cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft). For SEQ_CLS the score head stays fully trainable.

    ``lora.use_rslora``: scale alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, eq. 3); ``lora.use_dora``:
    DoRA (Liu et al. 2024, eq. 5: W = m * (W0 + BA) / ||W0 + BA||_c); ``lora.target_parameters``: LoRA
    on parameters that are not Linear modules (peft's target_parameters); ``lora.task_type`` overrides
    the command's peft task type."""
    # deferred: peft loads only when LoRA is used
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = cfg.target_modules
    if cfg.target_parameters and targets == "all-linear":
        targets = []  # parameters only, as peft's target_parameters alone would
    check_lora_targets(model, targets)
    check_lora_parameters(model, cfg.target_parameters)
    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, task_type=cfg.task_type or task_type, bias="none",
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                          target_parameters=list(cfg.target_parameters) if cfg.target_parameters else None)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(model, flag, False):  # checkpointed layers need inputs that require grad
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` property in
        # PeftModel.__init__, a FutureWarning on every LoRA run that no setting of ours avoids; the value
        # it reads is right, so this one message is silenced for this call only.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, pcfg)


def check_lora_targets(model, targets) -> None:
    """Every name in ``lora.target_modules`` must name modules of ``model`` (peft matches the end of a
    module's dotted name); a missing one is a one-line :class:`~alignkit.config.ConfigError` listing
    the model's linear layers. A single string other than all-linear is a peft regex: left to peft."""
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                         or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not found in the model (its linear layers: "
                          f"{', '.join(linear)}); use names from that list or lora.target_modules=all-linear")


def check_lora_parameters(model, names) -> None:
    """Every name in ``lora.target_parameters`` must end a parameter name of ``model``; a missing one is a
    one-line ConfigError listing the model's parameter names (without layer numbers)."""
    if not names:
        return
    params = [n for n, _ in model.named_parameters()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in params)]
    if missing:
        import re

        kinds = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in params})
        raise ConfigError(f"lora.target_parameters: {', '.join(missing)} not found in the model (its parameters: "
                          f"{', '.join(kinds[:20])}{' ...' if len(kinds) > 20 else ''})")


def is_peft(model) -> bool:
    try:
        # deferred: peft loads only when LoRA is used
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def checkpoint_dtype(cfg: ModelConfig) -> Optional[torch.dtype]:
    """The dtype a model is saved in: ``model.dtype`` when set, else the base checkpoint's own dtype
    (a bf16 base stays bf16 after fp32 training or a LoRA merge); None when the checkpoint names none."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)
    except (OSError, ValueError):
        return None
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(dt, str):
        dt = _DTYPES.get(dt)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def save_model(model, tokenizer, out_dir: Path, lora_save: str = "merged", state_dict=None,
               dtype: Optional[torch.dtype] = None, base_model: Optional[str] = None) -> Path:
    """Save weights (safetensors) and tokenizer so ``from_pretrained(out_dir)`` loads them.

    ``dtype``: full weights are cast to it (the base checkpoint's dtype, :func:`checkpoint_dtype`);
    ``base_model``: what a PEFT adapter records as its base (the hub id, not a local cache path).
    An adapter-mode reward model also writes ``reward_config.json``: the sequence-classification config
    (num_labels=1, the pad id its tokenizer pads with) to load the base with.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def cast(m):
        return m.to(dtype) if dtype is not None and m.dtype != dtype else m

    if state_dict is not None and dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if is_peft(model):
        if lora_save == "merged":
            if state_dict is not None:  # gathered weights of a sharded run
                model.load_state_dict(state_dict, strict=False)
            cast(model.merge_and_unload()).save_pretrained(out_dir, safe_serialization=True)
        else:
            if base_model:
                for pc in model.peft_config.values():
                    pc.base_model_name_or_path = base_model
            model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
            base = model.get_base_model()
            if getattr(base.config, "num_labels", None) == 1 and type(base).__name__.endswith("ForSequenceClassification"):
                conf = {**base.config.to_dict(), "num_labels": 1}
                if tokenizer is not None:
                    conf["pad_token_id"] = tokenizer.pad_token_id
                (out_dir / "reward_config.json").write_text(json.dumps(conf, indent=2, default=str))
    else:
        cast(model).save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
