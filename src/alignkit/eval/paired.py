"""Two evaluations on the same prompts, compared prompt by prompt.

``alignkit eval`` writes one ``samples.jsonl`` row per sample with its ``prompt`` and each reward
source's score (``rewards: {gold, proxy}``), so two evaluation directories can be compared *paired by
prompt*: for every prompt both evaluated, the difference of the two prompt means; then the t interval
of the mean difference and a two-sided t test over prompts (:func:`alignkit.eval.stats.paired_comparison`).
Pairing removes the variance the prompts share (a hard prompt is hard for both models), so it is
tighter than comparing the two intervals. This is what ``alignkit compare`` states as "better / worse /
not distinguishable from the starting model", and what the demo prints.

An evaluation whose reference *is* the starting model (``--reference-samples`` of the starting model's
evaluation, as in the demo) already holds the same comparison in its own metrics as ``gain/<source>``
(:func:`gain_from_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from alignkit.eval.stats import NAN, Interval, PairedComparison, paired_comparison, read_interval, verdict_of

__all__ = ["compare_eval_dirs", "gain_from_metrics", "prompt_scores", "read_samples", "versus"]


def read_samples(run_dir: Path) -> List[Dict[str, Any]]:
    """The rows of ``RUN_DIR/samples.jsonl`` (empty when there is none; unreadable lines skipped)."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def prompt_scores(samples: Sequence[Dict[str, Any]], source: str, tag: str = "policy"
                  ) -> Tuple[List[float], List[Hashable]]:
    """(scores, prompts) of ``source`` over the rows tagged ``tag`` (an evaluation's own samples are
    tagged ``policy``); rows without a finite score for ``source`` are left out."""
    values, groups = [], []
    for row in samples:
        if row.get("tag", "policy") != tag:
            continue
        score = (row.get("rewards") or {}).get(source)
        if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
            values.append(float(score))
            groups.append(str(row.get("prompt", "")))
    return values, groups


def versus(base_samples: Sequence[Dict[str, Any]], samples: Sequence[Dict[str, Any]], source: str,
           level: float = 0.95) -> Optional[PairedComparison]:
    """``samples`` against ``base_samples`` on ``source``, paired by prompt; None when the two share
    no scored prompt."""
    a, ga = prompt_scores(base_samples, source)
    b, gb = prompt_scores(samples, source)
    if not set(ga) & set(gb):
        return None
    return paired_comparison(a, b, ga, gb, level=level)


def compare_eval_dirs(base_dir: Path, run_dir: Path, source: str = "gold") -> Optional[PairedComparison]:
    """The evaluation in ``run_dir`` against the one in ``base_dir`` (e.g. the starting model's), paired
    by prompt on reward ``source``. ``.text()`` of the result is a printable line:

    >>> pc = compare_eval_dirs(Path("runs/demo/eval_base"), Path("runs/demo/eval_dpo"))  # doctest: +SKIP
    >>> print(pc.text())                                                                 # doctest: +SKIP
    +0.305 ± 0.120 (95% CI 0.185 to 0.425, p=0.0004, 16 prompts): better than the starting model
    """
    return versus(read_samples(base_dir), read_samples(run_dir), source)


def gain_from_metrics(metrics: Dict[str, Any], source: str = "gold") -> Optional[PairedComparison]:
    """The paired gain over the evaluation's reference stored in its metrics (``gain/<source>`` with
    ``_lo``, ``_hi``, ``_p``), or None when the evaluation had no reference scores for ``source``."""
    iv: Optional[Interval] = read_interval(metrics, f"gain/{source}")
    if iv is None:
        return None
    p = metrics.get(f"gain/{source}_p", NAN)
    return PairedComparison(iv, float(p) if isinstance(p, (int, float)) else NAN, verdict_of(iv))
