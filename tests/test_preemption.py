"""Graceful preemption with real signals: SIGTERM (SIGINT, SIGUSR1) finishes the step, checkpoints, prints
the --resume command and exits 75; the resumed run is bit-identical to a straight one; a second signal
aborts at once; two processes stop at the same step and both save their part."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train.preempt import EXIT_PREEMPTED, resume_command
from tests.helpers import free_port, sft_rows

SRC = str(Path(__file__).parents[1] / "src")

# the run holds step `at` until the test has sent its signal (so "step 4 of 6" is exact, not a race):
# mode "stop": until a stop was requested (or the file `release` appears: the other process of a pair);
# mode "hold": until `release` appears, whatever signals came meanwhile
WRAPPER = """
import os, sys, time, pathlib
from alignkit.train.loop import Trainer
ready, at, mode = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
orig = Trainer._update
def held(self, mbs):
    if self.step == at and not getattr(self, "_held", False):
        self._held = True
        (ready.parent / f"{ready.name}.{self.acc.process_index}").write_text(str(os.getpid()))
        t0 = time.time()
        while time.time() - t0 < 120 and not (ready.parent / "release").exists():
            if mode == "stop" and self.stop.requested:
                break
            time.sleep(0.02)
    return orig(self, mbs)
Trainer._update = held
from alignkit.cli import main
main(sys.argv[4:])
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _args(tiny_model, data, out, steps=6):
    return ["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--max-steps", str(steps),
            "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=2", "log.progress=false", "log.samples=0",
            "train.precision=fp32"]


def _start(tmp_path, args, at, mode="stop", nproc=1):
    script = tmp_path / "run.py"
    script.write_text(WRAPPER)
    ready = tmp_path / "ready"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    proc = subprocess.Popen(launcher + [str(script), str(ready), str(at), mode] + [str(a) for a in args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    pids = []
    t0 = time.time()
    while len(pids) < nproc and time.time() - t0 < 240 and proc.poll() is None:
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("ready.*")) if p.read_text()]
        time.sleep(0.05)
    assert len(pids) == nproc, proc.communicate(timeout=60)[0][-3000:]
    return proc, pids


def _steps(out):
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]


def _cli(args, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "alignkit"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "alignkit"]
    res = subprocess.run(cmd + [str(a) for a in args], env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _same_weights(a, b):
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigterm_checkpoints_the_step_and_the_resume_is_exact(tmp_path, tiny_model, jsonl):
    """The reported case: kill -TERM at step 4 of a 6-step run without log.save_every (main: rc 143, no
    checkpoint, the next run starts afresh)."""
    data = jsonl("d.jsonl", sft_rows(32))
    out = tmp_path / "run"
    proc, (pid,) = _start(tmp_path, _args(tiny_model, data, out), at=3)
    os.kill(pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "SIGTERM: finishing this step, then writing a checkpoint" in log
    line = [l for l in log.splitlines() if l.startswith("preempted by SIGTERM after step 4")]
    assert len(line) == 1, log[-3000:]
    assert line[0].endswith(resume_command(_args(tiny_model, data, out))), line
    assert "Traceback" not in log
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert _steps(out) == [1, 2, 3, 4] and not (out / "model").exists()
    # the printed command resumes; the result is the straight run's, bit for bit
    _cli(_args(tiny_model, data, out) + ["--resume"])
    _cli(_args(tiny_model, data, tmp_path / "straight"))
    _same_weights(out, tmp_path / "straight")
    assert _steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_also_checkpoint(tmp_path, tiny_model, jsonl, sig):
    data = jsonl("d.jsonl", sft_rows(16))
    out = tmp_path / "run"
    proc, (pid,) = _start(tmp_path, _args(tiny_model, data, out, steps=4), at=1)
    os.kill(pid, sig)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert f"preempted by {sig.name} after step 2" in log and "Aborted" not in log
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "rng_state_0.safetensors").is_file()


def test_a_second_signal_aborts_at_once(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", sft_rows(16))
    out = tmp_path / "run"
    proc, (pid,) = _start(tmp_path, _args(tiny_model, data, out, steps=4), at=1, mode="hold")
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)  # within a second: the same request (a launcher forwarding it), not a second
    time.sleep(1.5)
    assert proc.poll() is None
    os.kill(pid, signal.SIGTERM)  # a real second signal: no step finished, no checkpoint, killed by it
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, log[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_exactly(tmp_path, tiny_model, jsonl):
    """SIGTERM reaches one process of two (as a node-local signal would): both finish the same step, both
    save their part (each its own random states), and the resumed pair equals a straight pair."""
    data = jsonl("d.jsonl", sft_rows(32))
    out = tmp_path / "run"
    args = _args(tiny_model, data, out)
    proc, pids = _start(tmp_path, args, at=3, nproc=2)
    os.kill(pids[1], signal.SIGTERM)  # rank 1 only; rank 0 goes on into the step and learns of it there
    time.sleep(0.5)
    (tmp_path / "release").touch()
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, log[-3000:]
    assert f"exitcode  : {EXIT_PREEMPTED}" in log or f"exit code {EXIT_PREEMPTED}" in log or \
        proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert len([l for l in log.splitlines() if l.startswith("preempted by a signal to another process after step 4")
                or l.startswith("preempted by SIGTERM after step 4")]) == 1, log[-3000:]
    ckpt = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == ["rng_state_0.safetensors", "rng_state_1.safetensors"]
    assert not list(ckpt.glob("*.pkl"))
    assert _steps(out) == [1, 2, 3, 4]
    _cli(args + ["--resume"], nproc=2)
    _cli(_args(tiny_model, data, tmp_path / "straight"), nproc=2)
    _same_weights(out, tmp_path / "straight")
