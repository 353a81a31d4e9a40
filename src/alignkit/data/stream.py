"""``data.streaming``: training examples read lazily, with exact resume.

The loop asks for global batch ``k``; a stream answers with the examples at positions
``[k * G, (k + 1) * G)`` of one fixed, deterministic sequence (G: the global batch). The sequence is
each dataset's rows in their order (a JSONL file line by line, a hub dataset through
``load_dataset(..., streaming=True)``, a save_to_disk or parquet table row by row), parsed and
tokenized one row at a time, optionally shuffled within a seeded buffer (``data.shuffle_buffer``),
passes repeated end to end, and, with ``data.mix``, interleaved by a seeded weighted draw per position
(dataset i at each position with probability ``w_i / sum(w)``; a dataset that runs out starts its next
pass). As in the in-memory loop the position is just the step number, so a resumed run re-reads the
stream up to ``step * G`` and trains on exactly the examples a straight run would (no sampler state in
checkpoints). The cost is reading (and tokenizing) the skipped rows again at resume.

Each dataset's report counts the rows of its first pass as they are read; the run rewrites
``data_report.json`` at the end with everything read. Something that needs every example up front
(precomputed reference log-probs, KTO's mismatched pairs, reward-model rankings, online prompts) raises
a :class:`DataError` saying so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from alignkit.config import MixSource
from alignkit.data.formats import parse_rows
from alignkit.data.load import (BUILTIN_PREFIX, DataError, DataReport, _read_csv, _read_dataset, _read_json,
                                _read_jsonl, _one_line, looks_like_hub_id, resolve_data_path)
from alignkit.data.mix import source_config
from alignkit.data.prepared import Prepared, eval_source, load_split
from alignkit.data.tokenize import Encoder
from alignkit.models.default import check_hub_dataset

RowFactory = Callable[[], Iterator[Tuple[int, Dict[str, Any]]]]
STREAMING_KINDS = ("sft", "preference")


@dataclass
class StreamReport(DataReport):
    """A streamed dataset's report: counts of the rows read so far (first pass)."""

    passes_started: int = 0
    weight: Optional[float] = None

    def summary_lines(self) -> List[str]:
        lines = super().summary_lines()
        what = "streaming: rows are read as training goes (counts so far; data_report.json is rewritten at the end)"
        if self.weight is not None:
            what += f"; mix weight {self.weight:g}"
        lines.insert(1, "  " + what)
        return lines

    def to_dict(self, rows_file: Optional[str] = None) -> Dict[str, Any]:
        out = super().to_dict(rows_file)
        out["streaming"] = {"passes_started": self.passes_started}
        if self.weight is not None:
            out["streaming"]["mix_weight"] = self.weight
        return out


def row_factory(source: str, split: str = "train", subset: Optional[str] = None,
                info: Optional[Dict[str, Any]] = None) -> RowFactory:
    """A function giving a fresh iterator of (row number, row) over ``source``, read lazily: JSONL/CSV/JSON
    files, parquet (row group by row group), a save_to_disk directory (memory-mapped), a hub dataset
    (``streaming=True``). ``info`` receives origin and split as :func:`read_rows` gives them."""
    info = {} if info is None else info
    path = resolve_data_path(source)
    info["split"] = None
    if path.is_dir():
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({_one_line(e)})") from None
        info["origin"] = "local dataset directory"
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (has {', '.join(ds)}); set the split to one of them")
            ds, info["split"] = ds[split], split
        return lambda: _read_dataset(ds)
    if path.exists():
        info["origin"] = "built-in dataset" if source.startswith(BUILTIN_PREFIX) else "local file"
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".csv": _read_csv, ".json": _read_json,
                   ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{path}: unknown file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
        return lambda: readers[suffix](path)
    if not looks_like_hub_id(source):
        raise DataError(f"{source}: no such file or directory")
    info["origin"] = "Hugging Face Hub, streaming" + (f", subset {subset}" if subset else "")
    info["split"] = split
    unreachable = check_hub_dataset(source)
    if unreachable:
        raise DataError(unreachable)
    try:
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import load_dataset

        ds = load_dataset(source, subset, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{source}: no such local file or directory, and streaming it from the Hugging Face Hub "
                        f"failed ({_one_line(e)})") from None
    return lambda: _read_dataset(ds)


