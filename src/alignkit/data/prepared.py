"""Building a :class:`Prepared` (training and held-out examples with their data reports) from files: one
split read, parsed and tokenized (:func:`load_split`), where the held-out side comes from
(:func:`eval_source`), and the in-memory path of :func:`alignkit.data.prepare` (:func:`prepare_in_memory`).
The streaming (data/stream.py) and mixing (data/mix.py) paths build on the same functions.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from alignkit.config import DataConfig
from alignkit.data.formats import parse_rows
from alignkit.data.load import (DataError, DataReport, chars_budget, cut_long_rows, looks_like_hub_id,
                                note_duplicates, read_rows, resolve_data_path, split_names, twin_split)
from alignkit.data.split import RowKeys, held_out_rows, overlaps
from alignkit.data.tokenize import Encoder
from alignkit.train.logging import phase

__all__ = ["Prepared", "load_split", "eval_source", "prepare_in_memory", "count_overlap", "content_key",
           "no_examples_message"]


@dataclass
class Prepared:
    train: List[Dict[str, Any]]
    eval: List[Dict[str, Any]]
    reports: List[DataReport] = field(default_factory=list)
    encoder: Optional[Encoder] = None

    def summary_lines(self) -> List[str]:
        return [line for r in self.reports for line in r.summary_lines()]


def load_split(source: str, split: str, role: str, kind: str, cfg: DataConfig, encoder: Encoder, **parse_kwargs):
    info: Dict[str, Any] = {}
    with _big_file_phase(source, "reading"):
        name, rows = read_rows(source, split=split, max_rows=cfg.max_rows, subset=cfg.subset, info=info)
    report = DataReport(source=name, role=role, split=info.get("split"), origin=info.get("origin"))
    rows = cut_long_rows(rows, chars_budget(encoder.tok, cfg.max_length), report)
    note_duplicates(rows, report)
    examples = parse_rows(rows, kind, report, **parse_kwargs)
    with _big_file_phase(source, f"tokenizing {len(examples)} examples of"):
        encoded = encoder.encode(kind, examples, report)
    report.examples = len(encoded)
    return encoded, report, RowKeys.of(examples)


BIG_FILE = 16 << 20  # bytes: reading and tokenizing a larger file shows a progress line


def _big_file_phase(source: str, what: str):
    """A progress indicator (spinner and elapsed time) while a big local file is read or tokenized."""
    path = resolve_data_path(source)
    size = path.stat().st_size if path.is_file() else 0
    if size < BIG_FILE:
        return contextlib.nullcontext()
    return phase(f"{what} {path} ({size / 2**20:.0f} MB)", label="data")


def no_examples_message(source: str, kind: str, report: DataReport) -> str:
    """One message for a side with no usable examples: the commonest reason once (with its field), not
    the report's lines again (the run prints those itself)."""
    head = f"{source}: no usable {kind} examples out of {report.rows_read} rows"
    if report.dropped:
        reason, n = report.dropped.most_common(1)[0]
        head += f"; {n} dropped: {reason}"
    return head + " (every row is listed in data_report.json)"


def content_key(item: Dict[str, Any]) -> str:
    """What an example says, without its row number: equal keys are the same training content."""
    return json.dumps({k: v for k, v in item.items() if k != "row"}, sort_keys=True, default=str)


def count_overlap(train: List[Dict[str, Any]], eval_items: List[Dict[str, Any]]) -> int:
    """Held-out examples whose content also appears among the training examples."""
    seen = {content_key(x) for x in train}
    return sum(content_key(x) in seen for x in eval_items)


def eval_source(cfg: DataConfig) -> Optional[Tuple[str, str]]:
    """(source, split) of the held-out data, or None (no held-out data, or a fraction of the training rows).

    ``data.eval_path`` with ``data.eval_split``, else the test twin of ``data.split`` in that dataset
    (``test_prefs`` for ``train_prefs``); without ``eval_path``: ``data.eval_split`` of the training
    dataset, else (when ``eval_fraction`` is 0) its test twin when it has one."""
    if cfg.eval_path:
        if cfg.eval_split:
            return cfg.eval_path, cfg.eval_split
        names = split_names(cfg.eval_path, cfg.subset)
        if names is None:  # a file: one table
            return cfg.eval_path, cfg.split
        twin = twin_split(cfg.split, names)
        if twin:
            return cfg.eval_path, twin
        same = resolve_data_path(cfg.eval_path).resolve() == resolve_data_path(cfg.path).resolve() \
            if not looks_like_hub_id(cfg.eval_path) else cfg.eval_path == cfg.path
        if len(names) == 1 and not same:
            return cfg.eval_path, names[0]
        if cfg.split in names and not same:
            return cfg.eval_path, cfg.split
        raise DataError(f"{cfg.eval_path}: which split is held out? It has {', '.join(names)} and none is the test "
                        f"twin of data.split={cfg.split!r}; set data.eval_split")
    if cfg.eval_split:
        if cfg.eval_split == cfg.split:
            raise DataError(f"data.eval_split={cfg.eval_split!r} is the training split; choose another split")
        return cfg.path, cfg.eval_split
    if cfg.eval_fraction > 0:
        return None
    twin = twin_split(cfg.split, split_names(cfg.path, cfg.subset))
    return (cfg.path, twin) if twin else None


def prepare_in_memory(kind, cfg, encoder, seed, require_eval, reports, **parse_kwargs) -> Prepared:
    train, report, keys = load_split(cfg.path, cfg.split, "train", kind, cfg, encoder, **parse_kwargs)
    eval_keys = keys
    reports.append(report)
    if not train:
        raise DataError(no_examples_message(cfg.path, kind, report))
    eval_items: List[Dict[str, Any]] = []
    source = eval_source(cfg)
    if source is not None:
        eval_items, ereport, eval_keys = load_split(source[0], source[1], "eval", kind, cfg, encoder, **parse_kwargs)
        reports.append(ereport)
        if not eval_items:
            raise DataError(f"{source[0]}: no usable {kind} examples for evaluation")
    elif cfg.eval_fraction > 0:
        # whole prompt groups (data.eval_split_by=prompt) or source rows; either way the expanded pairs
        # of one ranking row never straddle the split (data/split.py)
        held = held_out_rows([x["row"] for x in train], keys, cfg.eval_fraction, seed, cfg.eval_split_by, cfg.path)
        eval_items = [x for x in train if x["row"] in held]
        train = [x for x in train if x["row"] not in held]
        if not train:
            raise DataError(f"{cfg.path}: eval_fraction={cfg.eval_fraction} leaves no training examples")
        report.examples = len(train)
        unit = "prompts" if cfg.eval_split_by == "prompt" else "rows"
        groups = len({keys.prompt[r] for r in held})
        reports.append(DataReport(source=report.source, role="eval", origin=report.origin,
                                  split=f"{cfg.eval_fraction:g} of the training {unit} (seed {seed}): "
                                        f"{len(held)} row{'s' if len(held) != 1 else ''}, "
                                        f"{groups} prompt{'s' if groups != 1 else ''}",
                                  rows_read=len(held), examples=len(eval_items)))
    elif require_eval:
        raise DataError("this command needs held-out data: set data.eval_path, data.eval_split or data.eval_fraction")
    if eval_items:
        reports[-1].overlap_with_train = count_overlap(train, eval_items)
        shared = overlaps([x["row"] for x in train], keys, [x["row"] for x in eval_items], eval_keys)
        reports[-1].prompt_overlap_with_train = shared["prompt_overlap_with_train"]
        reports[-1].response_overlap_with_train = shared["response_overlap_with_train"]
    return Prepared(train, eval_items, reports, encoder)
