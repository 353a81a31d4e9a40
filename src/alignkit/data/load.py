"""Read raw rows from files, dataset directories or the hub, and keep the bookkeeping of bad rows."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from alignkit.models.default import check_hub_dataset


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


ROWS_INLINE = 1000  # data_report.json lists up to this many rows per side; all of them go to a side file beyond


@dataclass
class DataReport:
    """Counts and the row numbers of rows that were dropped, truncated or kept with a note, per reason.

    Nothing is dropped or truncated silently: every such row lands here (all of them, not a sample)
    and the trainers print the summary and write it to ``OUTPUT/data_report.json``. ``role`` is
    train or eval, ``split`` the split read (or how the held-out rows were chosen), ``origin`` where
    the rows came from (local file, dataset directory, Hugging Face Hub, built-in).
    """

    source: str = ""
    rows_read: int = 0
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    noted: Counter = field(default_factory=Counter)
    samples: List[Dict[str, Any]] = field(default_factory=list)  # every dropped/truncated/noted row
    role: str = "train"
    split: Optional[str] = None
    origin: Optional[str] = None
    overlap_with_train: Optional[int] = None
    prompt_overlap_with_train: Optional[int] = None  # held-out examples whose prompt is a training prompt
    response_overlap_with_train: Optional[int] = None  # held-out examples sharing a reply text with training
    unused: Counter = field(default_factory=Counter)  # row fields the command does not use -> rows
    duplicates: int = 0  # rows equal to an earlier row of the same side (kept)

    def note_unused(self, fields) -> None:
        """Fields of a kept row that this command does not use (reported, never dropped silently)."""
        self.unused.update(fields)

    def drop(self, row: int, reason: str, fieldname: Optional[str] = None) -> None:
        self.dropped[reason] += 1
        self._note("dropped", row, reason, fieldname)

    def truncate(self, row: int, reason: str, fieldname: Optional[str] = None) -> None:
        self.truncated[reason] += 1
        self._note("truncated", row, reason, fieldname)

    def note_duplicate(self, row: int, first: int) -> None:
        """A row equal to row ``first`` (kept: it weighs once more in training; listed, and warned about)."""
        self.duplicates += 1
        self.samples.append({"what": "kept", "file": self.source, "row": row, "reason": "duplicate row",
                             "same_as": first})

    def note(self, row: int, reason: str, fieldname: Optional[str] = None) -> None:
        """A row that is kept but worth knowing about (e.g. an empty SFT prompt)."""
        self.noted[reason] += 1
        self._note("kept", row, reason, fieldname)

    def _note(self, what: str, row: int, reason: str, fieldname: Optional[str]) -> None:
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
        self.noted.update(other.noted)
        self.duplicates += other.duplicates
        self.samples.extend(other.samples)

    def summary_lines(self) -> List[str]:
        where = ", ".join(x for x in (self.origin, f"split {self.split}" if self.split else None) if x)
        head = f"{self.role} data: {self.source}" + (f" ({where})" if where else "")
        lines = [f"{head}: {self.rows_read} rows read, {self.examples} examples kept"]
        rows = self._rows_by_reason()
        shown = 0
        for what, counts in (("dropped", self.dropped), ("truncated", self.truncated)):
            for reason, n in sorted(counts.items()):
                lines.append(f"  {what} {n}: {reason}")
                if shown < 5:  # the reason once, then where its rows are (never one line per row)
                    lines.extend(rows.get((what, reason), [])[:2])
                    shown += 1
        if self.unused:
            lines.append("  fields not used: " + ", ".join(f"{k} ({n} rows)" for k, n in sorted(self.unused.items())))
        for reason, n in sorted(self.noted.items()):
            lines.append(f"  kept {n}: {reason}")
            if shown < 5:
                lines.extend(rows.get(("kept", reason), [])[:2])
                shown += 1
        if len(self.samples) > 5:
            lines.append("    ... every row is listed in data_report.json")
        if self.duplicates:
            first = next(s for s in self.samples if s["reason"] == "duplicate row")
            lines.append(f"  warning: {self.duplicates} rows repeat an earlier row exactly (kept, so those examples "
                         f"weigh more; e.g. row {first['row']} = row {first['same_as']}; all in data_report.json)")
        if self.overlap_with_train:
            lines.append(f"  warning: {self.overlap_with_train} of {self.examples} eval examples also appear in "
                         f"the training data (same content): held-out numbers are optimistic")
        if self.prompt_overlap_with_train:
            lines.append(f"  warning: {self.prompt_overlap_with_train} of {self.examples} eval examples share their "
                         f"prompt with training rows: held-out numbers are optimistic")
        if self.response_overlap_with_train:
            lines.append(f"  note: {self.response_overlap_with_train} of {self.examples} eval examples share a reply "
                         f"text with training rows (under another prompt)")
        return lines

    def _rows_by_reason(self, rows: int = 5) -> Dict[Tuple[str, str], List[str]]:
        """(what, reason) -> lines naming the file, the first row numbers and the field of its rows."""
        grouped: Dict[Tuple[str, str, str, Optional[str]], List[Any]] = {}
        for s in self.samples:
            grouped.setdefault((s["what"], s["reason"], s["file"], s.get("field")), []).append(s["row"])
        out: Dict[Tuple[str, str], List[str]] = {}
        for (what, reason, file, fieldname), nums in grouped.items():
            more = f" (+{len(nums) - rows} more)" if len(nums) > rows else ""
            where = (f"{file} row{'s' if len(nums) > 1 else ''} {', '.join(str(n) for n in nums[:rows])}{more}"
                     + (f" field {fieldname!r}" if fieldname else ""))
            out.setdefault((what, reason), []).append(f"    e.g. {where}")
        return out

    def to_dict(self, rows_file: Optional[str] = None) -> Dict[str, Any]:
        """The ``data_report.json`` entry. ``rows_file``: when the rows are too many to list inline
        (more than ``ROWS_INLINE``) they are in that side file and the entry names it."""
        out = {"role": self.role, "source": self.source, "origin": self.origin, "split": self.split,
               "rows_read": self.rows_read, "examples": self.examples, "dropped": dict(self.dropped),
               "truncated": dict(self.truncated), "kept_with_note": dict(self.noted),
               "unused_fields": dict(self.unused), "duplicate_rows": self.duplicates}
        for key in ("overlap_with_train", "prompt_overlap_with_train", "response_overlap_with_train"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if rows_file and len(self.samples) > ROWS_INLINE:
            out["rows_file"] = rows_file
            out["samples"] = self.samples[:20]
        else:
            out["samples"] = self.samples
        return out


def write_data_report(reports: List["DataReport"], out: Path) -> Path:
    """``out/data_report.json`` (one entry per side) and, when some side has more than ``ROWS_INLINE``
    listed rows, ``out/data_report_rows.jsonl`` with every one of them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    side = "data_report_rows.jsonl"
    many = [r for r in reports if len(r.samples) > ROWS_INLINE]
    if many:
        with (out / side).open("w") as f:
            for r in many:
                for entry in r.samples:
                    f.write(json.dumps({"role": r.role, **entry}) + "\n")
    path = out / "data_report.json"
    path.write_text(json.dumps([r.to_dict(side) for r in reports], indent=2))
    return path


