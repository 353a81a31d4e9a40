"""A run directory is owned by one run (lock, overwrite, resume rules); saves are all or nothing."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from alignkit.cli import build_cli
from alignkit.train.disk import RunDirError, SaveError
from alignkit.train.rundir import LOCK, write_marker
from alignkit.train.sft import train_sft
from tests.helpers import sft_rows


@pytest.fixture
def base(tiny_model, jsonl):
    data = jsonl("sft.jsonl", sft_rows(16))
    return {"model.name_or_path": str(tiny_model), "data.path": str(data), "train.batch_size": 4,
            "train.max_steps": 2, "optim.lr": 1e-3, "log.progress": False, "log.samples": 0}


def go(base, out, **over):
    return train_sft(**{**base, "output": str(out), **over})


def cli(args):
    return CliRunner().invoke(build_cli(), args)


def steps_of(out):
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]


def one_error_line(res):
    """The CLI printed exactly one error line and no traceback."""
    assert "Traceback" not in res.output, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_rerun_into_a_finished_run_is_refused_unless_overwrite(tmp_path, base, tiny_model):
    out = tmp_path / "run"
    go(base, out)
    weights = (out / "model" / "model.safetensors").read_bytes()
    args = ["sft", "--model", str(tiny_model), "--data", base["data.path"], "--output", str(out), "--max-steps", "3",
            "log.progress=false", "log.samples=0", "train.batch_size=4"]
    res = cli(args)
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "holds a finished sft run (2 steps)" in line and "--overwrite" in line
    assert (out / "model" / "model.safetensors").read_bytes() == weights  # untouched
    assert steps_of(out) == [1, 2]
    res = cli(args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert steps_of(out) == [1, 2, 3]  # one run's curve, not both appended
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert not (out / LOCK).exists()  # released at the end


def test_resume_with_another_config_is_refused_naming_the_fields(tmp_path, base):
    out = tmp_path / "run"
    go(base, out, **{"train.max_steps": 4, "log.save_every": 2})
    # the reported case: max_steps 3 (< the checkpoint's step 4) and another lr
    with pytest.raises(RunDirError, match=r"at step 4, past train.max_steps=3"):
        go(base, out, resume="latest", **{"train.max_steps": 3, "optim.lr": 1e-2})
    with pytest.raises(RunDirError, match=r"optim.lr: 0.001 in the checkpoint, 0.01 now; train.batch_size: 4 in"):
        go(base, out, resume="latest",
                  **{"train.max_steps": 6, "optim.lr": 1e-2, "train.batch_size": 2, "log.save_every": 2})
    assert steps_of(out) == [1, 2, 3, 4]
    # a larger max_steps and other logging settings may change; the curve continues from the checkpoint
    res = go(base, out, resume="latest", **{"train.max_steps": 6, "log.save_every": 3,
                                                                  "log.every": 1})
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert steps_of(out) == [1, 2, 3, 4, 5, 6]


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path, base, monkeypatch):
    from alignkit.train.loop import Trainer

    out = tmp_path / "run"
    orig = Trainer._save

    def save_then_crash(self):
        orig(self)
        if self.step == 2:
            self.logger.log(3, {"train/loss": 9.0})  # a step logged after the checkpoint, then a crash
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        go(base, out, **{"train.max_steps": 4, "log.save_every": 2})
    monkeypatch.setattr(Trainer, "_save", orig)
    assert steps_of(out) == [1, 2, 3]
    # an unfinished run with a checkpoint: neither a fresh start nor silence
    with pytest.raises(RunDirError, match="unfinished run with a checkpoint at step 2: pass --resume"):
        go(base, out, **{"train.max_steps": 4, "log.save_every": 2})
    go(base, out, resume="latest", **{"train.max_steps": 4, "log.save_every": 2})
    assert steps_of(out) == [1, 2, 3, 4]
    assert 9.0 not in [json.loads(l).get("train/loss") for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_second_run_is_refused_while_the_first_holds_the_lock(tmp_path, base):
    out = tmp_path / "run"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": first.pid, "host": socket.gethostname(), "command": "sft", "started": 0}
        (out / LOCK).write_text(json.dumps(lock))
        write_marker(out, "sft")  # the first run (an alignkit run) marked the directory as its own
        (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')  # the first run's files
        with pytest.raises(RunDirError, match=rf"is in use by another run \(pid {first.pid} on "):
            go(base, out)
        assert json.loads((out / LOCK).read_text())["pid"] == first.pid  # the first run is unharmed
        assert (out / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'
        assert not (out / "config.yaml").exists()
    finally:
        first.kill()
        first.wait()
    # now that process is gone: its lock is stale, reported and taken over
    res = cli(["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output", str(out),
               "--max-steps", "1", "log.progress=false", "log.samples=0"])
    assert res.exit_code == 0, res.output
    assert f"removing a stale lock (pid {first.pid}" in " ".join(res.output.split())
    assert "stopped at step 1 without a checkpoint; starting afresh" in " ".join(res.output.split())
    assert steps_of(out) == [1]


def test_lock_from_another_host_is_not_taken_over(tmp_path, base):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "dpo", "started": 0}))
    with pytest.raises(RunDirError, match=rf"locked by another run \(pid 1 on elsewhere.*delete {out / LOCK}"):
        go(base, out)


FIRST_RUN = """
import pathlib, sys, time
from alignkit.train.loop import Trainer
go, orig = pathlib.Path(sys.argv[1]), Trainer._update
def held(self, mbs):  # train only once the test says go: the run is surely in progress meanwhile
    while not go.exists():
        time.sleep(0.05)
    return orig(self, mbs)
