"""Data layer: read rows, recognize shapes, tokenize, collate.

``prepare(kind, cfg, tokenizer)`` is the one entry point trainers use: in memory
(:mod:`alignkit.data.prepared`), streamed (:mod:`alignkit.data.stream`) or mixed (:mod:`alignkit.data.mix`).
"""

from __future__ import annotations

from typing import List

from alignkit.config import DataConfig
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataError, DataReport, read_rows
from alignkit.data.mix import prepare_mix
from alignkit.data.prepared import Prepared, prepare_in_memory
from alignkit.data.stream import prepare_streaming
from alignkit.data.tokenize import Encoder

__all__ = ["prepare", "Prepared", "DataError", "DataReport", "Encoder", "read_rows", "parse_rows"]


def prepare(kind: str, cfg: DataConfig, tokenizer, seed: int = 0, require_eval: bool = False,
            **parse_kwargs) -> Prepared:
    """Load, parse and tokenize training (and held-out) data of ``kind``.

    kind: sft | preference | unpaired | prompt. Raises DataError when nothing usable is left; the
    error carries the reports read so far (``error.reports``) so the caller can still write them.
    Held-out data: see :func:`~alignkit.data.prepared.eval_source`; each side's report names its source,
    split and counts, and held-out examples that repeat a training example are counted
    (``overlap_with_train``).
    """
    if not cfg.path and not cfg.mix:
        raise DataError("no training data: pass --data FILE (or data.path=..., or data.mix)")
    encoder = Encoder(tokenizer, cfg)
    reports: List[DataReport] = []
    try:
        if cfg.streaming:  # data/stream.py: training examples read lazily, by position
            return prepare_streaming(kind, cfg, encoder, seed, require_eval, reports, **parse_kwargs)
        if cfg.mix:  # data/mix.py: several datasets sampled by weight
            return prepare_mix(kind, cfg, encoder, seed, require_eval, reports, **parse_kwargs)
        return prepare_in_memory(kind, cfg, encoder, seed, require_eval, reports, **parse_kwargs)
    except DataError as e:
        e.reports = reports  # type: ignore[attr-defined]
        raise
