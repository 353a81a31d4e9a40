"""Resumes that check what they trust: input fingerprints, verified checkpoints with a fallback, no code
from checkpoint files, --overwrite only on alignkit's own runs, and the resume options of the CLI."""

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from alignkit.cli import build_cli
from alignkit.testing import save_tiny_model
from alignkit.train.checkpoint import write_manifest
from alignkit.train.loop import Trainer, TrainingAborted
from alignkit.train.disk import RunDirError
from alignkit.train.rundir import MARKER
from alignkit.train.sft import train_sft
from tests.helpers import Crash, crash_after_save, pref_rows, sft_rows, write_jsonl


@pytest.fixture
def base(tiny_model, jsonl):
    data = jsonl("sft.jsonl", sft_rows(16))
    return {"model.name_or_path": str(tiny_model), "data.path": str(data), "train.batch_size": 4,
            "train.max_steps": 4, "optim.lr": 1e-3, "log.progress": False, "log.samples": 0, "log.save_every": 2,
            "train.precision": "fp32"}


def go(base, out, **over):
    return train_sft(**{**base, "output": str(out), **over})


def cli(args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def cli_args(base, out, *extra):
    return ["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output", out,
            "--max-steps", base["train.max_steps"], "train.batch_size=4", "optim.lr=1e-3", "log.save_every=2",
            "log.progress=false", "log.samples=0", "train.precision=fp32", *extra]


def one_error_line(res):
    assert "Traceback" not in res.output, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, res.output
    return " ".join(res.output[res.output.index("Error:"):].split())


def steps_of(out):
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]


def interrupted(base, out, monkeypatch, at=2, **over):
    """A run that crashed right after its checkpoint at step ``at``."""
    restore = crash_after_save(monkeypatch, at)
    with pytest.raises(Crash):
        go(base, out, **over)
    restore()
    return out / "checkpoints" / f"step-{at:08d}"


# ------------------------------------------------------------------ BAD 2, 3: inputs changed in place

