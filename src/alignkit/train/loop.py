"""The one training loop every algorithm shares.

An algorithm is a :class:`Task`: it collates items into micro-batches, says how many normalization
units a micro-batch holds (label tokens, pairs, sequences) and returns the *sum* of its loss over
those units. The loop owns everything else: data order, gradient accumulation with normalization by
the global unit count (so 4x2 equals 8 and two processes equal one), clipping, mixed precision,
NaN/Inf skipping, logging, evaluation, atomic checkpoints and exact resume, on ``accelerate``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from alignkit.api import run_callbacks
from alignkit.config import RunConfig
from alignkit.data.stream import StreamingItems
from alignkit.eval.diagnostics import Alert, Diagnostics
from alignkit.models.loading import native_bf16
from alignkit.runtime import keep_host_memory
from alignkit.train import metric_keys as K
from alignkit.train.checkpoint import CheckpointError, CheckpointManager
from alignkit.train.disk import tensor_bytes
from alignkit.train.logging import MetricLogger, console, peak_memory_gb
from alignkit.train.optim import ClippedStep, make_optimizer
from alignkit.train.preempt import Preempted, StopSignals
from alignkit.train.rundir import input_fingerprints, read_records

Metrics = Dict[str, torch.Tensor]


class TrainingAborted(RuntimeError):
    pass


@dataclass
class Update:
    """One optimizer update planned by :meth:`Task.plan`: its micro-batches and the step-level metrics
    known when it was planned (an online task's rollout statistics; merged into the step's log line)."""

    micro_batches: List[Any]
    metrics: Dict[str, float] = field(default_factory=dict)
    #: rows of a table to log with the step (online RL: prompt, completion, rewards, advantage), or None
    table: Optional[List[Dict[str, Any]]] = None
    #: the table also goes to the trackers (log_completions); else only to OUTPUT/completions.jsonl
    table_to_trackers: bool = False


class Task:
    """Algorithm plug-in. Override ``collate``, ``units`` and ``loss``; the rest has defaults.

    Lifecycle: the :class:`Trainer` calls ``setup(accelerator)`` once before anything else, then
    ``param_groups`` to build the optimizer, then ``plan`` once per step.
    """

    name = "task"
    acc = None

    def setup(self, accelerator) -> None:
        """Called once by the Trainer with its accelerator (device, processes, autocast, gathers)."""
        self.acc = accelerator

    def batch_shape(self, cfg) -> Tuple[int, int]:
        """(items per micro-batch per process, micro-batches per step): the step takes their product times
        the processes. Default ``train.batch_size``, ``train.grad_accum``; online RL given TRL's batch in
        completions returns its prompts per process and 1."""
        return cfg.train.batch_size, cfg.train.grad_accum

    def param_groups(self, model) -> Optional[List[Dict[str, Any]]]:
        """Optimizer parameter groups (``{"params": [...], "lr": ...}``; a group without ``lr`` gets
        ``optim.lr``), or None for one group of every trainable parameter."""
        return None

    def collate(self, items: List[Dict[str, Any]]):
        raise NotImplementedError

    def units(self, batch) -> float:
        """Normalization units in a micro-batch (e.g. label tokens or pairs)."""
        return float(len(batch))

    def loss(self, model, batch):
        """Return (sum of the loss over the batch's units, metrics as per-unit means)."""
        raise NotImplementedError

    #: token budget per micro-batch (``train.max_tokens_per_batch``, set by offline tasks); None: a row count
    max_tokens: Optional[int] = None

    def item_tokens(self, item: Dict[str, Any]) -> int:
        """Tokens an item adds to a micro-batch (for the token budget)."""
        return len(item["input_ids"])

    def split(self, items: List[Any], micro_batch_size: int, tokens: Optional[Callable[[Any], int]] = None
              ) -> List[List[Any]]:
        """The items of each micro-batch: ``micro_batch_size`` at a time or, with a token budget,
        consecutive items while their tokens fit (an item over the budget goes alone). Normalization
        is by global units either way, so the split never changes the update. ``tokens``: an item's token
        count (default :meth:`item_tokens`; online RL splits rollout row indices)."""
        if not self.max_tokens:
            return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
        tokens = tokens or self.item_tokens
        out: List[List[Any]] = [[]]
        used = 0
        for it in items:
            n = tokens(it)
            if out[-1] and used + n > self.max_tokens:
                out.append([])
                used = 0
            out[-1].append(it)
            used += n
        return out

    def plan(self, model, items: List[Dict[str, Any]], micro_batch_size: int) -> Iterator[Update]:
        """Yield the :class:`Update` s (micro-batches + metrics) of one global batch of ``items``.

        Offline methods do one update per global batch; online RL generates a rollout and then yields
        several updates (epochs x minibatches) over it, with the rollout's metrics on the first.
        """
        yield Update([self.collate(chunk) for chunk in self.split(items, micro_batch_size)])

    def evaluate(self, model, items: List[Dict[str, Any]], batch_size: int) -> Dict[str, float]:
        """Held-out metrics (floats). May also return, under :data:`EVAL_EXAMPLES`, each metric's
        per-example values (``{"eval/accuracy": [...], "eval/loss": [...]}``, in the order of
        ``items``): the held-out alert tests a drop with them, paired by example."""
        return {}

    def on_step_end(self, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """Hook after each logged step; may return extra metrics (e.g. diagnostics)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


EVAL_EXAMPLES = "examples"  # key of the per-example values in Task.evaluate's result (not logged)
HELDOUT_BASELINE_FILE = "heldout_examples_before.json"  # their values before training, for resume


def make_scheduler(optimizer, total_steps: int, cfg, start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then decay over ``total_steps``, beginning at step ``start`` (a schedule restarted on resume:
    ``optim.resume_schedule=restart``)."""
    span = max(1, total_steps - start)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * span))

    def factor(step: int) -> float:
        step, total_steps = step - start, span
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(cfg: RunConfig):
    # deferred: accelerate (slow import) loads only for training
    from accelerate import Accelerator

    precision = cfg.train.precision
    if precision == "auto":  # bf16 autocast wherever bf16 is native: a GPU, or a CPU with AMX/AVX512-BF16
        precision = "bf16" if native_bf16() else "fp32"
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # deferred: accelerate (slow import) loads only for training
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the same process (notebooks,
    # pipelines, tests) may want another precision, so start from a clean one (the process group stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def make_diagnostics(cfg: RunConfig):
    d = getattr(cfg, "diagnostics", None)
    if d is None or not d.enabled:
        return None
    return Diagnostics(d)


class Trainer:
    """Runs a :class:`Task` over ``train_items`` with the shared loop."""

    def __init__(self, cfg: RunConfig, task: Task, model, train_items: Sequence[Dict[str, Any]],
                 eval_items: Sequence[Dict[str, Any]] = (), accelerator=None, tokenizer=None,
                 steps_per_epoch_items: Optional[int] = None):
        self.cfg, self.task = cfg, task
        keep_host_memory()  # freed tensors stay mapped: no page faults on every step's fresh buffers
        self.acc = accelerator or make_accelerator(cfg)
        self.out = Path(cfg.output)
        # data.streaming: examples read lazily by position (data/stream.py); anything else is a list
        self.stream = train_items if isinstance(train_items, StreamingItems) else None
        self.train_items = self.stream if self.stream is not None else list(train_items)
        self.eval_items = list(eval_items) if cfg.log.evaluate else []  # log.evaluate=false: no held-out passes
        self.tokenizer = tokenizer
        task.setup(self.acc)
        world = self.acc.num_processes
        self.micro, accum = task.batch_shape(cfg)
        self.global_batch = self.micro * accum * world
        if self.stream is not None and not cfg.train.max_steps:
            raise ValueError("data.streaming needs train.max_steps: a stream's length is not known before it is read")
        self.steps_per_epoch = (cfg.train.max_steps if self.stream is not None  # train/epoch: fraction of the run
                                else max(1, math.ceil(len(self.train_items) / self.global_batch)))
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(1, int(math.ceil(cfg.train.epochs * self.steps_per_epoch)))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        model.to(self.acc.device)  # before the optimizer, so the fused (single-kernel) AdamW can be used
        optimizer = make_optimizer(self.task.param_groups(model) or [{"params": params}], cfg.optim, self.acc.device)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # the scheduler is stepped by us once per update (accelerate's wrapper would step it per process)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, cfg.optim)
        self.clipped = ClippedStep(self.acc, self.optimizer)  # clipping folded into the fused AdamW step
        # the scheduler's state is saved as JSON by the checkpoint manager (never a pickle)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped = 0
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.acc, cfg.log.save_total_limit)
        self.logger = MetricLogger(self.out, cfg, self.acc.is_main_process)
        self.diagnostics = make_diagnostics(cfg)
        self.resumed_from: Optional[Path] = None  # the checkpoint this run resumed from
        self.good_since_resume = 0  # updates applied since then (a damaged state gives none)
        self._skipped_at_resume = 0
        self._checked_after_resume = False
        self.stop = StopSignals(announce=self.acc.is_main_process, label=getattr(cfg, "command", "") or "run")
        self._inputs: Optional[Dict[str, Any]] = None
        self._stop_agreed = False  # several processes: a stop every process has learnt of (see _update)
        # user callbacks of an object-API call (alignkit/api.py); empty otherwise
        self.callbacks = run_callbacks(cfg, self.total_steps, self.unwrapped(), tokenizer)

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + epoch)
        return torch.randperm(len(self.train_items), generator=g).tolist()

    def _global_batch(self, step: int) -> List[Dict[str, Any]]:
        """Items of global batch ``step`` for this process. The last batch of an epoch wraps around."""
        share = self.global_batch // self.acc.num_processes
        if self.stream is not None:  # positions [step * G, (step + 1) * G) of the stream: exact on resume
            return self.stream.global_batch(step, self.global_batch)[
                self.acc.process_index * share:(self.acc.process_index + 1) * share]
        epoch, idx = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = idx * self.global_batch
        ids = [order[(start + k) % len(order)] for k in range(self.global_batch)]
        mine = ids[self.acc.process_index * share:(self.acc.process_index + 1) * share]
        return [self.train_items[i] for i in mine]

    # ------------------------------------------------------------------ one update
    def accumulate(self, micro_batches: List[Any]):
        """Backward every micro-batch with the loss scaled by the *global* unit count.

        Each process adds sum(loss) * world / total_units; DDP averages gradients over processes, so
        the result is sum over all units / total_units whatever the split into micro-batches and
        processes. No host sync happens here: units are counted on the host before the batches move,
        metric sums and the non-finite flag stay on the device (see :meth:`_update`). Returns
        (metric sums as device tensors, local units, global units, non-finite flag as a device tensor).
        """
        acc, model = self.acc, self.model
        units = [float(self.task.units(mb)) for mb in micro_batches]  # host-side batches: no device sync
        local_units = sum(units)
        total = local_units
        if acc.num_processes > 1:
            total = acc.reduce(torch.tensor(local_units, device=acc.device), reduction="sum").item()
        scale = acc.num_processes / max(total, 1e-12)
        sums: Dict[str, torch.Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        for i, (mb, w) in enumerate(zip(micro_batches, units)):
            mb = mb.to(acc.device) if hasattr(mb, "to") else mb
            ctx = acc.no_sync(model) if i < len(micro_batches) - 1 else _nullcontext()
            with ctx:
                with acc.autocast():
                    loss_sum, metrics = self.task.loss(model, mb)
                finite = torch.isfinite(loss_sum.detach())
                bad = bad | ~finite
                # a non-finite loss contributes nothing (the update is skipped after the flag is read)
                loss_sum = torch.where(finite, loss_sum, torch.zeros_like(loss_sum))
                acc.backward(loss_sum * scale)
            for k, v in metrics.items():
                v = torch.as_tensor(v).detach().float().mean() * w
                sums[k] = sums[k] + v if k in sums else v
            lsum = loss_sum.detach().float()
            sums["train/loss"] = sums["train/loss"] + lsum if "train/loss" in sums else lsum
        return sums, local_units, total, bad

    def _update(self, micro_batches: List[Any]) -> Dict[str, torch.Tensor]:
        """One optimizer update. One host sync: the skip decision (non-finite loss or gradient norm on
        any process). Metrics come back as device tensors; :meth:`fit` reads them once per step."""
        acc, model = self.acc, self.model
        sums, local_units, total, bad = self.accumulate(micro_batches)
        grad_norm = self.clipped.norm(model.parameters(), self.cfg.optim.max_grad_norm)
        flag = (bad | ~torch.isfinite(grad_norm)).float()
        if acc.num_processes > 1:  # the stop request rides on the skip flag's all-reduce: every process
            # learns of a signal any of them got at the same update, so all stop after the same step
            both = acc.reduce(torch.stack([flag, torch.tensor(float(self.stop.requested), device=flag.device)]), "sum")
            flag, stop = both.unbind()
            if stop.item() > 0:
                self._stop_agreed = True
                if self.stop.signame is None:
                    self.stop.signame = "a signal to another process"
        if flag.item() > 0:
            self.clipped.skip()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped += 1
            if self._only_bad_since_resume() \
                    and self.skipped - self._skipped_at_resume >= min(3, self.cfg.train.max_bad_steps):
                raise TrainingAborted(self._damaged_resume())
            if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"step {self.step}: {self.bad_in_a_row} consecutive updates had a NaN/Inf loss or gradient; "
                    "lower optim.lr, check the data, or use fp32 (train.precision=fp32)")
            return {"train/skipped_steps": float(self.skipped), "train/bad_step": 1.0}
        self.clipped.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row = 0
        self.good_since_resume += 1
        keys = sorted(sums)
        if acc.num_processes > 1:  # one all-reduce for every metric: rank 0 logs the whole global batch
            sums = dict(zip(keys, acc.reduce(torch.stack([sums[k].float() for k in keys]), "sum").unbind()))
        # every metric is a per-unit mean over the global batch; the loss is normalized by global units
        # like the gradient is
        out = {k: sums[k] / max(total, 1e-12) for k in keys}
        out["train/grad_norm"] = grad_norm
        out[K.TRAIN_UNITS] = float(total)  # loss tokens / pairs / sequences of the update (0: all masked)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _only_bad_since_resume(self) -> bool:
        """Resumed, and every update since was skipped as non-finite (at least one)."""
        return self.resumed_from is not None and self.good_since_resume == 0 and self.skipped > self._skipped_at_resume

    def _damaged_resume(self) -> str:
        return (f"step {self.step}: every update since resuming from {self.resumed_from} had a NaN/Inf loss or "
                f"gradient ({self.skipped - self._skipped_at_resume} of them): that checkpoint's state is damaged; "
                f"resume from an older checkpoint (--resume PATH) or start afresh with --overwrite")

    def _save(self) -> Optional[Path]:
        if self._only_bad_since_resume():
            return None  # nothing but skipped updates since a resume: never rotate out a good checkpoint for it
        if self._inputs is None and self.acc.is_main_process:
            self._inputs = input_fingerprints(self.cfg)  # what the run read, checked by --resume
        # the config goes with the checkpoint, so --resume can refuse a mismatched one (train/rundir.py)
        state = {"step": self.step, "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row,
                 "task": self.task.state_dict(), "config": self.cfg.model_dump(mode="json"),
                 "total_steps": self.total_steps, "world_size": self.acc.num_processes,
                 "finite": self._finite_weights(), "inputs": self._inputs or {}}
        need = tensor_bytes(self.unwrapped(), getattr(self.optimizer, "optimizer", self.optimizer))
        with self.logger.phase(f"saving checkpoint step-{self.step}"):
            path = self.ckpt.save(self.step, state, scheduler=self.scheduler, need=need)
        if self.callbacks and path is not None:
            self.callbacks.save(self.step, path)  # the checkpoint just written
        return path

    def _finite_weights(self) -> bool:
        params = [p.detach() for p in self.model.parameters()]
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True

    def _resume(self, where: str) -> None:
        path, state = self.ckpt.load(where, self.scheduler)
        if not self._finite_weights():
            raise CheckpointError(f"--resume: the checkpoint {path} holds NaN/Inf weights; resume from an older "
                                  f"checkpoint (--resume PATH) or start afresh with --overwrite")
        self.resumed_from = path
        self.step = state["step"]
        self.skipped = self._skipped_at_resume = state.get("skipped", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.task.load_state_dict(state.get("task", {}))
        self._resume_schedule(state)
        self.logger.resumed(self.step)
        if self.diagnostics is not None and self.acc.is_main_process:
            # the trends (and the before-training baseline of held-out metrics) continue from the
            # logged history; alerts it raised are already in alerts.jsonl
            self.diagnostics.replay(read_records(self.out / "metrics.jsonl"))
            baseline = self.out / HELDOUT_BASELINE_FILE
            if baseline.is_file():
                import json

                self.diagnostics.set_heldout_baseline(json.loads(baseline.read_text()))

    def _resume_schedule(self, state: Dict[str, Any]) -> None:
        """A resumed run of another length (train.max_steps or epochs raised) either continues the
        schedule recomputed for the new length from the checkpoint's step or restarts warmup and decay
        over the remaining steps (``optim.resume_schedule``); either way the log says which."""
        before = state.get("total_steps") or (state.get("config") or {}).get("train", {}).get("max_steps")
        if not before or before == self.total_steps:
            return
        was = self.scheduler.get_last_lr()[0]
        if self.cfg.optim.resume_schedule == "restart":
            restarted = make_scheduler(self.optimizer, self.total_steps, self.cfg.optim, start=self.step)
            restarted.load_state_dict({**self.scheduler.state_dict(), "lr_lambdas": [None] * len(restarted.lr_lambdas)})
            lrs = [base * lam(self.step) for base, lam in zip(restarted.base_lrs, restarted.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            restarted._last_lr = lrs
            self.scheduler = restarted
            how = (f"restarts warmup and {self.cfg.optim.scheduler} decay over steps {self.step + 1}-{self.total_steps} "
                   f"(optim.resume_schedule=restart)")
        else:
            lam = self.scheduler.lr_lambdas[0]
            nxt = self.scheduler.base_lrs[0] * lam(self.step)
            how = (f"continues the {self.cfg.optim.scheduler} schedule recomputed for {self.total_steps} steps "
                   f"(lr {nxt:.3g} at step {self.step + 1}; optim.resume_schedule=restart starts a new warmup and "
                   f"decay over the remaining steps instead)")
        if self.acc.is_main_process:
            console().print(f"--resume: the run was {before} steps long, now {self.total_steps}; at step {self.step} "
                            f"(lr {was:.3g}) the learning rate {how}", style="yellow", markup=False, highlight=False,
                            soft_wrap=True)

    # ------------------------------------------------------------------ main loop
    def fit(self) -> Dict[str, float]:
        cfg = self.cfg
        if cfg.resume:
            self._resume(cfg.resume)
        last: Dict[str, float] = {}
        if self.step == 0:
            self._preflight()
        self.logger.start(self.total_steps, self.step)
        if self.callbacks:
            self.callbacks.train_begin(self.step)
        if self.resumed_from is not None and self.step >= self.total_steps:
            last = self._logged_final()  # a run killed while saving its model: its last step's numbers
        try:
            self.stop.__enter__()  # SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit (train/preempt.py)
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                items = self._global_batch(self.step)
                metrics: Dict[str, float] = {}
                n_updates = 0
                self.model.train()
                planned: Dict[str, float] = {}
                table, table_to_trackers = None, False
                for update in self.task.plan(self.model, items, self.micro):
                    m = self._update(update.micro_batches)
                    planned.update(update.metrics)
                    if update.table is not None:
                        table, table_to_trackers = update.table, update.table_to_trackers
                    n_updates += 1
                    for k, v in m.items():  # average over the updates of this step (on the device)
                        metrics[k] = metrics.get(k, 0.0) + (v - metrics.get(k, 0.0)) / n_updates
                if self.diagnostics is not None and ((self.step + 1) % cfg.log.every == 0
                                                     or self.step + 1 == self.total_steps):
                    metrics[K.WEIGHT_RMS] = self._weight_rms()  # read with the other metrics
                metrics = host_floats(metrics)  # the step's one read of its metrics
                metrics.update(host_floats(planned))
                with warnings.catch_warnings():  # a skipped (NaN) update still advances the schedule
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                self.step += 1
                metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                metrics["train/epoch"] = self.step / self.steps_per_epoch
                metrics["time/step_s"] = time.perf_counter() - t0
                metrics["perf/examples_per_s"] = self.global_batch / max(metrics["time/step_s"], 1e-9)
                metrics["perf/peak_mem_gb"] = peak_memory_gb(self.acc.device)
                metrics.update(self.task.on_step_end(self.step, metrics))
                last = metrics
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    self.logger.log(self.step, metrics)
                    if table:
                        self.logger.log_table(self.step, "completions", table, to_trackers=table_to_trackers)
                    self._diagnose(metrics)
                self.logger.advance(self.step, metrics)
                if self.eval_items and cfg.log.eval_every and self.step % cfg.log.eval_every == 0 \
                        and self.step < self.total_steps:
                    self.evaluate()
                if self.resumed_from is not None and self.good_since_resume and not self._checked_after_resume:
                    self._checked_after_resume = True  # once: the first update from the restored optimizer state
                    if not self._finite_weights():
                        raise TrainingAborted(f"step {self.step}: the first update after resuming from "
                                              f"{self.resumed_from} made the weights NaN/Inf: that checkpoint's "
                                              f"optimizer state is damaged; resume from an older checkpoint "
                                              f"(--resume PATH) or start afresh with --overwrite")
                saved = bool(cfg.log.save_every and self.step % cfg.log.save_every == 0) and self._save() is not None
                stop = self._stop_agreed if self.acc.num_processes > 1 else self.stop.requested
                if stop and self.step < self.total_steps:
                    self._preempt(saved)
                if self.callbacks:
                    logged = self.step % cfg.log.every == 0 or self.step == self.total_steps
                    self.callbacks.step_end(self.step, metrics, logged)
                    if self.callbacks.should_stop:  # a TrainerCallback's control.should_training_stop
                        break
            if self._only_bad_since_resume():
                raise TrainingAborted(self._damaged_resume())
            self.logger.stop()
            self._diagnose_end()
            final = dict(last)
            if self.eval_items:
                final.update(self.evaluate())
            if self.callbacks:
                self.callbacks.train_end(self.step, final)
        finally:
            self.stop.__exit__(None, None, None)
            self.logger.close()  # finishes this run's tracker runs (W&B, TensorBoard, Trackio)
        return final

    def _preempt(self, saved: bool) -> None:
        """Stop after a signal: checkpoint this step (unless one was just written), then raise
        :class:`Preempted` on every process."""
        ckpt = self.out / "checkpoints" / f"step-{self.step:08d}"
        if not saved and self._save() is None:  # nothing but skipped updates since a resume: the last good one
            ckpt = self.ckpt.latest()
        self.logger.stop()
        raise Preempted(self.stop.signame or "a signal", self.step, ckpt, self.out)

    def _logged_final(self) -> Dict[str, float]:
        """The training metrics logged at the current (last) step, for the summary of a resumed run
        that has no step left to run."""
        out: Dict[str, float] = {}
        for rec in read_records(self.out / "metrics.jsonl"):
            if rec.get("step") == self.step:
                out.update({k: v for k, v in rec.items() if k not in ("step", "time") and not k.startswith("eval/")})
        return out

    def evaluate(self) -> Dict[str, float]:
        model = self.acc.unwrap_model(self.model)
        was = model.training
        model.eval()
        with torch.no_grad(), self.acc.autocast(), self.logger.phase(f"evaluating {len(self.eval_items)} examples"):
            res = dict(self.task.evaluate(model, self.eval_items, self.micro))
        model.train(was)
        examples = res.pop(EVAL_EXAMPLES, None) or {}
        res = {k if k.startswith("eval/") else f"eval/{k}": float(v) for k, v in res.items()}
        self.logger.log(self.step, res)
        if examples and self.step == 0 and self.acc.is_main_process:  # the baseline survives a resume
            import json

            (self.out / HELDOUT_BASELINE_FILE).write_text(json.dumps({k: list(map(float, v))
                                                                      for k, v in examples.items()}))
        self._diagnose(res, examples)
        if self.callbacks:
            self.callbacks.evaluate(self.step, res)
        return res

    def _diagnose(self, metrics: Dict[str, float], examples: Optional[Dict[str, Sequence[float]]] = None) -> None:
        """Feed the live checks (``examples``: per-example held-out values, see :meth:`Task.evaluate`);
        new alerts go to alerts.jsonl and the console, and an alert whose kind is in
        ``diagnostics.fail_on`` aborts the run."""
        if self.diagnostics is None:
            return
        fail_on = set(self.cfg.diagnostics.fail_on)
        for alert in self.diagnostics.update(self.step, metrics, examples=examples):
            self.logger.alert(alert)
            if alert.kind in fail_on or "any" in fail_on:
                raise TrainingAborted(f"step {alert.step}: {alert.kind} alert, and diagnostics.fail_on includes it: "
                                      f"{alert.message}")

    def _diagnose_end(self) -> None:
        """No-learning conditions that held for the whole run, however short (``Diagnostics.end_of_run``):
        alerts to alerts.jsonl and the console, and ``diagnostics.fail_on`` applies as to live ones."""
        if self.diagnostics is None:  # every process judges the same (global) metrics, so all stop together
            return
        fail_on = set(self.cfg.diagnostics.fail_on)
        for alert in self.diagnostics.end_of_run(self.step):
            self.logger.alert(alert)
            if alert.kind in fail_on or "any" in fail_on:
                raise TrainingAborted(f"end of run (step {alert.step}): {alert.kind} alert, and diagnostics.fail_on "
                                      f"includes it: {alert.message}")

    def _weight_rms(self) -> torch.Tensor:
        """Root mean square of the trained weights (L2 norm / sqrt(count)), as a device tensor (read with
        the step's other metrics)."""
        params = [p.detach() for p in self.model.parameters() if p.requires_grad]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in params]))
        return norm / math.sqrt(max(1, sum(p.numel() for p in params)))

    def _preflight(self) -> None:
        """Checks before the first step: the baseline weight RMS for the ``exploding`` alert, and a
        first look at the data: when the first items hold no loss units (every label masked) the
        ``all_masked`` alert fires before any compute is spent (and aborts with fail_on)."""
        if self.diagnostics is None:
            return
        self._diagnose({K.WEIGHT_RMS: float(self._weight_rms())})
        try:
            sample = self.train_items[:max(self.micro, 16)]
            units = float(self.task.units(self.task.collate(sample))) if sample else 1.0
        except Exception:  # noqa: BLE001 - tasks whose items are not collated this way are checked live
            return
        if units <= 0:
            alert = Alert(0, "all_masked", f"Every label of the first {len(sample)} training examples is masked "
                                           f"(0 loss units): there is nothing to learn from. Check the chat "
                                           f"template / response masking and data.max_length.")
            self.diagnostics.alerts.append(alert)
            self.logger.alert(alert)
            if {"all_masked", "any"} & set(self.cfg.diagnostics.fail_on):
                raise TrainingAborted(f"step 0: all_masked alert, and diagnostics.fail_on includes it: "
                                      f"{alert.message}")

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)


def host_floats(metrics: Dict[str, Any]) -> Dict[str, float]:
    """Plain floats of a metrics dict whose values may be device tensors, in one transfer."""
    tensors = {k: v.detach().float().reshape(()) for k, v in metrics.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v)}
    if tensors:
        dev = next(iter(tensors.values())).device
        out.update(zip(tensors, torch.stack([t.to(dev) for t in tensors.values()]).tolist()))
    return {k: out[k] for k in metrics}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
