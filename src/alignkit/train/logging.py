"""Run logs: ``metrics.jsonl`` (always), the console, and optional trackers.

Console. In a terminal (or a notebook) a progress bar with ETA sits on one line and the live metrics on
the line below it, so the layout fits 80 columns without cutting either. When stdout is not a terminal
(a file, a pipe, a batch system's log) each logged step is one plain, greppable line instead::

    [sft] step 12/40 loss=0.6931 acc=0.5000 lr=1.00e-05 | 0.41 s/step | ETA 0:00:11

Phases that take more than a moment (evaluation, sampling, reference precompute, saving) show a spinner
with the elapsed time in a terminal, and a start and an end line otherwise (:func:`phase`). Only the
main process prints, and it prints the numbers the loop has already all-reduced over processes.

Trackers (``log.report_to``): ``tensorboard`` (scalars, plus the hyper-parameters and final metrics
in the HPARAMS tab), ``wandb`` and ``trackio`` (Hugging Face's local, wandb-compatible tracker). Each
training call opens its own tracker run and finishes it when training ends, so a second call in one
process starts a new run. A tracker whose package is missing stops the run before training with a
one-line install hint (:class:`MissingPackage`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

# (metric key, short name) shown live; the first ones that were logged, in this order
SHOWN = (("train/loss", "loss"), ("rewards/accuracy", "acc"), ("rewards/margin", "margin"),
         ("rewards/mean", "reward"), ("kl/ref", "kl"), ("train/lr", "lr"))
EVAL_SHOWN = (("eval/loss", "loss"), ("eval/accuracy", "acc"), ("eval/rewards/margin", "margin"),
              ("eval/margin", "margin"), ("eval/rewards/mean", "reward"), ("eval/kl/ref", "kl"))

# tracker -> (importable module, pip requirement)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "trackio": ("trackio", "trackio")}


class MissingPackage(RuntimeError):
    """An optional package is not installed; the message is the one-line install hint."""


def require(module: str, requirement: str, what: str):
    """Import ``module`` or raise :class:`MissingPackage` with a one-line ``pip install`` hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{what} needs the '{requirement}' package, which is not installed: "
                             f"pip install {requirement}") from None


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (``RANK`` unset: a single process)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def peak_memory_gb(device) -> float:
    """Peak memory so far, in GiB: the accelerator's peak allocation on CUDA, the process's peak resident
    set (ru_maxrss) elsewhere. Logged as ``perf/peak_mem_gb`` beside ``perf/examples_per_s``."""
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20  # bytes on macOS, KiB on Linux


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"


def metrics_text(metrics: Dict[str, float], shown=SHOWN) -> str:
    """``loss=0.6931 acc=0.5000 lr=1.00e-05``: the shown metrics that were logged, short names."""
    parts, names = [], set()
    for key, short in shown:
        v = metrics.get(key)
        if v is not None and short not in names:
            names.add(short)
            parts.append(f"{short}={_fmt(float(v))}")
    return " ".join(parts)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def _console():
    from rich.console import Console

    return Console()


def console():
    """The console for messages (stderr): saved paths, warnings, resume notes. Metrics and the progress
    bar go to :func:`_console` (stdout)."""
    from rich.console import Console

    return Console(stderr=True)


def _interactive(console) -> bool:
    return bool(console.is_terminal or console.is_jupyter)


@contextlib.contextmanager
def phase(what: str, *, label: str = "", enabled: bool = True, total: Optional[int] = None,
          progress=None) -> Iterator["_Phase"]:
    """Show that ``what`` (e.g. "evaluating") is running: a spinner with elapsed time (and a bar when
    ``total`` is known) in a terminal, a start and an end line otherwise. ``progress``: a running
    rich Progress to add the spinner to (the training bar), else a transient one of its own.
    Yields a handle whose ``advance(n)`` moves the bar."""
    if not enabled:
        yield _Phase(None, None)
        return
    prefix = f"[{label}] " if label else ""
    console = progress.console if progress is not None else _console()
    t0 = time.perf_counter()
    if not _interactive(console):
        print(f"{prefix}{what} ...", flush=True)
        try:
            yield _Phase(None, None)
        finally:
            print(f"{prefix}{what}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
        TimeElapsedColumn

    own = progress is None
    if own:
        cols = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if total:
            cols[2:2] = [BarColumn(bar_width=20), MofNCompleteColumn()]
        progress = Progress(*cols, console=console, transient=True)
        progress.start()
    from rich.markup import escape

    # "[sft]" is text, not a style tag: escaped for the columns, kept plain for the spinner row
    task = progress.add_task(escape(f"{prefix}{what}"), total=total, live="", plain=f"{prefix}{what}")
    try:
        yield _Phase(progress, task)
    finally:
        if own:
            progress.stop()
        else:
            progress.remove_task(task)


class _Phase:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)


