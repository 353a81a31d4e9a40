"""The shared loop: accumulation invariance, exact resume, atomic checkpoints, NaN handling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import SFTConfig, as_config
from alignkit.data import prepare
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.train.common import start_run
from alignkit.train.loop import Trainer, TrainingAborted
from alignkit.train.sft import SFTTask, train_sft
from tests.helpers import sft_rows


@pytest.fixture
def sft_data(jsonl):
    return jsonl("sft.jsonl", sft_rows())


def make_trainer(tmp_path, model_dir, data, **over):
    # fp32 math (also on a GPU), so the invariance tests compare exact arithmetic, not bf16 rounding
    cfg = as_config(SFTConfig, {"model": {"name_or_path": str(model_dir)}, "data": {"path": str(data)},
                                "output": str(tmp_path / "run"), "log": {"progress": False},
                                "train": {"precision": "fp32"}}, over)
    acc = start_run(cfg)
    tok = load_tokenizer(cfg.model)
    prep = prepare("sft", cfg.data, tok)
    model = load_causal_lm(cfg.model)
    return Trainer(cfg, SFTTask(tok.pad_token_id, cfg.sft.loss_reduction), model, prep.train, prep.eval,
                   accelerator=acc, tokenizer=tok)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_grad_accumulation_4x2_equals_8(tmp_path, tiny_model, sft_data, reduction):
    grads, losses = [], []
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        tr = make_trainer(tmp_path / f"{bs}", tiny_model, sft_data, **{"train.batch_size": bs, "train.grad_accum": acc,
                                                                        "sft.loss_reduction": reduction})
        items = tr._global_batch(0)
        (update,) = list(tr.task.plan(tr.model, items, tr.micro))
        mbs = update.micro_batches
        assert len(mbs) == acc and update.metrics == {}
        sums, _, total, bad = tr.accumulate(mbs)
        assert not bad
        losses.append(float(sums["train/loss"]) / total)  # sums stay on the device until read
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters()]))
    # micro-batches differ in padding and token counts; normalization by the global count makes them equal
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == pytest.approx(losses[2], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-5)


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_resume_is_bitwise_identical(tmp_path, tiny_model, sft_data, monkeypatch):
    base = {"model.name_or_path": str(tiny_model), "data.path": str(sft_data), "train.max_steps": 6,
            "train.batch_size": 4, "optim.lr": 1e-3, "optim.warmup_steps": 2, "log.progress": False}
    train_sft(**base, output=str(tmp_path / "straight"))

    # interrupted run: crash right after the step-3 checkpoint, then resume
    orig = Trainer._save

    def save_then_crash(self):
        orig(self)
        if self.step == 3:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_sft(**base, output=str(tmp_path / "resumed"), **{"log.save_every": 3})
    monkeypatch.setattr(Trainer, "_save", orig)
    assert not (tmp_path / "resumed" / "model").exists()
    train_sft(**base, output=str(tmp_path / "resumed"), resume="latest", **{"log.save_every": 3})

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume


def test_crash_while_checkpointing_keeps_previous_latest(tmp_path, tiny_model, sft_data, monkeypatch):
    tr = make_trainer(tmp_path, tiny_model, sft_data, **{"train.max_steps": 4, "log.save_every": 2,
                                                          "train.batch_size": 4})
    real = tr.acc.save_state
    calls = {"n": 0}

    def flaky_save(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint (step 4): write part of it, then die
            real(path, *a, **k)
            raise OSError("disk full (simulated)")
        return real(path, *a, **k)

    monkeypatch.setattr(tr.acc, "save_state", flaky_save)
    with pytest.raises(OSError, match="could not write checkpoint step 4 .*disk full .*step-00000002. is intact"):
        tr.fit()
    assert [p.name for p in tr.ckpt.list()] == ["step-00000002"]
    assert tr.ckpt.latest().name == "step-00000002"
    assert not (tr.ckpt.root / ".tmp-step-00000004").exists()  # the partial write is removed, never "latest"
    state = json.loads((tr.ckpt.latest() / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_nan_steps_are_skipped_then_abort(tmp_path, tiny_model, sft_data):
    tr = make_trainer(tmp_path, tiny_model, sft_data, **{"train.max_steps": 10, "train.max_bad_steps": 3,
                                                          "train.batch_size": 4})
    before = [p.detach().clone() for p in tr.model.parameters()]
    real_loss = tr.task.loss

    def nan_loss(model, batch):
        loss, m = real_loss(model, batch)
        return loss * float("nan"), m

    tr.task.loss = nan_loss
    with pytest.raises(TrainingAborted, match="3 consecutive updates had a NaN/Inf"):
        tr.fit()
    # no update was applied, and the log shows skipped steps, never a silent 0 loss
    for p, q in zip(before, tr.model.parameters()):
        assert torch.equal(p, q.detach())
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 2.0]
    assert all("train/loss" not in r for r in rows)


def test_sft_lowers_held_out_loss(tmp_path, tiny_model, sft_data):
    s = train_sft(**{"model.name_or_path": str(tiny_model), "data.path": str(sft_data), "data.eval_fraction": 0.25,
                     "train.epochs": 8, "train.batch_size": 8, "optim.lr": 3e-3, "optim.warmup_ratio": 0.1,
                     "log.progress": False}, output=str(tmp_path / "sft"))
    assert s["eval/loss"] < 0.6 * s["eval/loss_before"], s
    # the saved model loads with plain transformers and reproduces the final held-out loss
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert sum(p.numel() for p in m.parameters()) > 0
    cfg = (tmp_path / "sft" / "config.yaml").read_text()
    assert "lr: 0.003" in cfg


def test_accumulate_reads_nothing_back_from_the_device(tmp_path, tiny_model, sft_data, monkeypatch):
    """The micro-batch loop keeps metrics and the non-finite flag as tensors: no .item(), float(),
    bool() or .tolist() of a tensor in our code (each a host sync on a GPU) until the update's one
    skip check."""
    import traceback

    tr = make_trainer(tmp_path / "r", tiny_model, sft_data, **{"train.batch_size": 2, "train.grad_accum": 4})
    (update,) = list(tr.task.plan(tr.model, tr._global_batch(0), tr.micro))
    mbs = update.micro_batches
    reads = []

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            caller = traceback.extract_stack()[-2]
            if "alignkit" in caller.filename and self.numel() == 1:  # ours, not the model's internals
                reads.append((name, caller.filename, caller.lineno))
            return orig(self, *a, **k)
        return f

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    sums, local, total, bad = tr.accumulate(mbs)
    monkeypatch.undo()
    assert reads == []
    assert torch.is_tensor(sums["train/loss"]) and torch.is_tensor(bad) and not bool(bad)
    assert local == total > 0