def test_data_changed_in_place_is_refused_naming_the_file(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    interrupted(base, out, monkeypatch)
    Path(base["data.path"]).write_text("".join(json.dumps(r) + "\n" for r in sft_rows(16, seed=7)))  # same path
    res = cli(cli_args(base, out, "--resume"))
    assert res.exit_code == 1
    line = one_error_line(res)
    assert f"data.path ({base['data.path']}) changed since the checkpoint " in line
    assert "sha256" in line and "--resume-anyway" in line
    assert steps_of(out) == [1, 2]
    res = cli(cli_args(base, out, "--resume", "--resume-anyway"))  # the user means it: said, then done
    assert res.exit_code == 0, res.output
    assert "--resume-anyway: data.path" in " ".join(res.output.split())
    assert steps_of(out) == [1, 2, 3, 4]


def test_model_changed_in_place_is_refused_for_dpo(tmp_path, jsonl, monkeypatch):
    """The reported case: DPO, the model directory rebuilt with other weights before --resume (main: rc 0,
    and the new weights became the reference)."""
    from alignkit.train.preference import train_dpo

    model = save_tiny_model(tmp_path / "tinyM", seed=0)
    data = jsonl("p.jsonl", pref_rows(16, 0))
    cfg = {"model.name_or_path": str(model), "data.path": str(data), "train.batch_size": 4, "train.max_steps": 4,
           "log.progress": False, "log.samples": 0, "log.save_every": 2, "output": str(tmp_path / "run")}
    restore = crash_after_save(monkeypatch, 2)
    with pytest.raises(Crash):
        train_dpo(**cfg)
    restore()
    save_tiny_model(model, seed=1)  # same path, other weights
    with pytest.raises(RunDirError, match=rf"model.name_or_path \({model}\) changed since the checkpoint .*step-00000002 "
                                          r"was written \(.* sha256 .* then, .* now\); resume with the inputs"):
        train_dpo(**cfg, resume="latest")
    save_tiny_model(model, seed=0)  # the original weights again: the resume goes on
    train_dpo(**cfg, resume="latest")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


# ------------------------------------------------------------------ BAD 4: corrupted checkpoints

@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_corrupt_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, base, damage):
    out = tmp_path / "run"
    go(base, out)  # a finished 4-step run: checkpoints step-2 and step-4
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    if damage == "random bytes":
        g = torch.Generator().manual_seed(0)
        blob[-4000:] = bytes(torch.randint(0, 256, (4000,), generator=g, dtype=torch.uint8).tolist())
    else:
        blob = blob[: len(blob) // 2]
    weights.write_bytes(bytes(blob))
    res = cli(cli_args(base, out, "--resume", "--max-steps", 8))
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "step-00000004 is damaged (model.safetensors " in said
    assert "resuming from step-00000002, the newest intact checkpoint" in said
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    assert steps_of(out) == list(range(1, 9))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert all(math.isfinite(r["train/loss"]) for r in rows) and rows[-1].get("train/skipped_steps", 0) == 0


def test_no_intact_checkpoint_is_one_line(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    (ckpt / "optimizer.bin").write_bytes(b"garbage")
    res = cli(cli_args(base, out, "--resume"))
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "no intact checkpoint under" in line and "step-00000002: optimizer.bin has 7 bytes" in line


def test_rotation_keeps_the_last_intact_checkpoint(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    go(base, out, **{"train.max_steps": 2, "log.save_every": 1, "log.save_total_limit": 1})
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]
    # a checkpoint whose weights went non-finite is no keeper: the intact one before it stays
    real_save = Trainer._save

    def save(self):  # the checkpoints of steps 3 and 4 record non-finite weights
        self._saving = True
        try:
            return real_save(self)
        finally:
            self._saving = False

    monkeypatch.setattr(Trainer, "_save", save)
    monkeypatch.setattr(Trainer, "_finite_weights", lambda self: not getattr(self, "_saving", False) or self.step < 3)
    go(base, out, resume="latest", **{"train.max_steps": 4, "log.save_every": 1, "log.save_total_limit": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]


def test_resumed_run_whose_first_steps_are_all_nan_stops_naming_the_checkpoint(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    real = Trainer.accumulate

    def nan(self, mbs):  # a state the hashes cannot catch (written that way): every update non-finite
        sums, local, total, bad = real(self, mbs)
        return sums, local, total, torch.ones_like(bad)

    monkeypatch.setattr(Trainer, "accumulate", nan)
    with pytest.raises(TrainingAborted, match=rf"every update since resuming from {ckpt} had a NaN/Inf .*damaged"):
        go(base, out, resume="latest", **{"train.max_steps": 8, "log.save_every": 1})
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # nothing saved over it
    assert not (out / "model").exists()


def test_damaged_optimizer_state_stops_after_the_first_update(tmp_path, base, monkeypatch):
    """A state the manifest agrees with (written that way) whose first update makes the weights NaN."""
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for st in opt["state"].values():
        st["exp_avg"].fill_(float("nan"))
    torch.save(opt, ckpt / "optimizer.bin")
    write_manifest(ckpt)
    with pytest.raises(TrainingAborted, match=rf"step 3: the first update after resuming from {ckpt} made the "
                                              r"weights NaN/Inf"):
        go(base, out, resume="latest", **{"log.save_every": 1})
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def test_checkpoint_with_nan_weights_is_refused(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    w = load_file(str(ckpt / "model.safetensors"))
    k = next(iter(w))
    w[k][0] = float("nan")
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(ckpt)  # written that way: the manifest agrees
    with pytest.raises(RunDirError, match=rf"the checkpoint {ckpt} holds NaN/Inf weights"):
        go(base, out, resume="latest")


# ------------------------------------------------------------------ BAD 5: every file must load

def test_missing_rng_state_is_never_a_silently_inexact_resume(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    rng = ckpt / "rng_state_0.safetensors"
    rng.unlink()
    res = cli(cli_args(base, out, "--resume"))
    assert res.exit_code == 1
    assert "step-00000002: rng_state_0.safetensors is missing" in one_error_line(res)
    write_manifest(ckpt)  # even with a manifest that agrees, the file is required
    res = cli(cli_args(base, out, "--resume"))
    assert res.exit_code == 1
    assert f"{rng} is missing (process 0's random states)" in one_error_line(res)


@pytest.mark.slow
def test_grpo_resume_restores_every_random_state(tmp_path, tiny_model, jsonl, monkeypatch):
    """The reported case (main: rc 0 with random_states_0.pkl deleted, weights differ): GRPO samples with the
    torch generator, so the resume is exact only if every random state comes back."""
    data = jsonl("q.jsonl", [{"prompt": f"{a}+{7 - a}=", "answer": "7"} for a in range(8)])
    args = ["grpo", "--model", tiny_model, "--data", data, "--max-steps", 4, "--reward", "match:answer",
            "--num-generations", 2, "train.batch_size=4", "optim.lr=1e-2", "log.save_every=2", "log.progress=false",
            "log.samples=0", "generation.max_new_tokens=6", "train.precision=fp32"]
    assert cli(args + ["--output", tmp_path / "straight"]).exit_code == 0
    restore = crash_after_save(monkeypatch, 2)
    res = cli(args + ["--output", tmp_path / "resumed"])
    assert isinstance(res.exception, Crash), res.output
    restore()
    torch.manual_seed(12345)  # the resume must not depend on this process's own random state
    res = cli(args + ["--output", tmp_path / "resumed", "--resume"])
    assert res.exit_code == 0, res.output
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ BAD 6: no code from checkpoints

class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_pickle_payload_in_any_checkpoint_file_never_runs(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    ckpt = interrupted(base, out, monkeypatch)
    good = tmp_path / "good"
    shutil.copytree(ckpt, good)
    marker = tmp_path / "PWNED"
    names = sorted(p.name for p in good.iterdir() if p.name != "manifest.json")
    assert names == ["model.safetensors", "optimizer.bin", "rng_state_0.safetensors", "scheduler.json",
                     "trainer_state.json"]
    planted = ["custom_checkpoint_0.pkl", "random_states_0.pkl"]  # what accelerate would unpickle
    for name in names + planted:
        shutil.rmtree(ckpt)
        shutil.copytree(good, ckpt)
        payload = Payload(marker)
        if name.endswith(".bin"):
            torch.save({"state": payload, "param_groups": []}, ckpt / name)  # torch's zip pickle
        else:
            (ckpt / name).write_bytes(pickle.dumps(payload))
        write_manifest(ckpt)  # an attacker who can write the directory can rewrite the manifest too
        res = cli(cli_args(base, out, "--resume"))
        assert not marker.exists(), name
        assert res.exit_code == 1, (name, res.output)
        line = one_error_line(res)
        assert name in line, (name, line)


# ------------------------------------------------------------------ BAD 7: --overwrite on the user's files

def _users_dir(root: Path) -> Path:
    mine = root / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "checkpoints" / "step-00000001").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (mine / "model" / "weights.bin").write_bytes(b"my weights")
    (mine / "checkpoints" / "step-00000001" / "notes.txt").write_text("keep")
    return mine


def _tree(path: Path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("via_symlink", [False, True])
def test_overwrite_never_touches_a_directory_alignkit_did_not_write(tmp_path, base, via_symlink):
    mine = _users_dir(tmp_path)
    before = _tree(mine)
    out = tmp_path / "link" if via_symlink else mine
    if via_symlink:
        out.symlink_to(mine, target_is_directory=True)
    for extra in (["--overwrite"], []):
        res = cli(cli_args(base, out, *extra))
        assert res.exit_code == 1, res.output
        line = one_error_line(res)
        assert "holds config.yaml, metrics.jsonl, checkpoints/, model/ but no .alignkit-run.json" in line, line
        assert "alignkit did not write them" in line and "finished" not in line
        if via_symlink:
            assert f"(-> {mine})" in line
    assert _tree(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "model"]


def test_overwrite_clears_only_the_files_its_marker_lists(tmp_path, base):
    out = tmp_path / "run"
    go(base, out, **{"train.max_steps": 2})
    marker = json.loads((out / MARKER).read_text())
    assert marker["tool"] == "alignkit" and "model" in marker["files"] and "checkpoints" in marker["files"]
    (out / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    res = cli(cli_args(base, link, "--overwrite", "--max-steps", 3))  # through a symlink: the same run
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine"
    assert steps_of(out) == [1, 2, 3] and link.is_symlink()


# ------------------------------------------------------------------ POOR 10-12

def test_resume_does_not_swallow_an_override(tmp_path, base, monkeypatch):
    out = tmp_path / "run"
    interrupted(base, out, monkeypatch)
    # main: click took "optim.lr=1e-2" as the checkpoint to resume from
    res = cli(cli_args(base, out, "--resume", "optim.lr=1e-2"))
    assert res.exit_code == 1
    assert "optim.lr: 0.001 in the checkpoint, 0.01 now" in one_error_line(res)
    res = cli(cli_args(base, out, "--resume", "log.every=2"))
    assert res.exit_code == 0, res.output
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["log"]["every"] == 2 and cfg["resume"] == "latest"


def _lrs(out):
    return {json.loads(l)["step"]: json.loads(l)["train/lr"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if "train/lr" in l}


@pytest.mark.parametrize("choice", ["continue", "restart"])
def test_longer_resume_continues_or_restarts_the_schedule_as_chosen(tmp_path, base, choice):
    out = tmp_path / "run"
    go(base, out)  # a finished 4-step cosine run: lr 0 at step 4
    res = cli(cli_args(base, out, "--resume", "--max-steps", 8, f"optim.resume_schedule={choice}"))
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "--resume: the run was 4 steps long, now 8; at step 4" in said
    lr = _lrs(out)
    assert lr[4] == pytest.approx(0.0, abs=1e-12)
    if choice == "continue":  # the cosine over 8 steps from step 4: lr(k) = 1e-3 * (1 + cos(pi k / 8)) / 2
        assert "continues the cosine schedule recomputed for 8 steps" in said
        for k in range(5, 9):
            assert lr[k] == pytest.approx(1e-3 * (1 + math.cos(math.pi * k / 8)) / 2, rel=1e-6), k
    else:  # a new cosine over steps 5-8: lr(k) = 1e-3 * (1 + cos(pi (k - 4) / 4)) / 2
        assert "restarts warmup and cosine decay over steps 5-8 (optim.resume_schedule=restart)" in said
        for k in range(5, 9):
            assert lr[k] == pytest.approx(1e-3 * (1 + math.cos(math.pi * (k - 4) / 4)) / 2, rel=1e-6, abs=1e-12), k


def test_kill_during_the_final_save_then_resume_rebuilds_the_summary(tmp_path, base, monkeypatch):
    import alignkit.models.loading as loading

    straight = go(base, tmp_path / "straight")
    out = tmp_path / "run"
    real = loading.save_model

    class Killed(BaseException):  # kill -9: nothing of alignkit's runs after it (no except clause catches it)
        pass

    def killed(*a, **k):  # the process dies while the final model is written
        raise Killed()

    monkeypatch.setattr(loading, "save_model", killed)
    with pytest.raises(Killed):
        go(base, out)
    monkeypatch.setattr(loading, "save_model", real)
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    go(base, out, resume="latest")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    expected = {k: v for k, v in json.loads((tmp_path / "straight" / "summary.json").read_text()).items()
                if k.startswith("train/") and k not in ("train/epoch",)}
    assert set(expected) <= set(summary), sorted(set(expected) - set(summary))
    assert summary["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-6)
