"""Every supported row shape parses; bad rows are counted with file, row and field."""

import json

import pytest

from alignkit.config import DataConfig
from alignkit.data import DataError, prepare
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataReport, read_rows
from tests.helpers import write_jsonl


def parse(kind, rows, **kw):
    report = DataReport(source="mem")
    out = parse_rows(list(enumerate(rows, start=1)), kind, report, **kw)
    return out, report


def test_sft_shapes():
    out, rep = parse("sft", [
        {"prompt": "Q", "completion": "A"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"text": "plain text"},
    ])
    assert rep.n_dropped == 0
    assert (out[0].prompt, out[0].completion) == ("Q", "A")
    assert out[1].messages[1] == {"role": "assistant", "content": "yo"}
    assert (out[2].prompt, out[2].completion) == ("", "plain text")


def test_ultrafeedback_shape_strips_shared_prompt():
    row = {"prompt": "What is 2+2?",
           "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
           "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
           "score_chosen": 9.0}
    (ex,), rep = parse("preference", [row])
    assert ex.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert (ex.chosen, ex.rejected) == ("4", "5")
    assert ex.fields["score_chosen"] == 9.0


def test_hh_shape_shared_prefix_is_prompt():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}
    (ex,), _ = parse("preference", [row])
    assert ex.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Joke?"}]
    assert (ex.chosen, ex.rejected) == ("Knock knock.", "No.")


def test_ranking_expands_to_all_implied_pairs():
    out, _ = parse("preference", [{"prompt": "p", "responses": ["B", "A", "C"]}])
    assert [(e.chosen, e.rejected) for e in out] == [("B", "A"), ("B", "C"), ("A", "C")]


def test_unpaired_and_pairs_split():
    out, _ = parse("unpaired", [{"prompt": "p", "completion": "c", "label": True},
                                {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert [(e.prompt, e.completion, e.label) for e in out] == [("p", "c", True), ("q", "good", True),
                                                                ("q", "bad", False)]


def test_prompt_rows_keep_extra_fields():
    (ex,), _ = parse("prompt", [{"prompt": "2+3?", "answer": "5", "level": 1}])
    assert ex.prompt == "2+3?" and ex.fields == {"answer": "5", "level": 1}


@pytest.mark.parametrize("kind,row,reason,field", [
    ("sft", {"foo": 1}, "fits no SFT shape", None),
    ("sft", {"messages": [{"role": "user", "content": "x"}]}, "no assistant message", "messages"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role", "messages"),
    ("sft", {"prompt": "p", "completion": 3}, "expected a string", "completion"),
    ("preference", {"prompt": "p", "chosen": "x", "rejected": "x"}, "chosen equals rejected", "rejected"),
    ("preference", {"chosen": "no turns", "rejected": "here"}, "no shared prompt", "chosen"),
    ("preference", {"prompt": "p", "responses": ["only"]}, "at least two responses", "responses"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": 2}, "outside [0, 1]", "soft_label"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": "maybe"}, "label must be", "label"),
])
def test_bad_rows_are_reported_with_row_and_field(kind, row, reason, field):
    out, rep = parse(kind, [{"text": "ok"} if kind == "sft" else row, row] if kind == "sft" else [row])
    assert rep.n_dropped == 1
    sample = rep.samples[0]
    assert reason in sample["reason"]
    assert sample["row"] == (2 if kind == "sft" else 1)
    assert sample.get("field") == field
    assert any(reason in line for line in rep.summary_lines())


def test_file_formats_roundtrip(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(3)))
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "ds"):
        _, got = read_rows(str(tmp_path / name))
        assert [r for _, r in got] == rows, name
    # row numbers are what a user finds: JSONL line numbers, CSV line numbers (header is line 1)
    assert [n for n, _ in read_rows(str(tmp_path / "a.jsonl"))[1]] == [1, 2, 3]
    assert [n for n, _ in read_rows(str(tmp_path / "a.csv"))[1]] == [2, 3, 4]


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        read_rows(str(p))


def test_empty_result_is_an_error(tmp_path, tiny_tok):
    p = tmp_path / "d.jsonl"
    p.write_text('{"foo": 1}\n{"bar": 2}\n')
    with pytest.raises(DataError, match="no usable sft examples out of 2 rows"):
        prepare("sft", DataConfig(path=str(p)), tiny_tok)


def test_missing_field_is_named_and_said_once_not_once_per_row():
    rows = [{"prompt": f"p{i}", "chosen": "c"} for i in range(12)]
    out, rep = parse("preference", rows)
    assert out == [] and rep.n_dropped == 12
    assert {s.get("field") for s in rep.samples} == {"rejected"}
    lines = rep.summary_lines()
    text = "\n".join(lines)
    assert "missing field 'rejected' (has chosen, prompt;" in text
    assert text.count("missing field") == 1  # the reason once, then where its rows are
    assert any("rows 1, 2, 3, 4, 5 (+7 more) field 'rejected'" in line for line in lines), text
    _, rep = parse("sft", [{"foo": 1}])  # nothing of any shape: no field to name
    assert rep.samples[0].get("field") is None and "fits no SFT shape: expected" in rep.samples[0]["reason"]
