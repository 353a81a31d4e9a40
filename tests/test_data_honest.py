"""Honest splits (eval_split, test twins, subset, overlap), hub look-ups only for hub ids, complete
data reports, and one-line messages for bad input (item 7 of issue 10)."""

import json

import pytest
from click.testing import CliRunner

from alignkit.cli import build_cli
from alignkit.config import DataConfig
from alignkit.data import DataError, prepare
from alignkit.data import load as load_mod
from alignkit.data.load import DataReport, looks_like_hub_id, read_rows, write_data_report
from tests.helpers import pref_rows, sft_rows, write_jsonl


def cli(args):
    return CliRunner().invoke(build_cli(), args)


def one_error_line(res):
    assert "Traceback" not in res.output, res.output
    errors = [l for l in res.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, res.output
    return " ".join(errors[0].split())


@pytest.fixture
def two_split_dir(tmp_path):
    """An UltraFeedback-style DatasetDict on disk: 6 train_prefs rows, 3 test_prefs rows."""
    from datasets import Dataset, DatasetDict

    rows = pref_rows(9, 5)
    path = tmp_path / "uf"
    DatasetDict({"train_prefs": Dataset.from_list(rows[:6]), "test_prefs": Dataset.from_list(rows[6:])}) \
        .save_to_disk(str(path))
    return path, rows


def test_two_split_dataset_evaluates_on_its_test_split(tiny_tok, two_split_dir):
    path, rows = two_split_dir
    # the reported case: eval_path is the same dataset, read (before) with the training split
    for cfg in (DataConfig(path=str(path), split="train_prefs", eval_path=str(path)),
                DataConfig(path=str(path), split="train_prefs"),  # the test twin without asking
                DataConfig(path=str(path), split="train_prefs", eval_split="test_prefs")):
        data = prepare("preference", cfg, tiny_tok)
        assert len(data.train) == 6 and len(data.eval) == 3
        assert [r.to_dict()["split"] for r in data.reports] == ["train_prefs", "test_prefs"]
        assert [(r.role, r.rows_read, r.examples) for r in data.reports] == [("train", 6, 6), ("eval", 3, 3)]
        assert data.reports[1].overlap_with_train == 0
    lines = prepare("preference", DataConfig(path=str(path), split="train_prefs"), tiny_tok).summary_lines()
    assert lines[0].startswith(f"train data: {path} (local dataset directory, split train_prefs): 6 rows read")
    assert f"eval data: {path} (local dataset directory, split test_prefs): 3 rows read, 3 examples" in lines[1]
    with pytest.raises(DataError, match="data.eval_split='train_prefs' is the training split"):
        prepare("preference", DataConfig(path=str(path), split="train_prefs", eval_split="train_prefs"), tiny_tok)


def test_a_dataset_without_a_twin_asks_which_split(tiny_tok, tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "ds"
    DatasetDict({"a": Dataset.from_list(pref_rows(4, 1)), "b": Dataset.from_list(pref_rows(4, 2))}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"which split is held out\? It has a, b .*set data.eval_split"):
        prepare("preference", DataConfig(path=str(path), split="a", eval_path=str(path)), tiny_tok)
    data = prepare("preference", DataConfig(path=str(path), split="a"), tiny_tok)
    assert data.eval == []  # no twin, no eval_fraction: no held-out data, as before


def test_end_to_end_data_report_names_both_sides(tmp_path, tiny_model, two_split_dir):
    from alignkit.train.preference import train_dpo

    path, _ = two_split_dir
    s = train_dpo(**{"model.name_or_path": str(tiny_model), "data.path": str(path), "data.split": "train_prefs",
                     "data.eval_path": str(path), "train.max_steps": 1, "train.batch_size": 3,
                     "log.progress": False, "log.samples": 0}, output=str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [(r["role"], r["split"], r["rows_read"], r["examples"]) for r in report] == \
        [("train", "train_prefs", 6, 6), ("eval", "test_prefs", 3, 3)]
    assert "eval/accuracy" in s


def test_overlap_between_train_and_eval_is_counted_and_warned(tiny_tok, tmp_path):
    rows = pref_rows(8, 3)
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    held = write_jsonl(tmp_path / "e.jsonl", rows[:3] + pref_rows(2, 4))  # 3 of 5 copied from training
    data = prepare("preference", DataConfig(path=str(train), eval_path=str(held)), tiny_tok)
    assert data.reports[1].overlap_with_train == 3
    assert any("3 of 5 eval examples also appear in the training data" in l for l in data.summary_lines())
    assert json.loads(json.dumps(data.reports[1].to_dict()))["overlap_with_train"] == 3


def test_hub_lookups_only_for_hub_ids(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("alignkit.data.load.check_hub_dataset", lambda repo_id: None)  # as if the Hub answers
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("data/train.jsonl", "./x", "runs/prefs", "a/b/c", "prefs.jsonl", "owner/file.csv"):
        with pytest.raises(DataError, match="no such file or directory"):
            read_rows(local)
    assert calls == []
    info = {}
    name, rows = read_rows("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", subset="default", info=info)
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "default", "train_prefs")]
    assert info == {"origin": "Hugging Face Hub, subset default", "split": "train_prefs"} and len(rows) == 1
    assert looks_like_hub_id("gpt2", allow_bare=True) and not looks_like_hub_id("gpt2")


def test_missing_model_directory_is_one_line(tmp_path, jsonl):
    data = jsonl("d.jsonl", sft_rows(4))
    for model in (str(tmp_path / "runs" / "sft" / "model"), "./nomodel"):
        res = cli(["sft", "--model", model, "--data", str(data), "--output", str(tmp_path / "o")])
        assert res.exit_code == 1
        line = one_error_line(res)
        assert f"model {model}: no such directory" in line and "Repo id" not in line


def test_lora_target_modules_the_model_lacks(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", sft_rows(4))
    res = cli(["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "o"), "--lora",
               "lora.target_modules=[q_proj,nonsense_proj]", "log.progress=false"])
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "lora.target_modules: nonsense_proj not found in the model (its linear layers:" in line
    assert "q_proj" in line.split("linear layers:")[1]


BAD_REWARDS = {
    "nan": ("return [float('nan')] * len(completions)", "non-finite score at index 0: nan"),
    "count": ("return [1.0]", "returned 1 scores for 4 completions"),
    "strings": ("return ['good'] * len(completions)", "non-number at index 0: 'good'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REWARDS))
def test_bad_reward_function_is_one_line(tmp_path, tiny_model, case):
    body, expected = BAD_REWARDS[case]
    (tmp_path / "r.py").write_text(f"def fn(prompts, completions, **kw):\n    {body}\n")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"w:{i}"} for i in range(4)])
    res = cli(["grpo", "--model", str(tiny_model), "--data", str(prompts), "--output", str(tmp_path / "o"),
               "--reward", f"python:{tmp_path / 'r.py'}:fn", "--max-steps", "1", "train.batch_size=2",
               "grpo.num_generations=2", "generation.max_new_tokens=2", "log.progress=false", "log.samples=0"])
    assert res.exit_code == 1
    line = one_error_line(res)
    assert expected in line and "fn" in line and "one per completion" in line


def test_debug_shows_the_traceback(tmp_path, jsonl):
    data = jsonl("d.jsonl", sft_rows(4))
    res = CliRunner().invoke(build_cli(), ["--debug", "sft", "--model", "./nomodel", "--data", str(data),
                                           "--output", str(tmp_path / "o")])
    assert isinstance(res.exception, FileNotFoundError) and "no such directory" in str(res.exception)


def test_non_utf8_byte_names_the_line(tmp_path, tiny_model):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid UTF-8 \(byte 0xe9 at column 16\); re-save"):
        read_rows(str(path))
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"prompt,completion\na,b\nc,\xff\n")
    with pytest.raises(DataError, match=r"d.csv line 3: not valid UTF-8 \(byte 0xff at column 3\)"):
        read_rows(str(csv))
    res = cli(["sft", "--data", str(path), "--output", str(tmp_path / "o"), "--model", str(tiny_model)])
    assert res.exit_code == 1 and "d.jsonl line 2: not valid UTF-8 (byte 0xe9 at column 16)" in one_error_line(res)


def test_byte_order_mark_is_read(tmp_path, tiny_tok):
    csv = tmp_path / "excel.csv"
    csv.write_bytes("prompt,completion\nhello,world\nbye,now\n".encode("utf-8-sig"))
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes('{"prompt": "hello", "completion": "world"}\n'.encode("utf-8-sig"))
    for path, n in ((csv, 2), (jl, 1)):
        data = prepare("sft", DataConfig(path=str(path)), tiny_tok)
        assert len(data.train) == n and data.reports[0].n_dropped == 0


def test_empty_sft_prompts_are_reported(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "x"}, {"prompt": "q", "completion": "y"}])
    data = prepare("sft", DataConfig(path=str(path)), tiny_tok)
    assert len(data.train) == 2
    rep = data.reports[0].to_dict()
    assert rep["kept_with_note"] == {"empty prompt: trained as plain text (loss on the whole completion)": 1}
    assert rep["samples"] == [{"what": "kept", "file": str(path), "row": 1, "field": "prompt",
                               "reason": "empty prompt: trained as plain text (loss on the whole completion)"}]


def test_data_report_lists_every_dropped_row_even_when_all_are_dropped(tmp_path, tiny_model, monkeypatch):
    rows = [{"prompt": "q", "completion": ""} for _ in range(30)]  # 30 empty completions
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    res = cli(["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no usable sft examples out of 30 rows" in res.output
    (report,) = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert report["dropped"] == {"empty text": 30}
    assert [s["row"] for s in report["samples"] if s["what"] == "dropped"] == list(range(1, 31))
    assert report["duplicate_rows"] == 29  # the same row 30 times: listed too (issue 32, case 14)
    # many rows: a side file holds every one, the report names it
    monkeypatch.setattr(load_mod, "ROWS_INLINE", 10)
    rep = DataReport(source="x.jsonl")
    for i in range(25):
        rep.drop(i + 1, "bad", "prompt")
    write_data_report([rep], tmp_path / "side")
    (entry,) = json.loads((tmp_path / "side" / "data_report.json").read_text())
    assert entry["rows_file"] == "data_report_rows.jsonl" and len(entry["samples"]) == 20
    side = [json.loads(l) for l in (tmp_path / "side" / "data_report_rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in side] == list(range(1, 26)) and side[0]["role"] == "train"
