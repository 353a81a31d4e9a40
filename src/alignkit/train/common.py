"""Run set-up and tear-down shared by every command: seeding, run directory, data report, saving."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from alignkit.config import RunConfig, to_yaml
from alignkit.data import Prepared

log = logging.getLogger("alignkit")


def console():
    from rich.console import Console

    return Console(stderr=True)


def start_run(cfg: RunConfig):
    """Seed everything, create the accelerator and the run directory, write config.yaml."""
    from accelerate.utils import set_seed

    from alignkit.train.loop import make_accelerator

    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    out = Path(cfg.output)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    acc.wait_for_everyone()
    return acc


def report_data(prepared: Prepared, out: Path, is_main: bool) -> None:
    if not is_main:
        return
    c = console()
    for line in prepared.summary_lines():
        style = "yellow" if ("dropped" in line or "truncated" in line) else None
        c.print(line, style=style, markup=False, highlight=False)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "data_report.json").write_text(json.dumps([r.to_dict() for r in prepared.reports], indent=2))


def finish_run(trainer, tokenizer, cfg: RunConfig, summary: Dict[str, Any], save_kwargs: Optional[dict] = None) -> Path:
    """Save OUTPUT/model (safetensors + tokenizer) and OUTPUT/summary.json on the main process."""
    from alignkit.models.loading import save_model

    acc = trainer.acc
    out = Path(cfg.output)
    model_dir = out / "model"
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(trainer.model) if acc.distributed_type.value == "FSDP" else None
    if acc.is_main_process:
        with trainer.logger.phase("saving the model"):
            save_model(trainer.unwrapped(), tokenizer, model_dir, lora_save=cfg.lora.save, state_dict=state_dict)
        summary = {"command": cfg.command, "steps": trainer.step, **summary}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        console().print(f"saved {model_dir}", style="green")
        write_run_report(out)
    acc.wait_for_everyone()
    return model_dir


def write_run_report(out: Path) -> Optional[Path]:
    """OUTPUT/report.html; a failure here never fails the run that produced the data."""
    from alignkit.eval.report import write_report

    try:
        path = write_report(Path(out))
    except Exception as e:  # noqa: BLE001
        console().print(f"could not write report.html: {e}", style="yellow")
        return None
    console().print(f"report: {path}", style="green")
    return path


def write_samples(out: Path, tag: str, prompts, completions, rewards=None) -> None:
    """Append sample completions (tag "before"/"after"/...) to OUTPUT/samples.jsonl for the report."""
    path = Path(out) / "samples.jsonl"
    with path.open("a") as f:
        for i, (p, c) in enumerate(zip(prompts, completions)):
            row = {"tag": tag, "prompt": p, "completion": c}
            if rewards is not None:
                row["reward"] = float(rewards[i])
            f.write(json.dumps(row) + "\n")


def prompt_ids_of(item: Dict[str, Any]) -> List[int]:
    """The prompt part of an encoded item (SFT items: the tokens before the first label)."""
    if "prompt_ids" in item:
        return item["prompt_ids"]
    mask = item["loss_mask"]
    first = mask.index(1) if 1 in mask else len(mask)
    return item["input_ids"][:first]


def fit_and_finish(trainer, tokenizer, cfg, eval_items, *, samples: bool = True, **extra) -> Dict[str, Any]:
    """The shared end of every training command: held-out metrics before, report samples before and
    after (``samples``: the model generates), ``trainer.fit()``, then save and write the summary.
    Returns the summary: final metrics, ``KEY_before`` for the metrics before training, ``extra`` and
    ``model_dir``."""
    before = trainer.evaluate() if eval_items else {}
    if samples:
        sample_report_prompts(trainer, tokenizer, eval_items, "before")
    final = trainer.fit()
    if samples:
        sample_report_prompts(trainer, tokenizer, eval_items, "after")
    summary = {**final, **{f"{k}_before": v for k, v in before.items()}, **extra}
    summary["model_dir"] = str(finish_run(trainer, tokenizer, cfg, summary))
    return summary


def sample_report_prompts(trainer, tokenizer, items, tag: str) -> None:
    """Greedy answers to the first ``log.samples`` held-out prompts, appended to samples.jsonl."""
    cfg = trainer.cfg
    n = cfg.log.samples
    if not n or not items or not trainer.acc.is_main_process:
        return
    from alignkit.rollout.generate import GenerationConfig, generate

    seen, prompts = set(), []
    for it in items:
        p = tuple(prompt_ids_of(it))
        if p and p not in seen:
            seen.add(p)
            prompts.append(list(p))
        if len(prompts) == n:
            break
    if not prompts:
        return
    gen = GenerationConfig(max_new_tokens=cfg.log.sample_tokens, temperature=0.0, batch_size=n)
    with trainer.logger.phase(f"sampling {len(prompts)} report answers ({tag} training)"):
        ro = generate(trainer.unwrapped(), tokenizer, prompts, gen, compute_logprobs=False)
    texts = tokenizer.batch_decode(prompts, skip_special_tokens=False)
    write_samples(cfg.output, tag, texts, ro.texts)