# ---------------------------------------------------------------------------------------------- trackers
def _flat_config(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted scalar hyper-parameters (lists and None as strings) for TensorBoard's HPARAMS tab."""
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


class _TensorBoard:
    def __init__(self, out: Path, name: str, config: Dict[str, Any]):
        tb = require("torch.utils.tensorboard", "tensorboard", "log.report_to=tensorboard")
        self.writer = tb.SummaryWriter(str(out / "tensorboard"))
        self.config = config
        self.last: Dict[str, float] = {}

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.last.update(metrics)

    def log_table(self, step: int, name: str, rows: List[Dict[str, Any]]) -> None:
        """A table as TensorBoard text (markdown, shown in the TEXT tab); cells are escaped text."""
        self.writer.add_text(name, markdown_table(rows), step)
        self.writer.flush()

    def finish(self) -> None:
        # hparams with the final value of every metric, so runs sort and filter in the HPARAMS tab
        final = {f"hparam/{k}": v for k, v in self.last.items()}
        self.writer.add_hparams(_flat_config(self.config), final, run_name=".")
        self.writer.close()


class _WandbLike:
    """W&B and Trackio share the API: ``init(...)`` returns a run with ``log`` and ``finish``."""

    def __init__(self, kind: str, out: Path, name: str, config: Dict[str, Any]):
        mod = require(*TRACKER_PACKAGES[kind], f"log.report_to={kind}")
        project = os.environ.get("WANDB_PROJECT" if kind == "wandb" else "TRACKIO_PROJECT", "alignkit")
        if kind == "wandb":
            # a new run for every training call, even when an earlier one in this process is still open
            self.run = mod.init(project=project, name=name, config=config, dir=str(out), reinit="create_new")
        else:
            self.run = mod.init(project=project, name=name, config=config)
        self.mod = mod

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, step: int, name: str, rows: List[Dict[str, Any]]) -> None:
        """A ``Table`` (W&B; Trackio has the same class) with one column per key of the rows."""
        table_cls = getattr(self.mod, "Table", None)
        if table_cls is None or not rows:
            return
        cols = table_columns(rows)
        self.run.log({name: table_cls(columns=["step", *cols], data=[[step, *(_cell(r.get(c)) for c in cols)]
                                                                      for r in rows])}, step=step)

    def finish(self) -> None:
        self.run.finish()


