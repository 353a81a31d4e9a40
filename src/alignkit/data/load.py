"""Read raw rows from files, dataset directories or the hub, and keep the bookkeeping of bad rows."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


@dataclass
class DataReport:
    """Counts and examples of rows that were dropped or changed, per reason.

    Nothing is dropped or truncated silently: every such row lands here and the trainers print the
    summary and write it to ``OUTPUT/data_report.json``.
    """

    source: str = ""
    rows_read: int = 0
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    max_samples: int = 20
    unused: Counter = field(default_factory=Counter)  # row fields the command does not use -> rows

    def note_unused(self, fields) -> None:
        """Fields of a kept row that this command does not use (reported, never dropped silently)."""
        self.unused.update(fields)

    def drop(self, row: int, reason: str, fieldname: Optional[str] = None) -> None:
        self.dropped[reason] += 1
        self._note("dropped", row, reason, fieldname)

    def truncate(self, row: int, reason: str) -> None:
        self.truncated[reason] += 1
        self._note("truncated", row, reason, None)

    def _note(self, what: str, row: int, reason: str, fieldname: Optional[str]) -> None:
        if len(self.samples) < self.max_samples:
            entry = {"what": what, "file": self.source, "row": row, "reason": reason}
            if fieldname:
                entry["field"] = fieldname
            self.samples.append(entry)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated.values())

    def merge(self, other: "DataReport") -> None:
        self.rows_read += other.rows_read
        self.examples += other.examples
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)
        self.unused.update(other.unused)
        self.samples.extend(other.samples[: max(0, self.max_samples - len(self.samples))])

    def summary_lines(self) -> List[str]:
        lines = [f"{self.source}: {self.rows_read} rows read, {self.examples} examples kept"]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n}: {reason}")
        for reason, n in sorted(self.truncated.items()):
            lines.append(f"  truncated {n}: {reason}")
        if self.unused:
            lines.append("  fields not used: " + ", ".join(f"{k} ({n} rows)" for k, n in sorted(self.unused.items())))
        for s in self.samples[:5]:
            where = f"{s['file']} row {s['row']}" + (f" field {s['field']!r}" if "field" in s else "")
            lines.append(f"    e.g. {where}: {s['what']} ({s['reason']})")
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "examples": self.examples,
                "dropped": dict(self.dropped), "truncated": dict(self.truncated), "samples": self.samples,
                "unused_fields": dict(self.unused)}


def _read_jsonl(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _read_json(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        # {"data": [...]} or a dict of columns
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            data = next(iter(lists.values()))
        elif lists and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            raise DataError(f"{path}: expected a list of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _read_csv(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            yield i, {k: _maybe_json(v) for k, v in row.items()}


def _maybe_json(v: Any) -> Any:
    # CSV cells holding JSON lists (message lists, rankings) are decoded; everything else stays text
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _read_dataset(ds) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for i, row in enumerate(ds):
        yield i, dict(row)


BUILTIN_PREFIX = "builtin:"


def resolve_data_path(source: str) -> Path:
    """``builtin:NAME`` names a small dataset shipped in alignkit/resources (NAME.jsonl)."""
    if source.startswith(BUILTIN_PREFIX):
        from importlib.resources import files

        name = source[len(BUILTIN_PREFIX):]
        path = Path(str(files("alignkit") / "resources" / f"{name}.jsonl"))
        if not path.exists():
            known = sorted(p.name[:-6] for p in path.parent.glob("*.jsonl"))
            raise DataError(f"{source}: no such built-in dataset (have: {', '.join(known)})")
        return path
    return Path(source).expanduser()


def read_rows(source: str, split: str = "train", max_rows: Optional[int] = None) -> Tuple[str, List[Tuple[int, Dict[str, Any]]]]:
    """Return (display name, [(row number, row dict)]) for a file, a dataset directory or a hub name.

    Row numbers are 1-based line numbers for JSONL/CSV and 0-based indices otherwise, so the number
    in an error message is the one a user finds in the file.
    """
    path = resolve_data_path(source)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - report any loader failure with the path
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({e})") from None
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        rows = _read_dataset(ds)
    elif path.exists():
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".parquet":
            from datasets import Dataset

            rows = _read_dataset(Dataset.from_parquet(str(path)))
        else:
            raise DataError(f"{path}: unknown file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    else:
        if "/" not in source or source.startswith((".", "/", "~")):
            raise DataError(f"{source}: no such file or directory")
        try:
            from datasets import load_dataset

            rows = _read_dataset(load_dataset(source, split=split))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source}: not a local file and could not be loaded from the hub ({e})") from None
    out = []
    for n, row in rows:
        out.append((n, row))
        if max_rows and len(out) >= max_rows:
            break
    return str(source), out