def iterable_factory(rows) -> RowFactory:
    """A factory over an in-memory or lazy re-iterable of row dicts (a ``datasets.IterableDataset``, a
    list): row numbers are 0-based positions."""
    return lambda: ((i, dict(r)) for i, r in enumerate(rows))


def _read_parquet(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield n, row
            n += 1


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded buffer shuffle: fill ``size`` slots, then for each new item hand out a random slot's item
    and put the new one in its place; at the end the rest in random order."""
    buf: List[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = it
    rng.shuffle(buf)
    yield from buf


class StreamingItems:
    """The training examples of a streaming run, by position (module docstring). The loop reads
    :meth:`global_batch`; ``items[a:b]`` reads positions a..b-1."""

    def __init__(self, sources: Sequence[Tuple[str, RowFactory, float]], reports: Sequence[StreamReport],
                 kind: str, encoder, seed: int = 0, shuffle_buffer: int = 0, **parse_kwargs):
        self.sources, self.reports = list(sources), list(reports)
        self.kind, self.encoder, self.seed, self.shuffle_buffer = kind, encoder, seed, shuffle_buffer
        self.parse_kwargs = parse_kwargs
        self._counted = [0] * len(self.sources)  # first-pass rows already in each report
        self._gen: Optional[Iterator[Dict[str, Any]]] = None
        self._pos = 0
        self._window: Dict[int, Dict[str, Any]] = {}
        self.all_reports: List[DataReport] = list(self.reports)

    # ---------------------------------------------------------------- the sequence
    def _examples(self, i: int) -> Iterator[Dict[str, Any]]:
        """Dataset i's encoded examples, pass after pass (its report counts the first pass once)."""
        name, factory, _ = self.sources[i]
        report = self.reports[i]
        p = 0
        while True:
            report.passes_started = max(report.passes_started, p + 1)
            got = 0
            for j, (n, row) in enumerate(factory()):
                counting = p == 0 and j >= self._counted[i]
                rep = report if counting else DataReport(source=report.source, role=report.role)
                examples = parse_rows([(n, row)], self.kind, rep, **self.parse_kwargs)
                items = self.encoder.encode(self.kind, examples, rep) if examples else []
                if counting:
                    self._counted[i] = j + 1
                got += len(items)
                yield from items
            if not got:
                raise DataError(f"{name}: no usable {self.kind} examples in the stream ({report.rows_read} rows read; "
                                f"every row is listed in data_report.json)")
            p += 1

    def _sequence(self) -> Iterator[Dict[str, Any]]:
        streams = []
        for i in range(len(self.sources)):
            ex = self._examples(i)
            if self.shuffle_buffer > 1:
                ex = _shuffled(ex, self.shuffle_buffer, random.Random(f"alignkit.stream:{self.seed}:{i}"))
            streams.append(ex)
        if len(streams) == 1:
            yield from streams[0]
            return
        weights = [w for _, _, w in self.sources]
        rng = random.Random(f"alignkit.stream.mix:{self.seed}")
        idx = list(range(len(streams)))
        while True:
            yield next(streams[rng.choices(idx, weights)[0]])

    # ---------------------------------------------------------------- access by position
    def get(self, start: int, stop: int) -> List[Dict[str, Any]]:
        """The examples at positions ``start .. stop - 1``; positions before ``start`` are forgotten. Going
        back (a position already forgotten) reads the stream again from its start."""
        if self._gen is None or start < min(self._window, default=self._pos):
            self._gen, self._pos, self._window = self._sequence(), 0, {}
        while self._pos < stop:
            item = next(self._gen)
            if self._pos >= start:
                self._window[self._pos] = item
            self._pos += 1
        for p in [p for p in self._window if p < start]:
            del self._window[p]
        return [self._window[p] for p in range(start, stop)]

    def global_batch(self, step: int, size: int) -> List[Dict[str, Any]]:
        """Global batch ``step``: positions ``[step * size, (step + 1) * size)``."""
        return self.get(step * size, (step + 1) * size)

    def __getitem__(self, key):
        if isinstance(key, slice) and (key.step or 1) == 1 and key.stop is not None:
            return self.get(key.start or 0, key.stop)
        if isinstance(key, int) and key >= 0:
            return self.get(key, key + 1)[0]
        raise TypeError("streamed examples are read by position: items[a:b] or items[i]")

    def _needs_all(self, *_):
        raise DataError("this run reads every training example up front (precomputed reference log-probs, KTO's "
                        "mismatched pairs, reward-model rankings or online prompts), which data.streaming does not "
                        "allow; set data.streaming=false (or a reference that is not precomputed)")

    __iter__ = __len__ = _needs_all

    def __bool__(self) -> bool:
        return True


def prepare_streaming(kind: str, cfg, encoder, seed: int, require_eval: bool, reports: List[DataReport],
                      **parse_kwargs):
    """:func:`alignkit.data.prepare` with ``data.streaming``: the training side as :class:`StreamingItems`
    (its first examples read now, so a file with no usable row fails before the model loads); the
    held-out side read whole as usual (``data.eval_path``, else each dataset's eval_split or test twin)."""
    if kind not in STREAMING_KINDS:
        raise DataError(f"data.streaming works for sft and preference data (dpo and its family); this command reads "
                        f"{kind} data, which it needs whole: set data.streaming=false")
    if cfg.eval_fraction > 0:
        raise DataError("data.eval_fraction needs every row up front, which data.streaming does not allow; hold out "
                        "data with data.eval_path or data.eval_split")
    if cfg.mix and cfg.path:
        raise DataError("set data.path or data.mix, not both (data.mix lists every training dataset)")
    mix = list(cfg.mix) or [MixSource(path=cfg.path, split=cfg.split, subset=cfg.subset)]
    sources, stream_reports, evals = [], [], []
    for src in mix:
        sub = source_config(cfg, src)
        info: Dict[str, Any] = {}
        factory = row_factory(sub.path, sub.split, sub.subset, info)
        rep = StreamReport(source=str(sub.path), role="train", split=info.get("split"), origin=info.get("origin"),
                           weight=src.weight if cfg.mix else None)
        sources.append((str(sub.path), factory, src.weight))
        stream_reports.append(rep)
        reports.append(rep)
        if not cfg.eval_path:
            where = eval_source(sub)
            if where is not None:
                items, erep, _keys = load_split(where[0], where[1], "eval", kind, sub, encoder, **parse_kwargs)
                reports.append(erep)
                evals.extend(items)
    if cfg.eval_path:
        where = eval_source(source_config(cfg, mix[0]))
        if where is not None:
            evals, erep, _keys = load_split(where[0], where[1], "eval", kind, cfg, encoder, **parse_kwargs)
            reports.append(erep)
    if require_eval and not evals:
        raise DataError("this command needs held-out data: set data.eval_path or data.eval_split")
    train = StreamingItems(sources, stream_reports, kind, encoder, seed, cfg.shuffle_buffer, **parse_kwargs)
    train.all_reports = reports  # every side's report, rewritten into data_report.json at the end of the run
    train.get(0, 1)  # a stream with no usable example fails here, with its report
    return Prepared(train, evals, reports, encoder)


def stream_rows(kind: str, rows, cfg, tokenizer, seed: int = 0, name: str = "dataset", **parse_kwargs):
    """A :class:`~alignkit.data.Prepared` whose training side streams ``rows``: any re-iterable of row
    dicts, such as a ``datasets.IterableDataset`` (each pass iterates it again) or a list. For the
    Python API; ``cfg`` (a DataConfig) gives the tokenization settings and ``shuffle_buffer``. The
    held-out side is empty (pass held-out examples to the trainer yourself)."""
    if kind not in STREAMING_KINDS:
        raise DataError(f"streaming works for sft and preference data; {kind} data is needed whole")
    encoder = Encoder(tokenizer, cfg)
    report = StreamReport(source=name, role="train", origin="in-memory iterable")
    train = StreamingItems([(name, iterable_factory(rows), 1.0)], [report], kind, encoder, seed, cfg.shuffle_buffer,
                           **parse_kwargs)
    train.get(0, 1)
    return Prepared(train, [], [report], encoder)
