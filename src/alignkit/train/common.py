"""Run set-up and tear-down shared by every command: seeding, run directory, data report, saving."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from alignkit.api import TrainResult, current
from alignkit.config import RunConfig, to_yaml
from alignkit.data import DataError, Prepared, prepare
from alignkit.data.load import write_data_report
from alignkit.hub import HubPushError, base_model_id, push_to_hub, write_model_card
from alignkit.train.disk import RunDirError, atomic_save_dir, tensor_bytes
from alignkit.train.logging import console
from alignkit.train.rundir import claim, read_records, release

log = logging.getLogger("alignkit")


def start_run(cfg: RunConfig):
    """Seed everything, create the accelerator, take the run directory (lock, overwrite and resume
    rules: train/rundir.py), write config.yaml."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    # deferred: torch stays out of this module's import
    from alignkit.train.loop import make_accelerator

    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    claim_output(cfg, acc)
    if acc.is_main_process:
        console().print(processes_line(acc), markup=False, highlight=False)
    if acc.is_main_process:
        (Path(cfg.output) / "config.yaml").write_text(to_yaml(cfg))
    acc.wait_for_everyone()
    return acc


def processes_line(acc) -> str:
    """The run's first log line: how many processes train and where, so a launch that silently ran one
    process (``accelerate launch --num_processes 2`` without a config that takes it) shows at once."""
    n = acc.num_processes
    kind = acc.distributed_type.value if n > 1 else "single process"
    return f"processes: {n} ({kind}, device {acc.device.type}, mixed precision {acc.mixed_precision})"


def claim_output(cfg: RunConfig, acc) -> None:
    """The main process takes ``cfg.output`` (train/rundir.py); every process raises if it refused."""
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    error: Optional[BaseException] = None
    if acc.is_main_process:
        try:
            claim(cfg, warn=lambda m: console().print(m, style="yellow", markup=False, highlight=False,
                                                      soft_wrap=True))
        except (RunDirError, OSError) as e:
            error = e
    if acc.num_processes > 1:
        flag = acc.reduce(torch.tensor(float(error is not None), device=acc.device), "sum").item()
        if flag and error is None:
            error = RunDirError(f"output {cfg.output}: the main process could not take the run directory")
    if error is not None:
        raise error


def report_data(prepared: Prepared, out: Path, is_main: bool) -> None:
    """Print each side's summary (source, split, rows, drops) and write ``OUTPUT/data_report.json``."""
    if is_main:
        write_data_reports(prepared.reports, out)


def write_data_reports(reports, out: Path) -> None:
    c = console()
    for line in [line for r in reports for line in r.summary_lines()]:
        style = "yellow" if ("dropped" in line or "truncated" in line or "warning" in line) else None
        c.print(line, style=style, markup=False, highlight=False)
    write_data_report(reports, out)


def prepare_data(kind: str, cfg: RunConfig, tokenizer, acc, **kwargs) -> Prepared:
    """``alignkit.data.prepare`` for a run: the data report is written to OUTPUT (and printed) also
    when the data is refused, e.g. every row dropped."""
    if cfg.data.streaming and not cfg.train.max_steps:
        raise DataError("data.streaming needs train.max_steps (--max-steps): a stream's length is not known before "
                        "it is read")
    try:
        data = prepare(kind, cfg.data, tokenizer, **kwargs)
    except DataError as e:
        if acc.is_main_process and getattr(e, "reports", None):
            write_data_reports(e.reports, cfg.output)
        raise
    report_data(data, cfg.output, acc.is_main_process)
    return data