Trainer._update = held
from alignkit.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_two_concurrent_runs(tmp_path, base):
    """A real first process holds the directory mid-run; a second run is refused; the first finishes
    unharmed."""
    import time

    out, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    args = ["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output", str(out),
            "log.progress=false", "log.samples=0", "train.batch_size=4", "--max-steps", "3"]
    first = subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(go)] + args, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not (out / "config.yaml").exists() and time.time() - t0 < 180 and first.poll() is None:
            time.sleep(0.1)
        res = cli(args[:-2] + ["--max-steps", "2", "--overwrite"])
        assert res.exit_code == 1
        assert f"is in use by another run (pid {first.pid} " in " ".join(one_error_line(res).split())
        go.touch()
        log, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, log
    assert steps_of(out) == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert not (out / LOCK).exists()


def test_full_disk_at_the_final_save_loses_nothing(tmp_path, base, monkeypatch):
    import alignkit.models.loading as loading

    out = tmp_path / "run"
    go(base, out, **{"train.max_steps": 2, "log.save_every": 2})
    old = load_file(str(out / "model" / "model.safetensors"))
    real = loading.save_model

    def enospc(model, tok, d, **kw):
        real(model, tok, d, **kw)  # a partial write: config and weights written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "save_model", enospc)
    with pytest.raises(SaveError, match=r"no space left on device writing the final model to .*need ~\d+ MB.*"
                                        r"latest checkpoint \(step-00000004\) is intact: rerun with --resume"):
        go(base, out, resume="latest", **{"train.max_steps": 4, "log.save_every": 2})
    # the earlier model is intact (never half-replaced), nothing half-written is left behind
    kept = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(old[k], kept[k]) for k in old)
    assert not (out / ".tmp-model").exists()
    monkeypatch.setattr(loading, "save_model", real)
    res = go(base, out, resume="latest", **{"train.max_steps": 4, "log.save_every": 2})
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    new = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_disk_space_is_checked_before_a_checkpoint(tmp_path, base, monkeypatch):
    import alignkit.train.rundir as rundir

    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(SaveError, match=r"no space left on device for checkpoint step 2 at .*checkpoints: "
                                        r"need ~\d+ MB, 1 MB free"):
        go(base, out, **{"log.save_every": 2})
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_on_a_small_tmpfs(tmp_path, base, monkeypatch):
    """The real thing where we may mount (root): a 1 MB tmpfs. First the space check refuses the
    final save; then, with the check disabled, the real ENOSPC inside torch.save / safetensors."""
    import alignkit.train.checkpoint as checkpoint

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated-ENOSPC tests cover this")
    try:
        args = ["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output",
                str(disk / "run"), "--max-steps", "2", "log.progress=false", "log.samples=0", "train.batch_size=4"]
        res = cli(args)
        assert res.exit_code == 1
        line = one_error_line(res)
        assert "no space left on device for the final model" in line and "need ~4 MB, 1 MB free" in line
        assert not (disk / "run" / "model").exists() and not (disk / "run" / ".tmp-model").exists()
        # no pre-check: a checkpoint (model + Adam state, ~3x the model) overflows while being written
        monkeypatch.setattr(checkpoint, "need_bytes", lambda payload: 0)
        (disk / "filler").write_bytes(b"\0" * 600_000)
        res = cli(args + ["--overwrite", "log.save_every=1"])
        assert res.exit_code == 1
        line = one_error_line(res)
        assert re.search(r"no space left on device writing checkpoint step \d to .*checkpoints", line), line
        # the partial checkpoint was removed; what is left is complete
        assert all(p.name.startswith("step-") and (p / "trainer_state.json").exists()
                   for p in (disk / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_output_that_is_a_file_or_read_only(tmp_path, base):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "run"):
        res = cli(["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output", str(out)])
        assert res.exit_code == 1
        assert f"{f} is a file, not a directory; choose another --output" in " ".join(one_error_line(res).split())
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount where we can
        if not _mount_tmpfs(ro, "1m") or subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode:
            pytest.skip("cannot make a read-only directory as root here")
    else:
        ro.mkdir()
        ro.chmod(0o500)
    try:
        res = cli(["sft", "--model", base["model.name_or_path"], "--data", base["data.path"], "--output",
                   str(ro / "run")])
        assert res.exit_code == 1
        line = " ".join(one_error_line(res).split())
        assert f"output {ro / 'run'}" in line and ("ead-only" in line or "ermission denied" in line)
        assert "choose" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            ro.chmod(0o700)
