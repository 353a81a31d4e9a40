"""What the round-based methods (``iterative-dpo``, ``spin``) share: round options, each round's
prompt slice, the DPO run of a round, and the rounds as the stages of a generated pipeline.

A round is a stage run by the one resumable runner (:func:`alignkit.stages.run_stages`); its command
is built here (:class:`alignkit.command.Command`), so this module points down to the stage layer and
never up to the CLI or the pipeline-file reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from pydantic import Field

from alignkit.command import Command
from alignkit.config import Section
from alignkit.feedback.common import write_summary
from alignkit.stages import PipelineSpec, StageSpec, check_stages, run_stages


class RoundOptions(Section):
    rounds: int = Field(3, gt=0)
    """Rounds of sample -> pair -> DPO."""
    reference: Literal["previous", "original"] = "previous"
    """DPO reference of each round: the policy the round starts from, or the original model."""
    prompts_per_round: Optional[int] = Field(None, gt=0)
    """Prompts used per round, a fresh slice each round (cycling through the data). Empty: all."""
    keep_round_models: bool = True
    """Keep every round's OUTPUT/round-K/model; false deletes a round's model once the next one exists."""


def check_round_config(cfg) -> None:
    if not cfg.dpo.paired:
        raise ValueError(f"dpo.loss={cfg.dpo.loss!r} is unpaired; {cfg.command} builds pairs, use a paired loss")
    if cfg.dpo.ref_model:
        raise ValueError(f"dpo.ref_model is set per round by {cfg.command}; choose "
                         f"{cfg.command.split('-')[-1]}.reference=previous|original instead")


def round_slice(items: List[Dict[str, Any]], k: int, per_round: Optional[int]) -> List[Dict[str, Any]]:
    """Round k's prompts (1-based k): all, or the k-th slice of ``per_round`` items, cycling."""
    if not per_round or per_round >= len(items):
        return items
    start = (k - 1) * per_round
    return [items[(start + j) % len(items)] for j in range(per_round)]


def dpo_round(cfg, start_model: Optional[str], original: Optional[str], pairs_path: Path, rdir: Path,
              k: int, reference: str) -> Dict[str, Any]:
    """One DPO run on ``pairs_path`` from ``start_model`` into ``rdir``; returns train_dpo's summary.

    The run's config is the parent's (``cfg``: iterative-dpo or spin), every section that
    :class:`~alignkit.train.preference.DPOConfig` has (``hub``, ``overwrite`` and any later one included),
    with only what a round must change replaced: output, starting model, merged LoRA, the pairs as data,
    the seed, the reference and ``resume``."""
    # deferred: torch stays out of this module's import
    from alignkit.train.preference import DPOConfig, train_dpo

    # previous: the round's starting weights (no ref_model, so LoRA can use the adapter-off reference)
    ref_model = None if reference == "previous" else (original or "default")
    inherited = {name: getattr(cfg, name) for name in DPOConfig.model_fields
                 if name != "command" and name in type(cfg).model_fields}
    inner = DPOConfig(**{
        **inherited,
        "output": str(rdir), "model": cfg.model.model_copy(update={"name_or_path": start_model}),
        "lora": cfg.lora.model_copy(update={"save": "merged"}),  # the next round loads a plain model
        "data": cfg.data.model_copy(update={"path": str(pairs_path), "eval_path": None, "eval_fraction": 0.0,
                                            "max_rows": None}),
        "train": cfg.train.model_copy(update={"seed": cfg.train.seed + k}),
        "dpo": cfg.dpo.model_copy(update={"ref_model": ref_model}),
        # --resume: a round interrupted mid-training continues from its latest checkpoint (log.save_every)
        "resume": "latest" if cfg.resume and (rdir / "checkpoints").is_dir()
        and any((rdir / "checkpoints").glob("step-*")) else None})
    return train_dpo(inner)


def drop_model(path: Optional[str], keep: Sequence[Optional[str]]) -> None:
    """Delete a round's model directory (never the original or one still needed)."""
    if path and path not in keep and Path(path).name == "model" and Path(path).parent.name.startswith("round-"):
        shutil.rmtree(path, ignore_errors=True)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- rounds as pipeline stages

def run_rounds(cfg, section: str, round_config: str, round_runner: str, rounds: Sequence[int]
               ) -> List[Dict[str, Any]]:
    """Run the rounds of ``cfg`` as a generated pipeline on the one resumable runner
    (:func:`alignkit.stages.run_stages`) and return the round records (``round-K/round.json``).

    Stage ``round-K`` (output ``OUTPUT/round-K``) runs ``round_runner`` on ``round_config``: ``cfg``'s
    own fields (without ``resume`` and the round count, so adding rounds keeps the finished ones) plus
    ``round: K`` and ``start_model``, a reference to the previous round's ``model_dir``. Like any
    pipeline stage, a round is skipped only when its DONE hash matches its resolved config (``--resume``),
    a round interrupted mid-training resumes from its checkpoint, and a changed config reruns the rounds
    from the first changed one. Without ``--resume`` every round runs afresh.
    """
    out = Path(cfg.output)
    base = cfg.model_dump(mode="json")
    base.pop("resume", None)
    base.pop("command", None)
    base[section] = {k: v for k, v in base[section].items() if k != "rounds"}
    stages, prev = [], None
    for k in rounds:
        start = cfg.model.name_or_path if prev is None else "${stages.round-%d.summary.model_dir}" % prev
        stages.append(StageSpec(name=f"round-{k}", command=f"{cfg.command}-round",
                                config={**base, "round": k, "start_model": start, "output": str(out / f"round-{k}")}))
        prev = k
    spec = PipelineSpec(output=str(out), stages=stages)
    commands = {f"{cfg.command}-round": Command(f"{cfg.command}-round", round_config, round_runner,
                                                f"one round of {cfg.command}", {})}
    check_stages(spec, f"{cfg.command} rounds", commands)
    run_stages(spec, force=not cfg.resume, commands=commands)
    return [json.loads((out / f"round-{k}" / "round.json").read_text()) for k in rounds]


def finish_round(rdir: Path, rec: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``round.json`` (the round's record) and ``summary.json`` (the round's DPO run summary, if
    any, updated with the record: later rounds read its ``model_dir``)."""
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "round.json").write_text(json.dumps(rec, indent=2, default=float))
    trained = rdir / "summary.json"
    write_summary(rdir, {**(json.loads(trained.read_text()) if trained.is_file() else {}), **rec})
    return rec