def finish_run(trainer, tokenizer, cfg: RunConfig, summary: Dict[str, Any], save_kwargs: Optional[dict] = None) -> Path:
    """Save OUTPUT/model (safetensors + tokenizer + README.md model card) and OUTPUT/summary.json on the
    main process; push OUTPUT/model to the Hub when hub.push is set."""
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import checkpoint_dtype, save_model

    acc = trainer.acc
    out = Path(cfg.output)
    model_dir = out / "model"
    push_error: Optional[HubPushError] = None
    given = current().model is not None  # a model object with no checkpoint: saved in its own dtype
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(trainer.model) if acc.distributed_type.value == "FSDP" else None
    if acc.is_main_process:
        # all or nothing: written to .tmp-model, then renamed over model/ (space checked first)
        latest = trainer.ckpt.latest()
        hint = (f"; the latest checkpoint ({latest.name}) is intact: rerun with --resume once there is room"
                if latest is not None else "")
        with trainer.logger.phase("saving the model"):
            atomic_save_dir(model_dir, lambda tmp: save_model(
                trainer.unwrapped(), tokenizer, tmp, lora_save=cfg.lora.save, state_dict=state_dict,
                dtype=None if given and not cfg.model.name_or_path else checkpoint_dtype(cfg.model),
                base_model=None if given and not cfg.model.name_or_path else base_model_id(cfg.model.name_or_path)),
                tensor_bytes(trainer.unwrapped()), "the final model", hint)
        summary = {"command": cfg.command, "steps": trainer.step, **summary}
        write_model_card(model_dir, cfg, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        console().print(f"saved {model_dir}", style="green")
        write_run_report(out)
        release(out)
        if cfg.hub.push:  # after the run is complete: a failed push loses nothing
            try:
                with trainer.logger.phase("pushing to the Hub"):
                    url = push_to_hub(model_dir, cfg)
                console().print(f"pushed to {url}", style="green")
            except HubPushError as e:
                push_error = e
    acc.wait_for_everyone()
    if push_error is not None:
        raise push_error
    return model_dir


def write_run_report(out: Path) -> Optional[Path]:
    """OUTPUT/report.html; a failure here never fails the run that produced the data."""
    # deferred: CLI start-up: the report module pulls the probes and rewards (~0.1 s), not needed by `--help`
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
    # deferred: torch stays out of this module's import
    from alignkit.train.loop import TrainingAborted
    out = Path(cfg.output)
    if cfg.resume:  # the "before" numbers and samples are the ones the interrupted run recorded
        before = _logged_before(out)
        _drop_samples(out, "after")
    else:
        before = trainer.evaluate() if trainer.eval_items else {}  # empty with log.evaluate=false
    if samples and not (cfg.resume and _has_samples(out, "before")):
        sample_report_prompts(trainer, tokenizer, eval_items, "before")
    try:
        final = trainer.fit()
    except BaseException as e:
        if trainer.acc.is_main_process:
            if isinstance(e, TrainingAborted):
                write_run_report(out)  # the report shows the alert that aborted the run
            release(out)
        raise
    if getattr(trainer, "stream", None) is not None and trainer.acc.is_main_process:
        write_data_report(trainer.stream.all_reports, out)
    if samples:
        sample_report_prompts(trainer, tokenizer, eval_items, "after")
    summary = {**final, **{f"{k}_before": v for k, v in before.items()}, **extra}
    summary["model_dir"] = str(finish_run(trainer, tokenizer, cfg, summary))
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import is_peft

    model = trainer.unwrapped()
    if is_peft(model) and cfg.lora.save == "merged" and trainer.acc.is_main_process:
        model = model.get_base_model()  # saving merged the adapters into it in place: the model as saved
    return TrainResult({"steps": trainer.step, **summary}, model=model, tokenizer=tokenizer, output=cfg.output)


def _logged_before(out: Path) -> Dict[str, float]:
    """The held-out metrics logged at step 0 (before training) in ``out/metrics.jsonl``."""
    before: Dict[str, float] = {}
    for rec in read_records(out / "metrics.jsonl"):
        if rec.get("step") == 0:
            before.update({k: v for k, v in rec.items() if k.startswith("eval/")})
    return before


def _has_samples(out: Path, tag: str) -> bool:
    return any(r.get("tag") == tag for r in read_records(out / "samples.jsonl"))


def _drop_samples(out: Path, tag: str) -> None:
    """Remove the ``tag`` samples (a resumed run writes its own "after" answers)."""
    path = out / "samples.jsonl"
    rows = read_records(path)
    if rows and any(r.get("tag") == tag for r in rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("tag") != tag))


def sample_report_prompts(trainer, tokenizer, items, tag: str) -> None:
    """Greedy answers to the first ``log.samples`` held-out prompts, appended to samples.jsonl."""
    cfg = trainer.cfg
    n = cfg.log.samples
    if not n or not items or not trainer.acc.is_main_process:
        return
    # deferred: torch stays out of this module's import
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