def note_duplicates(rows: List[Tuple[int, Dict[str, Any]]], report: DataReport) -> None:
    """Count (in ``report``) the rows equal to an earlier row; they are kept, not dropped."""
    first: Dict[bytes, int] = {}
    for n, row in rows:
        key = hashlib.blake2b(json.dumps(row, sort_keys=True, default=str).encode(), digest_size=16).digest()
        if key in first:
            report.note_duplicate(n, first[key])
        else:
            first[key] = n


def chars_budget(tokenizer, max_length: int) -> int:
    """Characters of one text kept from each end of a text before tokenizing: more than ``max_length``
    tokens can cover (a token spells at most as many characters as its longest vocabulary string, in
    byte-level and sentencepiece vocabularies alike), plus a margin, so cutting the middle out never
    changes the tokens that truncation keeps."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return (max_length + 16) * max(longest, 1) * 2


def cut_long_rows(rows: List[Tuple[int, Dict[str, Any]]], budget: int, report: DataReport
                  ) -> List[Tuple[int, Dict[str, Any]]]:
    """Rows whose texts longer than ``2 * budget`` characters keep only their first and last ``budget``
    characters (a 50 MB row is cut here, before tokenizing, instead of costing minutes and gigabytes);
    each such row is counted in ``report`` as truncated, with its field. Truncation to max_length
    keeps the start of a response and the end of a prompt: both ends survive the cut."""
    reason = f"text over {2 * budget} characters: cut while reading, before tokenizing"

    def cut(value: Any, path: str, fields: List[str]) -> Any:
        if isinstance(value, str):
            if len(value) <= 2 * budget:
                return value
            fields.append(path)
            return value[:budget] + value[-budget:]
        if isinstance(value, dict):
            return {k: cut(v, f"{path}.{k}" if path else str(k), fields) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v, f"{path}[{i}]", fields) for i, v in enumerate(value)]
        return value

    out = []
    for n, row in rows:
        fields: List[str] = []
        row = cut(row, "", fields)
        if fields:
            report.truncate(n, reason, ", ".join(fields))
        out.append((n, row))
    return out


def _utf8_error(path: Path, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> "DataError":
    line = first_line + data.count(b"\n", 0, e.start)
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
                     f"re-save the file as UTF-8")


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); a bad byte names its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None


def write_jsonl(path: Path, rows) -> int:
    """Write ``rows`` (dicts) to ``path`` as JSON lines (UTF-8, non-ASCII kept; values JSON cannot hold,
    such as paths, as their strings), creating its folder. Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def _read_jsonl(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, raw, e, lineno) from None
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
        data = json.loads(_decode(path, path.read_bytes()))
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
    # utf-8-sig: a byte-order mark (Excel writes one) must not become part of the first column's name
    text = _decode(path, path.read_bytes())
    for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):  # line 1 is the header
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


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml",
                 ".gz", ".zst", ".bz2", ".xz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BARE_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(name: str, allow_bare: bool = False) -> bool:
    """Whether ``name`` can only mean a Hugging Face Hub repository: ``owner/name`` (``name`` alone
    with ``allow_bare``, as old model ids like ``gpt2``), not a path (no leading ``.``/``/``/``~``,
    one slash at most, no data-file extension)."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    if Path(name).suffix.lower() in DATA_SUFFIXES:
        return False
    if "/" in name and Path(name.split("/")[0]).is_dir():  # runs/sft: meant as a path under ./runs
        return False
    return bool(_HUB_ID.match(name) or (allow_bare and _BARE_HUB_ID.match(name)))


HUB_LAYOUT_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")
_SHARD = re.compile(r"^(?P<split>[^-]+?)(?:-.*)?$")  # train_prefs-00000-of-00001 -> train_prefs


def hub_layout_splits(path: Path) -> Optional[Dict[str, List[Path]]]:
    """The splits of a folder laid out as a Hub dataset repository, each with its files in name order:
    ``data/train_prefs-00000-of-00001.parquet`` and ``train.jsonl`` (split = the file name up to its first
    ``-``), or ``data/train/*.parquet`` (split = the folder). None for a ``datasets.save_to_disk``
    directory (``dataset_dict.json`` / ``state.json``) or a folder with no data files."""
    path = Path(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return None
    splits: Dict[str, List[Path]] = {}
    for root in (path, path / "data"):
        if not root.is_dir():
            continue
        for f in sorted(root.iterdir()):
            if f.name.startswith((".", "_")) or (root == path and f.name == "data"):
                continue
            if f.is_file() and f.suffix.lower() in HUB_LAYOUT_SUFFIXES:
                splits.setdefault(_SHARD.match(f.name[:-len(f.suffix)]).group("split"), []).append(f)
            elif f.is_dir():
                files = [g for g in sorted(f.iterdir()) if g.is_file() and g.suffix.lower() in HUB_LAYOUT_SUFFIXES]
                if files:
                    splits.setdefault(f.name, []).extend(files)
    return splits or None


def _read_file(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import Dataset

        return _read_dataset(Dataset.from_parquet(str(path)))
    raise DataError(f"{path}: unknown file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _read_hub_layout(path: Path, files: List[Path]) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Rows of a split's files in order: one file keeps its own numbers (JSONL lines, parquet indices);
    several shards are numbered 0, 1, ... across them, in file-name order."""
    if len(files) == 1:
        yield from _read_file(files[0])
        return
    i = 0
    for f in files:
        for _, row in _read_file(f):
            yield i, row
            i += 1


def split_names(source: str, subset: Optional[str] = None) -> Optional[List[str]]:
    """The splits of a dataset directory or hub dataset; None for a file (one table, no splits)."""
    path = resolve_data_path(source)
    if path.is_dir():
        layout = hub_layout_splits(path)
        if layout is not None:
            return list(layout)
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - report any loader failure with the path
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({_one_line(e)})") from None
        return list(ds) if isinstance(ds, DatasetDict) else None
    if path.exists() or not looks_like_hub_id(source):
        return None
    if check_hub_dataset(source):  # unreachable: read_rows says so in one line
        return None
    try:
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import get_dataset_split_names

        return list(get_dataset_split_names(source, subset))
    except Exception:  # noqa: BLE001 - read_rows reports the hub failure itself
        return None


def twin_split(split: str, names: Optional[List[str]]) -> Optional[str]:
    """The held-out twin of a training split among ``names``: ``test_prefs`` for ``train_prefs``,
    ``test`` for ``train``, else the same with validation/valid/eval/dev."""
    if not names or "train" not in split:
        return None
    for held in ("test", "validation", "valid", "eval", "dev"):
        cand = split.replace("train", held)
        if cand in names and cand != split:
            return cand
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def read_rows(source: str, split: str = "train", max_rows: Optional[int] = None, subset: Optional[str] = None,
              info: Optional[Dict[str, Any]] = None) -> Tuple[str, List[Tuple[int, Dict[str, Any]]]]:
    """Return (display name, [(row number, row dict)]) for a file, a dataset directory or a hub name.

    Row numbers are 1-based line numbers for JSONL/CSV and 0-based indices otherwise, so the number
    in an error message is the one a user finds in the file. The Hub is asked only for names that
    look like hub ids (``owner/name``) and are not local paths; a missing path is "no such file or
    directory". ``info`` (a dict) receives ``origin`` and ``split`` (None for a file).
    """
    info = {} if info is None else info
    path = resolve_data_path(source)
    info["split"] = None
    layout = hub_layout_splits(path) if path.is_dir() else None
    if layout is not None:  # a folder laid out as on the Hub: data/train_prefs-00000-of-00001.parquet
        if split not in layout:
            raise DataError(f"{path}: no split {split!r} (its files give {', '.join(layout)}); set the split to "
                            f"one of them")
        info["origin"] = "local folder (Hub layout: " + ", ".join(
            str(f.relative_to(path)) for f in layout[split][:3]) + (" ..." if len(layout[split]) > 3 else "") + ")"
        info["split"] = split
        rows = _read_hub_layout(path, layout[split])
    elif path.is_dir():
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - report any loader failure with the path
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({_one_line(e)})") from None
        info["origin"] = "local dataset directory"
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (has {', '.join(ds)}); set the split to one of them")
            ds = ds[split]
            info["split"] = split
        rows = _read_dataset(ds)
    elif path.exists():
        info["origin"] = "built-in dataset" if source.startswith(BUILTIN_PREFIX) else "local file"
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".parquet":
            # deferred: datasets (slow import) loads only for Hub / Arrow inputs
            from datasets import Dataset

            rows = _read_dataset(Dataset.from_parquet(str(path)))
        else:
            raise DataError(f"{path}: unknown file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    else:
        if not looks_like_hub_id(source):
            raise DataError(f"{source}: no such file or directory")
        info["origin"] = "Hugging Face Hub" + (f", subset {subset}" if subset else "")
        info["split"] = split
        unreachable = check_hub_dataset(source)  # one line now instead of a minute of retries
        if unreachable:
            raise DataError(unreachable)
        try:
            # deferred: datasets (slow import) loads only for Hub / Arrow inputs
            from datasets import load_dataset

            rows = _read_dataset(load_dataset(source, subset, split=split))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source}: no such local file or directory, and loading it from the Hugging Face Hub "
                            f"failed ({_one_line(e)})") from None
    out = []
    for n, row in rows:
        out.append((n, row))
        if max_rows and len(out) >= max_rows:
            break
    return str(source), out
