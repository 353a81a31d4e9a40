"""metrics.jsonl (always), a rich progress bar with ETA and live metrics, optional TensorBoard/W&B."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict

SHOWN = ("train/loss", "rewards/accuracy", "rewards/margin", "rewards/mean", "kl/ref", "train/lr")


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"


class MetricLogger:
    def __init__(self, out: Path, cfg, is_main: bool):
        self.out, self.cfg, self.is_main = Path(out), cfg, is_main
        self.path = self.out / "metrics.jsonl"
        self.progress = None
        self.task_id = None
        self.trackers = []
        self._closers = []
        self.t_start = time.time()
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._open_trackers()

    def _open_trackers(self) -> None:
        name = self.cfg.log.run_name or self.out.name
        for kind in self.cfg.log.report_to:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                w = SummaryWriter(str(self.out / "tensorboard"))
                self.trackers.append(lambda step, m, w=w: [w.add_scalar(k, v, step) for k, v in m.items()])
                self._closers.append(w.flush)
            elif kind == "wandb":
                import wandb

                run = wandb.init(name=name, config=self.cfg.model_dump(mode="json"), dir=str(self.out))
                self.trackers.append(lambda step, m, run=run: run.log(m, step=step))

    def resumed(self, step: int) -> None:
        if self.is_main and self.path.exists():
            # drop lines past the checkpoint so the resumed run's curve does not double back
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
            self.path.write_text("".join(l + "\n" for l in kept))
        alerts = self.out / "alerts.jsonl"
        if self.is_main and alerts.exists():
            lines = [l for l in alerts.read_text().splitlines() if l.strip()]
            alerts.write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= step))

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        row = {"step": step, "time": round(time.time() - self.t_start, 3), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        for t in self.trackers:
            t(step, {k: v for k, v in clean.items() if v is not None and math.isfinite(v)})

    def alert(self, alert) -> None:
        """A diagnostics warning: to alerts.jsonl and, visibly, to the console."""
        if not self.is_main:
            return
        with (self.out / "alerts.jsonl").open("a") as f:
            f.write(json.dumps(alert.to_dict()) + "\n")
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]warning[/] step {alert.step} {alert.kind}: {alert.message}",
                                   highlight=False)

    def start(self, total: int, done: int) -> None:
        if not (self.is_main and self.cfg.log.progress):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[live]}"), transient=False)
        self.progress.start()
        self.task_id = self.progress.add_task(self.cfg.command, total=total, completed=done, live="")

    def advance(self, step: int, metrics: Dict[str, float]) -> None:
        if self.progress is None:
            return
        live = "  ".join(f"{k.split('/')[-1]}={_fmt(metrics[k])}" for k in SHOWN if k in metrics)
        self.progress.update(self.task_id, completed=step, live=live)

    def stop(self) -> None:
        for close in self._closers:
            close()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
