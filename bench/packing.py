"""Packing and prefix sharing: alignkit's SFT and DPO steps with them (the default) and without
(``train.packing=false train.prefix_sharing=false``, the padded batches alignkit used before), same
random-weight model, same rows, one invocation. Prints tokens/s (real tokens: prompt + response of
every sequence, no padding), peak RSS of each run (its own process) and the ratios.

    python bench/packing.py --model-dir ~/.cache/alignkit/SmolLM2-135M-Instruct --steps 4

The rows have mixed lengths (prompts 16-160 words, responses 8-120), as chat data does; fixed-length
rows would leave nothing to unpad (prefix sharing still saves the second prompt pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("alpha beta gamma delta river mountain quiet bright model data train token value reward "
         "policy garden window music paper stone light cloud green simple happy").split()


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        p = say(rng.randint(16, 160))
        rows.append({"prompt": p, "chosen": say(rng.randint(8, 120)), "rejected": say(rng.randint(8, 120)),
                     "completion": say(rng.randint(8, 120))})
    return rows


def child(kind: str, model_dir: str, data: str, out: str, steps: int, batch: int, packed: bool) -> None:
    import resource

    over = {"model.name_or_path": model_dir, "data.path": data, "train.max_steps": steps,
            "train.batch_size": batch, "optim.lr": 1e-6, "log.progress": False, "log.samples": 0,
            "diagnostics.enabled": False, "optim.warmup_steps": 0, "data.max_length": 512,
            "train.packing": packed, "train.prefix_sharing": packed}
    if kind == "dpo":
        from alignkit.train.preference import train_dpo as run

        over.update({"dpo.beta": 0.1, "dpo.reference": "model"})
    else:
        from alignkit.train.sft import train_sft as run
    run(**over, output=out)
    times = [json.loads(l).get("time/step_s") for l in Path(out, "metrics.jsonl").read_text().splitlines()]
    times = [t for t in times if t is not None]
    print(json.dumps({"step_s": times, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def real_tokens(kind: str, model_dir: str, rows, batch: int) -> float:
    """Mean real tokens per step (what either layout computes on, before padding)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    per_row = [2 * n(r["prompt"]) + n(r["chosen"]) + n(r["rejected"]) if kind == "dpo"
               else n(r["prompt"]) + n(r["completion"]) for r in rows]
    return statistics.mean(per_row) * batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/alignkit/SmolLM2-135M-Instruct"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kinds", default="sft,dpo")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        k, m, d, o, s, b, p = a.child
        return child(k, m, d, o, int(s), int(b), p == "1")
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from dpo_vs_trl import random_model_dir

    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    model = random_model_dir(Path(a.model_dir), work / "model")
    rows = make_rows(a.batch * a.steps, seed=0)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, {a.steps} steps of {a.batch} rows, "
          f"model {Path(a.model_dir).name} shape with random weights; median of steps 2..")
    print("| work | padded tok/s | packed tok/s | speedup | padded RSS MB | packed RSS MB |")
    print("|---|---|---|---|---|---|")
    for kind in a.kinds.split(","):
        res = {}
        for packed in (False, True):
            out = work / f"{kind}-{int(packed)}"
            cmd = [sys.executable, __file__, "--child", kind, str(model), str(data), str(out), str(a.steps),
                   str(a.batch), "1" if packed else "0"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            res[packed] = json.loads(proc.stdout.strip().splitlines()[-1])
        tokens = real_tokens(kind, str(model), rows, a.batch)
        tps = {p: tokens / statistics.median(r["step_s"][1:] or r["step_s"]) for p, r in res.items()}
        print(f"| {kind} | {tps[False]:.0f} | {tps[True]:.0f} | {tps[True] / tps[False]:.2f}x "
              f"| {res[False]['rss_mb']:.0f} | {res[True]['rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