def table_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """Every key of the rows, in first-seen order."""
    cols: Dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _cell(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """Rows as a markdown table; text cells escaped (|, newlines, < >) so model text stays text."""
    cols = table_columns(rows)

    def esc(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = str(_cell(v))
        return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
                .replace("\n", "<br>"))

    head = "| " + " | ".join(esc(c) for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def open_trackers(kinds: List[str], out: Path, name: str, config: Dict[str, Any]) -> list:
    """One tracker per kind; a missing package raises MissingPackage before any run is opened."""
    for kind in kinds:
        module, requirement = TRACKER_PACKAGES[kind]
        require(module, requirement, f"log.report_to={kind}")
    return [_TensorBoard(out, name, config) if kind == "tensorboard" else _WandbLike(kind, out, name, config)
            for kind in kinds]


# ---------------------------------------------------------------------------------------------- logger
class MetricLogger:
    def __init__(self, out: Path, cfg, is_main: bool):
        self.out, self.cfg, self.is_main = Path(out), cfg, is_main
        self.path = self.out / "metrics.jsonl"
        self.progress = None
        self.task_id = None
        self.trackers: list = []
        self.t_start = time.time()
        self.label = getattr(cfg, "command", "") or ""
        self._lines = False  # plain lines instead of a bar (stdout is not a terminal)
        self._total = self._done0 = 0
        self._t_fit = 0.0
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.trackers = open_trackers(list(cfg.log.report_to), self.out, cfg.log.run_name or self.out.name,
                                          cfg.model_dump(mode="json"))

    @property
    def verbose(self) -> bool:
        return bool(self.is_main and self.cfg.log.progress)

    def resumed(self, step: int) -> None:
        if self.is_main and self.path.exists():
            # drop lines past the checkpoint so the resumed run's curve does not double back
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
            self.path.write_text("".join(l + "\n" for l in kept))
        for name in ("alerts.jsonl", "completions.jsonl"):
            path = self.out / name
            if self.is_main and path.exists():
                lines = [l for l in path.read_text().splitlines() if l.strip()]
                path.write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= step))

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        row = {"step": step, "time": round(time.time() - self.t_start, 3), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        for t in self.trackers:
            t.log(step, {k: v for k, v in clean.items() if v is not None and math.isfinite(v)})
        if self.verbose and any(k.startswith("eval/") for k in clean):
            text = metrics_text(clean, EVAL_SHOWN)
            if text:
                self._print(f"[{self.label}] eval step {step} {text}")
        elif self._lines and self.verbose:
            self._print(self._step_line(step, clean))

    def log_table(self, step: int, name: str, rows: List[Dict[str, Any]], to_trackers: bool = False) -> None:
        """Rows of a step's table (online RL: its completions) appended to ``OUTPUT/<name>.jsonl`` with their
        step (report.html shows them per step); with ``to_trackers`` also to every tracker (a W&B table,
        TensorBoard text), while the tracker runs are open."""
        if not self.is_main or not rows:
            return
        with (self.out / f"{name}.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}, allow_nan=True, default=str) + "\n")
        if to_trackers:
            for t in self.trackers:
                t.log_table(step, name, rows)

    def _step_line(self, step: int, metrics: Dict[str, float]) -> str:
        line = f"[{self.label}] step {step}/{self._total} {metrics_text(metrics)}".rstrip()
        done = step - self._done0
        if done > 0 and self._t_fit:
            per = (time.perf_counter() - self._t_fit) / done
            line += f" | {per:.2f} s/step | ETA {_clock(per * (self._total - step))}"
        return line

    def _print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def alert(self, alert) -> None:
        """A diagnostics warning: to alerts.jsonl and, visibly, to the console."""
        if not self.is_main:
            return
        with (self.out / "alerts.jsonl").open("a") as f:
            f.write(json.dumps(alert.to_dict()) + "\n")
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]warning[/] step {alert.step} {alert.kind}: {alert.message}",
                                   highlight=False)

    def phase(self, what: str, total: Optional[int] = None):
        """A progress indicator for a phase of this run (see :func:`phase`)."""
        return phase(what, label=self.label, enabled=self.verbose, total=total, progress=self.progress)

    def start(self, total: int, done: int) -> None:
        self._total, self._done0, self._t_fit = total, done, time.perf_counter()
        if not self.verbose:
            return
        console = _console()
        if not _interactive(console):
            self._lines = True
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        # row 1: "sft ━━━━━━━━━━━━━━━━━━━━ 12/40 0:00:05 ETA 0:00:11" (<= 80 columns); row 2: live metrics
        self.progress = _TwoRowProgress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                        TimeRemainingColumn(), console=console, transient=False)
        self.progress.start()
        from rich.markup import escape

        self.task_id = self.progress.add_task(escape(self.label), total=total, completed=done, live="")

    def advance(self, step: int, metrics: Dict[str, float]) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task_id, completed=step, live=metrics_text(metrics))

    def stop(self) -> None:
        """Stop the progress display (phases after training still show their own)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._lines = False

    def close(self) -> None:
        """Stop the display and finish every tracker run (idempotent)."""
        self.stop()
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.finish()


def _two_row_progress():
    from rich.progress import Progress
    from rich.text import Text

    from rich.spinner import Spinner

    class TwoRowProgress(Progress):
        """The bar on one row and the main task's live metrics (folded, never cut) on the next; a phase
        running inside training (evaluation, a checkpoint) gets a spinner row of its own below them."""

        def get_renderables(self):
            if not self.tasks:
                return
            main, *phases = self.tasks
            yield self.make_tasks_table([main])
            if main.fields.get("live"):
                yield Text(main.fields["live"], overflow="fold")
            for t in phases:
                done = f" {int(t.completed)}/{int(t.total)}" if t.total else ""
                text = f"{t.fields.get('plain', t.description)}{done} {_clock(t.elapsed or 0)}"
                yield Spinner("dots", Text(text, overflow="fold"),
                              style="green")

    return TwoRowProgress


def _TwoRowProgress(*args, **kwargs):
    return _two_row_progress()(*args, **kwargs)
