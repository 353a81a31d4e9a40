"""Two CPU processes (gloo) with the same global batch give the same model as one process.

Every run here pins ``train.precision=fp32``: the claim is agreement to fp32 rounding; under bf16 autocast
(the default where bf16 is native) a different batch split rounds differently."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port, sft_rows


def _run(args, nproc, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "alignkit.cli"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               "-m", "alignkit.cli"] + args
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_processes_equal_one(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", sft_rows(32))
    common = ["sft", "--model", str(tiny_model), "--data", str(data), "--max-steps", "3", "optim.lr=1e-3",
              "log.samples=0", "train.precision=fp32"]
    # one process accumulating 4 x 2 (equal to batch 8: test_loop) sees the same micro-batches as two
    # processes of 4, so every logged metric must match: rank 0 logs the global numbers, not its half's
    # (train/tokens of rank 0 alone is the mean length of its 4 rows, which differs)
    one = _run(common + ["--output", str(tmp_path / "one"), "train.batch_size=4", "train.grad_accum=2"], 1, tmp_path)
    two = _run(common + ["--output", str(tmp_path / "two"), "train.batch_size=4"], 2, tmp_path)
    rows = {n: [json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    for key in ("train/loss", "train/tokens", "train/units", "train/grad_norm"):
        assert [r[key] for r in rows["one"]] == pytest.approx([r[key] for r in rows["two"]], rel=1e-5), key
    for res in (one, two):  # rank 0 alone prints the step lines and the summary, with global numbers
        assert len(re.findall(r"^\[sft\] step 3/3 loss=", res.stdout, re.M)) == 1, res.stdout
        assert res.stderr.count("summary") == 1, res.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    for k in a:
        assert not torch.equal(a[k], start[k]) or "norm" in k  # it trained
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
"""


def test_fsdp_through_an_accelerate_config_equals_one_process(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", sft_rows(32))
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(FSDP_CONFIG)
    common = ["sft", "--model", str(tiny_model), "--data", str(data), "--max-steps", "3", "optim.lr=1e-3",
              "log.progress=false", "log.save_every=2", "train.precision=fp32"]
    _run(common + ["--output", str(tmp_path / "one"), "train.batch_size=8"], 1, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
                          "--main_process_port", str(free_port()), "-m", "alignkit"] + common
                         + ["--output", str(tmp_path / "fsdp"), "train.batch_size=4"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000002").is_dir()


def test_kto_two_processes_share_one_kl_reference_point(tmp_path, tiny_model, jsonl):
    """KTO's z0 = max(0, mean KL of mismatched pairs) is a batch statistic: each process must use the
    whole global batch's pairs (all-gathered), or two processes train another model than one."""
    from tests.helpers import pref_rows

    data = jsonl("p.jsonl", pref_rows(32, 0))
    common = ["kto", "--model", str(tiny_model), "--data", str(data), "--max-steps", "4", "optim.lr=1e-2",
              "optim.scheduler=constant", "optim.warmup_steps=0", "log.progress=false", "log.every=1",
              "train.seed=3", "train.precision=fp32"]
    _run(common + ["--output", str(tmp_path / "one"), "train.batch_size=8"], 1, tmp_path)
    _run(common + ["--output", str(tmp_path / "two"), "train.batch_size=4"], 2, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    z0 = [r["kto/z0"] for r in rows if "kto/z0" in r]
    assert len(z0) == 4 and max(z0[1:]) > 1e-3, z0  # the reference point is in play after step 1
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k
