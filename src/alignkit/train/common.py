"""Run set-up and tear-down shared by every command: seeding, run directory, data report, saving."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

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
        save_model(trainer.unwrapped(), tokenizer, model_dir, lora_save=cfg.lora.save, state_dict=state_dict)
        summary = {"command": cfg.command, "steps": trainer.step, **summary}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        console().print(f"saved {model_dir}", style="green")
    acc.wait_for_everyone()
    return model_dir
