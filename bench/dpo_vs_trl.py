"""DPO training step time and peak memory: alignkit against TRL's DPOTrainer, same run, same inputs.

Both train the same randomly initialised model (architecture from --model-dir's config.json, so no
weights are needed) on the same synthetic preference pairs, with a frozen reference model, the same
batch size, learning rate, beta and precision, for --steps optimizer steps. Reported: the median
step time after two warm-up steps and the peak GPU memory of each run, and their ratios.

    pip install trl   # the peer; not an alignkit dependency
    python bench/dpo_vs_trl.py --model-dir ~/.cache/alignkit/SmolLM2-135M-Instruct --steps 12
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("alpha beta gamma delta river mountain quiet bright model data train token value reward "
         "policy garden window music paper stone light cloud green simple happy").split()


def make_rows(n: int, prompt_words: int, resp_words: int, seed: int = 0):
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": say(prompt_words), "chosen": say(resp_words), "rejected": say(resp_words)} for _ in range(n)]


def random_model_dir(src: Path, out: Path) -> Path:
    """A model directory with src's config and tokenizer and random weights (fixed seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def run_alignkit(model_dir, data, out, a):
    from alignkit.train.preference import train_dpo

    train_dpo(**{"model.name_or_path": str(model_dir), "data.path": str(data), "train.max_steps": a.steps,
                 "train.batch_size": a.batch, "optim.lr": 1e-6, "dpo.beta": 0.1, "dpo.reference": "model",
                 "data.max_length": a.max_length, "log.progress": False, "log.samples": 0,
                 "diagnostics.enabled": False, "optim.warmup_steps": 0,
                 "model.gradient_checkpointing": a.grad_ckpt}, output=str(out))
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [s["time/step_s"] for s in steps if "time/step_s" in s]


def run_trl(model_dir, data, out, a):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times, last = [], [None]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - last[0])

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(l) for l in Path(data).read_text().splitlines()]
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=1e-6, beta=0.1, bf16=gpu, max_length=a.max_length, logging_steps=1,
                     report_to=[], save_strategy="no", warmup_steps=0, use_cpu=not gpu,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=a.grad_ckpt)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--resp-words", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--only", choices=["alignkit", "trl"], default=None)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both (TRL's default)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model_dir = random_model_dir(Path(a.model_dir).expanduser(), tmp / "model")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.steps * a.batch, a.prompt_words,
                                                                       a.resp_words)))
    print(f"B={a.batch} prompt_words={a.prompt_words} resp_words={a.resp_words} "
          f"gradient_checkpointing={a.grad_ckpt}", flush=True)
    res = {}
    for name, fn in (("alignkit", run_alignkit), ("trl", run_trl)):
        if a.only and name != a.only:
            continue
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = fn(model_dir, data, tmp / name, a)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        med = statistics.median(times[2:] if len(times) > 4 else times)
        res[name] = (med, peak)
        print(f"{name:9s} median step {med * 1000:.0f} ms over {len(times)} steps, peak GPU memory {peak:.2f} GiB",
              flush=True)
    if len(res) == 2:
        (ta, ma), (tt, mt) = res["alignkit"], res["trl"]
        print(f"ratio trl/alignkit: step time {tt / ta:.2f}x, peak memory {mt / ma:.2f}x")


if __name__ == "__main__":
    main()
