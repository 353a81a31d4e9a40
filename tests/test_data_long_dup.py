"""Cases 13 and 14 of issue 32: long rows cut while reading (counted), duplicate rows counted and warned."""

import json
import random

import pytest

from alignkit.config import DataConfig
from alignkit.data import Encoder, prepare
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataReport, chars_budget, write_data_report
from tests.helpers import pref_rows, sft_rows, write_jsonl


def _text(n, seed):
    rng = random.Random(seed)
    return "".join(rng.choice("abc de\n") for _ in range(n))


def _uncut(kind, rows, cfg, tok):
    """The slow way: the whole rows through the encoder (what main did)."""
    report = DataReport(source="x")
    return Encoder(tok, cfg).encode(kind, parse_rows(list(enumerate(rows, 1)), kind, report), report)


@pytest.mark.parametrize("kind,rows", [
    ("sft", [{"prompt": _text(30_000, 1), "completion": _text(30_000, 2)}] + sft_rows(3)),
    ("preference", [{"prompt": _text(30_000, 3), "chosen": _text(20_000, 4), "rejected": "no"}] + pref_rows(3, 0)),
    ("sft", [{"messages": [{"role": "user", "content": _text(25_000, 5)},
                           {"role": "assistant", "content": _text(25_000, 6)}]}] + sft_rows(3)),
])
def test_long_rows_are_cut_before_tokenizing_with_the_same_result(tiny_tok, tmp_path, kind, rows):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=32)
    budget = chars_budget(tiny_tok, cfg.max_length)
    assert 2 * budget < 20_000  # the long row is over the budget
    prepared = prepare(kind, cfg, tiny_tok)
    report = prepared.reports[0]
    cut = [s for s in report.samples if "cut while reading" in s["reason"]]
    assert [s["row"] for s in cut] == [1]  # counted, with its fields, in data_report.json
    assert "completion" in cut[0]["field"] or "chosen" in cut[0]["field"] or "content" in cut[0]["field"]
    doc = json.loads(write_data_report(prepared.reports, tmp_path / "out").read_text())
    assert sum(n for r, n in doc[0]["truncated"].items() if "cut while reading" in r) == 1
    # the tokens kept after truncation to max_length are exactly those of the uncut row
    full = _uncut(kind, rows, cfg, tiny_tok)
    strip = lambda items: [{k: v for k, v in x.items() if k != "row"} for x in items]  # noqa: E731
    assert strip(prepared.train) == strip(full)


def test_short_rows_are_not_touched(tiny_tok, tmp_path):
    rows = [{"prompt": f"n={k}:", "completion": " " + "xy" * k} for k in range(1, 7)]  # all distinct
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=32)
    report = prepare("sft", cfg, tiny_tok).reports[0]
    assert report.truncated == {} and report.duplicates == 0


def test_duplicate_rows_are_counted_reported_and_kept(tiny_tok, tmp_path):
    rows = [{"prompt": f"n={k}:", "completion": " " + "xy" * k} for k in range(1, 5)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows * 3)), max_length=64)
    prepared = prepare("sft", cfg, tiny_tok)
    report = prepared.reports[0]
    assert report.duplicates == 8 and len(prepared.train) == 12  # every row 3 times: 8 repeats, none dropped
    assert any("8 rows repeat an earlier row" in line for line in prepared.summary_lines())
    doc = json.loads(write_data_report(prepared.reports, tmp_path / "out").read_text())
    assert doc[0]["duplicate_rows"] == 8
    dup = [s for s in doc[0]["samples"] if s["reason"] == "duplicate row"]
    assert (dup[0]["row"], dup[0]["same_as"]) == (5, 1)  # JSONL line 5 repeats line 1
