"""Data layer: read rows, recognize shapes, tokenize, collate.

``prepare(kind, cfg, tokenizer)`` is the one entry point trainers use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from alignkit.config import DataConfig
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataError, DataReport, read_rows
from alignkit.data.tokenize import Encoder

__all__ = ["prepare", "Prepared", "DataError", "DataReport", "Encoder", "read_rows", "parse_rows"]


@dataclass
class Prepared:
    train: List[Dict[str, Any]]
    eval: List[Dict[str, Any]]
    reports: List[DataReport] = field(default_factory=list)
    encoder: Optional[Encoder] = None

    def summary_lines(self) -> List[str]:
        return [line for r in self.reports for line in r.summary_lines()]


def _load_split(source: str, kind: str, cfg: DataConfig, encoder: Encoder, **parse_kwargs):
    name, rows = read_rows(source, split=cfg.split, max_rows=cfg.max_rows)
    report = DataReport(source=name)
    examples = parse_rows(rows, kind, report, **parse_kwargs)
    encoded = encoder.encode(kind, examples, report)
    return encoded, report


def prepare(kind: str, cfg: DataConfig, tokenizer, seed: int = 0, require_eval: bool = False,
            **parse_kwargs) -> Prepared:
    """Load, parse and tokenize training (and held-out) data of ``kind``.

    kind: sft | preference | unpaired | prompt. Raises DataError when nothing usable is left.
    """
    if not cfg.path:
        raise DataError("no training data: pass --data FILE (or data.path=...)")
    encoder = Encoder(tokenizer, cfg)
    train, report = _load_split(cfg.path, kind, cfg, encoder, **parse_kwargs)
    reports = [report]
    if not train:
        raise DataError(f"{cfg.path}: no usable {kind} examples out of {report.rows_read} rows\n"
                        + "\n".join(report.summary_lines()))
    eval_items: List[Dict[str, Any]] = []
    if cfg.eval_path:
        eval_items, ereport = _load_split(cfg.eval_path, kind, cfg, encoder, **parse_kwargs)
        reports.append(ereport)
        if not eval_items:
            raise DataError(f"{cfg.eval_path}: no usable {kind} examples for evaluation")
    elif cfg.eval_fraction > 0:
        # split by source row so the expanded pairs of one ranking never straddle the split
        rows = sorted({x["row"] for x in train})
        random.Random(seed).shuffle(rows)
        n_eval = max(1, int(round(len(rows) * cfg.eval_fraction)))
        held = set(rows[:n_eval])
        eval_items = [x for x in train if x["row"] in held]
        train = [x for x in train if x["row"] not in held]
        if not train:
            raise DataError(f"{cfg.path}: eval_fraction={cfg.eval_fraction} leaves no training examples")
    elif require_eval:
        raise DataError("this command needs held-out data: set data.eval_path or data.eval_fraction")
    return Prepared(train, eval_items, reports, encoder)
