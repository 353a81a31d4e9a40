"""data.mix (several datasets by weight) and data.streaming (lazy reading, exact resume); issue 34 item 5."""

import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import DataConfig
from alignkit.data import DataError, prepare
from alignkit.data.mix import allocate, draw
from alignkit.train.loop import Trainer
from alignkit.train.sft import train_sft
from tests.helpers import sft_rows


def rows(prefix, n):
    return [{"prompt": f"{prefix} question {i}", "completion": f"{prefix} answer {i}"} for i in range(n)]


def test_allocation_and_draws_by_hand():
    assert allocate([3, 1], 40) == [30, 10]
    assert allocate([1, 1, 1], 10) == [4, 3, 3]  # largest remainder; a tie goes to the earlier dataset
    assert allocate([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # 3.5, 1.75, 1.75: floors 3, 1, 1; the .75s get the 2 left
    picked = draw(4, 10, random.Random(0))
    assert sorted(Counter(picked).values()) == [2, 2, 3, 3]  # whole passes: 2 or 3 times each
    assert len(set(draw(10, 4, random.Random(0)))) == 4  # a subsample never repeats


def test_mix_proportions_and_report(tiny_tok, jsonl, tmp_path):
    a = jsonl("a.jsonl", rows("A", 10))
    b = jsonl("b.jsonl", rows("B", 30))
    cfg = DataConfig(mix=[f"{a}@3", {"path": str(b), "weight": 1}])
    prep = prepare("sft", cfg, tiny_tok, seed=5)
    text = [tiny_tok.decode(it["input_ids"]) for it in prep.train]
    from_a = Counter(t for t in text if "A question" in t)
    from_b = Counter(t for t in text if "B question" in t)
    assert len(prep.train) == 40 and sum(from_a.values()) == 30 and sum(from_b.values()) == 10
    assert set(from_a.values()) == {3} and len(from_a) == 10  # 3 whole passes over A's 10 rows
    assert set(from_b.values()) == {1}  # 10 distinct rows of B's 30
    assert prepare("sft", cfg, tiny_tok, seed=5).train == prep.train  # seeded
    ra, rb = (r.to_dict() for r in prep.reports)
    assert ra["mix"] == {"weight": 3.0, "share": 0.75, "examples_available": 10, "examples_drawn": 30,
                         "passes": 3.0, "seed": 5}
    assert rb["mix"]["share"] == 0.25 and rb["mix"]["examples_drawn"] == 10 and rb["source"] == str(b)
    assert "  mix: weight 3 -> 75.0% of the mixed training set: 30 drawn from its 10 examples (3.00 passes)" \
        in prep.summary_lines()
    from alignkit.data.load import write_data_report

    saved = json.loads(write_data_report(prep.reports, tmp_path / "out").read_text())
    assert [e["mix"]["examples_drawn"] for e in saved] == [30, 10]
    with pytest.raises(DataError, match="data.path or data.mix"):
        prepare("sft", DataConfig(path=str(a), mix=[str(b)]), tiny_tok)


def test_mix_holds_out_each_dataset_before_drawing(tiny_tok, jsonl):
    a = jsonl("a.jsonl", rows("A", 10))
    b = jsonl("b.jsonl", rows("B", 10))
    prep = prepare("sft", DataConfig(mix=[str(a), str(b)], eval_fraction=0.2), tiny_tok, seed=1)
    train = {tiny_tok.decode(it["input_ids"]) for it in prep.train}
    held = {tiny_tok.decode(it["input_ids"]) for it in prep.eval}
    assert len(held) == 4 and not (train & held) and len(prep.train) == 16
    assert [r.role for r in prep.reports] == ["train", "eval", "train", "eval"]
    held_file = jsonl("held.jsonl", rows("H", 3))
    prep = prepare("sft", DataConfig(mix=[str(a), str(b)], eval_path=str(held_file)), tiny_tok, seed=1)
    assert len(prep.train) == 20 and len(prep.eval) == 3  # one held-out set for the whole mixture
    assert [r.role for r in prep.reports] == ["train", "train", "eval"] and prep.reports[2].overlap_with_train == 0


def test_stream_positions_are_the_files_rows_in_order_pass_after_pass(tiny_tok, jsonl):
    data = jsonl("d.jsonl", rows("S", 7) + [{"prompt": "bad row"}])
    whole = prepare("sft", DataConfig(path=str(data)), tiny_tok)
    stream = prepare("sft", DataConfig(path=str(data), streaming=True), tiny_tok)
    assert stream.train[0:7] == whole.train  # a stream is read in file order
    assert stream.train.global_batch(3, 4) == (whole.train * 3)[12:16]  # passes repeat end to end
    rep = stream.reports[0].to_dict()
    assert rep["rows_read"] == 8 and rep["examples"] == 7 and rep["dropped"]  # the first pass, counted once
    assert rep["streaming"]["passes_started"] == 3
    again = prepare("sft", DataConfig(path=str(data), streaming=True, shuffle_buffer=4), tiny_tok, seed=3)
    shuffled = again.train[0:7]
    assert shuffled != whole.train and set(map(str, shuffled)) <= set(map(str, whole.train))
    assert Counter(map(str, again.train[0:70])).most_common()[-1][1] >= 8  # every row keeps coming, ~10 times
    fresh = prepare("sft", DataConfig(path=str(data), streaming=True, shuffle_buffer=4), tiny_tok, seed=3)
    assert fresh.train.global_batch(1, 3) == again.train[3:6]  # a fresh reader lands on the same rows
    with pytest.raises(DataError, match="data.streaming does not allow"):
        len(stream.train)


def test_streamed_mix_draws_by_weight(tiny_tok, jsonl):
    a = jsonl("a.jsonl", rows("A", 50))
    b = jsonl("b.jsonl", rows("B", 50))
    prep = prepare("sft", DataConfig(mix=[f"{a}@3", f"{b}@1"], streaming=True), tiny_tok, seed=0)
    text = [tiny_tok.decode(it["input_ids"]) for it in prep.train[0:400]]
    share = sum("A question" in t for t in text) / 400
    assert 0.70 < share < 0.80  # 0.75 +- 2.3 standard deviations
    a_rows = [t for t in text if "A question" in t]
    assert a_rows[:3] == [tiny_tok.decode(x["input_ids"]) for x in prepare(
        "sft", DataConfig(path=str(a)), tiny_tok).train[:3]]  # each dataset in its own order


def test_streaming_refusals(tiny_tok, jsonl, tmp_path):
    data = jsonl("d.jsonl", rows("S", 4))
    with pytest.raises(DataError, match="eval_fraction needs every row"):
        prepare("sft", DataConfig(path=str(data), streaming=True, eval_fraction=0.5), tiny_tok)
    with pytest.raises(DataError, match="sft and preference"):
        prepare("prompt", DataConfig(path=str(data), streaming=True), tiny_tok)
    bad = jsonl("bad.jsonl", [{"prompt": "x"}] * 3)
    with pytest.raises(DataError, match="no usable sft examples in the stream"):
        prepare("sft", DataConfig(path=str(bad), streaming=True), tiny_tok)
    with pytest.raises(DataError, match="needs train.max_steps"):
        train_sft(**{"data.path": str(data), "data.streaming": True, "output": str(tmp_path / "run"),
                     "log.progress": False})


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_streaming_resume_equals_a_straight_run_and_the_in_memory_run(tmp_path, tiny_model, jsonl, monkeypatch):
    """An interrupted streaming run, resumed, ends bitwise equal to a straight streaming run; with the whole
    file in each global batch, streaming and in-memory runs train on the same examples (equal weights up
    to the summation order inside a batch)."""
    data = jsonl("sft.jsonl", sft_rows()[:4])
    base = {"model.name_or_path": str(tiny_model), "data.path": str(data), "train.max_steps": 4,
            "train.batch_size": 4, "optim.lr": 1e-3, "log.progress": False, "train.precision": "fp32",
            "log.samples": 0}
    train_sft(**base, **{"data.streaming": True}, output=str(tmp_path / "straight"))
    seen = []
    orig_batch = Trainer._global_batch
    monkeypatch.setattr(Trainer, "_global_batch", lambda self, step: seen.append(step) or orig_batch(self, step))
    orig = Trainer._save

    def save_then_crash(self):
        orig(self)
        if self.step == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_sft(**base, **{"data.streaming": True, "log.save_every": 2}, output=str(tmp_path / "resumed"))
    monkeypatch.setattr(Trainer, "_save", orig)
    train_sft(**base, **{"data.streaming": True, "log.save_every": 2}, output=str(tmp_path / "resumed"),
              resume="latest")
    assert seen == [0, 1, 2, 3]  # the resumed run starts at step 2's batch
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    train_sft(**base, output=str(tmp_path / "memory"))
    c = _weights(tmp_path / "memory")
    for k in a:
        assert torch.allclose(a[k], c[k], atol=1e-6, rtol=1e-5), k
    report = json.loads((tmp_path / "resumed" / "data_report.json").read_text())[0]
    assert report["rows_read"] == 4 and report["examples"] == 4 and report["streaming"]["passes_started"] == 4


def test_streaming_parquet_and_dataset_dirs_and_a_dpo_run(tmp_path, tiny_model, tiny_tok, jsonl):
    from click.testing import CliRunner
    from datasets import Dataset, DatasetDict

    from alignkit.cli import build_cli
    from tests.helpers import pref_rows

    pairs = pref_rows(12, 0)
    Dataset.from_list(pairs).to_parquet(str(tmp_path / "p.parquet"))
    DatasetDict({"train_prefs": Dataset.from_list(pairs), "test_prefs": Dataset.from_list(pairs[:3])}).save_to_disk(
        str(tmp_path / "uf"))
    whole = prepare("preference", DataConfig(path=str(jsonl("p.jsonl", pairs))), tiny_tok).train
    pq = prepare("preference", DataConfig(path=str(tmp_path / "p.parquet"), streaming=True), tiny_tok)
    assert [{k: v for k, v in x.items() if k != "row"} for x in pq.train[0:12]] == \
        [{k: v for k, v in x.items() if k != "row"} for x in whole]  # jsonl rows count from 1, parquet from 0
    uf = prepare("preference", DataConfig(path=str(tmp_path / "uf"), split="train_prefs", streaming=True), tiny_tok)
    assert len(uf.eval) == 3 and uf.reports[1].split == "test_prefs"  # the held-out twin, read whole
    out = tmp_path / "dpo"
    res = CliRunner().invoke(build_cli(), ["dpo", "--model", str(tiny_model), "--data", str(tmp_path / "uf"),
                                           "data.split=train_prefs", "data.streaming=true", "data.shuffle_buffer=4",
                                           "--max-steps", "2", "train.batch_size=2", "--output", str(out),
                                           "log.progress=false", "log.samples=0"])
    assert res.exit_code == 0, res.output
    assert "streaming: rows are read as training goes" in res.output
    report = json.loads((out / "data_report.json").read_text())
    # the start-up check reads 16 examples: the first pass (12 rows, each counted once) and part of a second
    assert report[0]["streaming"]["passes_started"] == 2 and report[0]["rows_read"] == 12


def test_a_datasets_iterable_dataset_streams_like_its_file(tiny_tok, jsonl):
    from datasets import Dataset

    from alignkit.config import SFTConfig, build_config
    from alignkit.data.stream import stream_rows

    data = rows("I", 6)
    whole = prepare("sft", DataConfig(path=str(jsonl("i.jsonl", data))), tiny_tok).train
    it = Dataset.from_list(data).to_iterable_dataset()
    prep = stream_rows("sft", it, DataConfig(), tiny_tok, name="my_iterable")
    strip = lambda xs: [{k: v for k, v in x.items() if k != "row"} for x in xs]  # noqa: E731
    assert strip(prep.train[0:12]) == strip(whole + whole)  # pass after pass over the iterable
    assert prep.reports[0].rows_read == 6 and prep.reports[0].source == "my_iterable"
    cfg = build_config(SFTConfig, {"dataset_name": "x.jsonl", "dataset_streaming": True, "buffer_size": 64})
    assert cfg.data.streaming and cfg.data.shuffle_buffer == 64  # TRL's and LLaMA-Factory's names
