"""alignkit against TRL on the same random-weight model, the same rows and the same machine, in one invocation.

    python bench/vs_trl.py                                  # every task, sizes tiny and 135m, CPU
    python bench/vs_trl.py --tasks dpo,grpo --sizes 135m --steps 4
    python bench/vs_trl.py --device cuda --sizes 135m,1.7b  # on a GPU (bf16), plus SFT MFU at 1.7b
    python bench/vs_trl.py --trl-path /work/bench-site      # where TRL is installed, if not importable

Tasks (both sides with their default settings except the shared shape below):
  sft         SFT on prompt/completion rows, batch 4, max 128 tokens
  rm          Bradley-Terry reward model on preference pairs, batch 4, max 128 tokens
  dpo         DPO (sigmoid loss, beta 0.1, frozen reference model), batch 4 pairs, max 128 tokens
  grpo        GRPO, 4 prompts x 4 samples, 32 new tokens, a rule reward (share of the letter 'a')
  generation  sampling 16 prompts x 32 new tokens from a LoRA policy (r 16, every linear layer):
              alignkit's rollout engine against transformers' `generate` on the same peft model
              (what TRL's trainers call without vLLM)
Sizes: tiny (2 layers, hidden 64, SmolLM2's 49k vocabulary), 135m (SmolLM2-135M's architecture),
1.7b (SmolLM2-1.7B's architecture; GPU only). Weights are random (fixed seed); the tokenizer is
SmolLM2's, read from the embedded model directory (no download).

``--flops`` instead counts the matrix FLOPs of one training step on each side (sft, rm, dpo;
``torch.utils.flop_counter``: matrix products and attention, forward and backward) and prints their
ratio: with both sides' matrix products equally fast, the most the step-time ratio can reach.

Each (task, size, side) runs in its own subprocess (so the peak memory is its own); TRL runs with
``--trl-path`` on its PYTHONPATH only, so TRL never enters alignkit's environment. Reported: median
step time after the first (warm-up) step, tokens/s (sft/rm/dpo: the rows' tokens, prompt counted
once per sequence; grpo: completion tokens; generation: generated tokens), peak memory (GPU:
``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), and alignkit/TRL ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("alpha beta gamma delta river mountain quiet bright model data train token value reward policy garden "
         "window music paper stone light cloud green simple happy apple banana cat arrive small").split()
SIZES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2),
    "135m": {},  # the embedded model's own config
    "1.7b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32),
}
SHAPE = dict(batch=4, max_length=128, prompt_words=30, response_words=60, grpo_prompts=4, grpo_samples=4,
             new_tokens=32, gen_prompts=16)


def default_model_dir() -> Path:
    from alignkit.models.default import resolve_model_path

    return Path(resolve_model_path(None))


def build_model(size: str, out: Path, src: Path) -> Path:
    """A model directory with random weights (seed 0) of the given size and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    cfg = AutoConfig.from_pretrained(src)
    for k, v in SIZES[size].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": say(SHAPE["prompt_words"]), "completion": say(SHAPE["response_words"]),
             "chosen": say(SHAPE["response_words"]), "rejected": say(SHAPE["response_words"])} for _ in range(n)]


def row_tokens(tok, rows, task: str) -> float:
    """Mean tokens a training step processes per row (prompt + response, capped at max_length)."""
    L = SHAPE["max_length"]
    cap = lambda p, r: min(L, len(tok(p + " " + r)["input_ids"]))  # noqa: E731
    if task == "sft":
        return statistics.mean(cap(r["prompt"], r["completion"]) for r in rows)
    return statistics.mean(cap(r["prompt"], r["chosen"]) + cap(r["prompt"], r["rejected"]) for r in rows)


# ---------------------------------------------------------------------------------------------- workers
def _alignkit(task, model_dir, data, out, steps, device, overrides=()):
    common = {"model.name_or_path": str(model_dir), "data.path": str(data), "train.max_steps": steps,
              "log.progress": False, "log.samples": 0, "diagnostics.enabled": False, "optim.warmup_steps": 0}
    for kv in overrides:  # --alignkit-set key=value (YAML-typed), applied over the shared shape
        import yaml
        key, _, value = kv.partition("=")
        common[key] = yaml.safe_load(value)
    B, L = SHAPE["batch"], SHAPE["max_length"]
    if task == "generation":
        return _alignkit_generation(model_dir, device)
    if task == "sft":
        from alignkit.train.sft import train_sft
        train_sft(**common, **{"train.batch_size": B, "data.max_length": L, "optim.lr": 1e-5}, output=str(out))
    elif task == "rm":
        from alignkit.train.reward import train_rm
        train_rm(**common, **{"train.batch_size": B, "data.max_length": L, "optim.lr": 1e-5}, output=str(out))
    elif task == "dpo":
        from alignkit.train.preference import train_dpo
        train_dpo(**common, **{"train.batch_size": B, "data.max_length": L, "optim.lr": 1e-6, "dpo.beta": 0.1,
                               "dpo.reference": "model"}, output=str(out))
    elif task == "grpo":
        from alignkit.train.grpo import train_grpo
        # one optimizer update per rollout, as TRL's GRPOTrainer does with these arguments (the same work)
        train_grpo(**common, **{"train.batch_size": SHAPE["grpo_prompts"], "grpo.num_generations": SHAPE["grpo_samples"],
                                "grpo.num_minibatches": 1,
                                "generation.max_new_tokens": SHAPE["new_tokens"], "optim.lr": 1e-6,
                                "rewards": ["python:alignkit.rewards.toy:char_share"]}, output=str(out))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [m["time"] for m in lines if "time/step_s" in m]  # seconds since the start, at each step's log line
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]  # step end to step end, logging included


def _prompt_ids(tok, n):
    rows = make_rows(n, seed=7)
    return [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=False) for r in rows]


def _alignkit_generation(model_dir, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.rollout.generate import GenerationConfig, generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _gen_model(AutoModelForCausalLM, model_dir, device)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in _prompt_ids(tok, SHAPE["gen_prompts"])]
    cfg = GenerationConfig(max_new_tokens=SHAPE["new_tokens"], temperature=1.0, batch_size=SHAPE["gen_prompts"])
    times = []
    for i in range(4):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        generate(model, tok, prompts, cfg, compute_logprobs=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _gen_model(cls, model_dir, device):
    """The policy of an RL run: the model with a LoRA adapter (r 16 on every linear layer, B drawn at random
    so the adapter is not a no-op), the same on both sides."""
    import torch
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = get_peft_model(cls.from_pretrained(model_dir, dtype=dtype),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.to(device).eval()


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _trl(task, model_dir, data, out, steps, device, fast, trl_precision="default"):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    if task == "generation":
        return _hf_generation(model_dir, device)
    times, last = [], [0.0]

    class Clock(TrainerCallback):  # step end to step end: data loading and logging count, as in alignkit's
        def on_train_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    gpu = device == "cuda"
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    B, L = SHAPE["batch"], SHAPE["max_length"]
    common = dict(output_dir=str(out), max_steps=steps, report_to=[], save_strategy="no",
                  use_cpu=not gpu, dataloader_num_workers=0, disable_tqdm=True, warmup_steps=0)
    if trl_precision == "fp32":  # else TRL's own default: bf16 autocast whenever fp16 is not set, CPU included
        common["bf16"] = False
    if fast:  # TRL's fastest settings we know of on a GPU: no gradient checkpointing, padding-free where offered
        common["gradient_checkpointing"] = False
    load = dict(dtype=torch.float32)
    if task == "sft":
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        extra = {"padding_free": True} if fast else {}
        args = SFTConfig(per_device_train_batch_size=B, max_length=L, learning_rate=1e-5, **extra, **common)
        tr = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, **load), args=args, train_dataset=ds,
                        processing_class=tok, callbacks=[Clock()])
    elif task == "rm":
        from trl import RewardConfig, RewardTrainer
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
        model.config.pad_token_id = tok.pad_token_id
        args = RewardConfig(per_device_train_batch_size=B, max_length=L, learning_rate=1e-5, **common)
        tr = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    elif task == "dpo":
        from trl import DPOConfig, DPOTrainer
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
        ref = AutoModelForCausalLM.from_pretrained(model_dir, **load)
        extra = {"padding_free": True} if fast else {}
        args = DPOConfig(per_device_train_batch_size=B, max_length=L, learning_rate=1e-6, beta=0.1, **extra, **common)
        tr = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, **load), ref_model=ref, args=args,
                        train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    elif task == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        from alignkit.rewards.toy import char_share

        def reward(prompts, completions, **kw):
            return char_share(prompts, completions)

        ds = Dataset.from_list([{"prompt": p} for p in _prompt_ids(tok, 64)])
        G = SHAPE["grpo_samples"]
        args = GRPOConfig(per_device_train_batch_size=SHAPE["grpo_prompts"] * G, num_generations=G,
                          max_completion_length=SHAPE["new_tokens"], learning_rate=1e-6, **common)
        tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, **load), reward_funcs=reward,
                         args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    tr.train()
    return times


def _hf_generation(model_dir, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = _gen_model(AutoModelForCausalLM, model_dir, device)
    enc = tok(_prompt_ids(tok, SHAPE["gen_prompts"]), return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items()}
    times = []
    for i in range(4):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=SHAPE["new_tokens"], do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, pad_token_id=tok.pad_token_id)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_step_flops(a, out) -> float:
    """Matrix FLOPs of the second training step of a two-step run (the first may do one-off work), counted
    between step boundaries with one FlopCounterMode over the whole run."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    marks = []
    if a.side == "alignkit":
        from alignkit.train import loop

        real = loop.Trainer._global_batch  # called once at the start of each step

        def batch(self, step):
            marks.append(counter.get_total_flops())
            return real(self, step)

        loop.Trainer._global_batch = batch
        with counter:
            _alignkit(a.task, a.model_dir, a.data, out, 2, a.device, a.alignkit_set)
        return counter.get_total_flops() - marks[1]  # the run ends after step 2 (no eval, no samples)
    from transformers import TrainerCallback, trainer as hf_trainer

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append(counter.get_total_flops())

        def on_step_end(self, args, state, control, **kw):
            marks.append(counter.get_total_flops())

    real_init = hf_trainer.Trainer.__init__

    def init(self, *args, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [Marks()]
        real_init(self, *args, **kw)

    hf_trainer.Trainer.__init__ = init
    with counter:
        _trl(a.task, a.model_dir, a.data, out, 2, a.device, a.trl_fast, a.trl_precision)
    return marks[3] - marks[2]


def peak_rss_gib() -> float:
    """This process's own peak RSS. Linux: VmHWM, which belongs to the address space and starts afresh at
    exec; ru_maxrss instead keeps the parent's RSS at fork time (the driver's, after it converted the
    embedded model), which put a floor of about 1.1 GiB under every small run."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 / (1024 if sys.platform == "darwin" else 1)


def worker(a) -> None:
    import torch

    torch.manual_seed(0)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = Path(a.workdir) / f"{a.task}-{a.size}-{a.side}"
    shutil.rmtree(out, ignore_errors=True)  # a reused --workdir: start each side from an empty output
    if a.flops:
        return print("RESULT " + json.dumps({"gflop": count_step_flops(a, out) / 1e9}), flush=True)
    if a.side == "alignkit":
        times = _alignkit(a.task, a.model_dir, a.data, out, a.steps, a.device, a.alignkit_set)
    else:
        times = _trl(a.task, a.model_dir, a.data, out, a.steps, a.device, a.trl_fast, a.trl_precision)
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else peak_rss_gib()
    print("RESULT " + json.dumps({"times": times, "peak_gib": peak}), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def run_side(a, task, size, side, model_dir, data):
    env = dict(os.environ)
    if side == "trl" and a.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [a.trl_path, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--task", task, "--size", size, "--side", side,
           "--model-dir", str(model_dir), "--data", str(data), "--workdir", str(a.workdir), "--steps",
           str(a.steps if task != "grpo" else a.grpo_steps), "--device", a.device, "--trl-precision", a.trl_precision]
    cmd += (["--trl-fast"] if a.trl_fast else []) + (["--flops"] if a.flops else []) + [x for kv in a.alignkit_set for x in ("--alignkit-set", kv)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
    raise RuntimeError(f"{side} {task} {size} failed (exit {p.returncode})")


def per_step_units(task, tok, rows):
    if task == "grpo":
        return SHAPE["grpo_prompts"] * SHAPE["grpo_samples"] * SHAPE["new_tokens"], "completion tok/s"
    if task == "generation":
        return SHAPE["gen_prompts"] * SHAPE["new_tokens"], "generated tok/s"
    return SHAPE["batch"] * row_tokens(tok, rows, task), "tok/s"


def mfu(model_dir, tokens_per_s) -> float:
    """Model FLOPs utilisation of a training step: 6 * parameters * tokens/s over the bf16 peak (H100/H200
    dense, 989 TFLOP/s); attention FLOPs are left out (small at 128 tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())
    return 6 * n * tokens_per_s / 989e12


def flops_table(a, data, src: Path) -> None:
    print("| work | size | alignkit GFLOP/step | TRL GFLOP/step | TRL / alignkit |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    results = []
    for size in a.sizes.split(","):
        model_dir = build_model(size, a.workdir / f"model-{size}", src)
        for task in [t for t in a.tasks.split(",") if t in ("sft", "rm", "dpo")]:
            g = {side: run_side(a, task, size, side, model_dir, data)["gflop"] for side in ("alignkit", "trl")}
            results.append({"task": task, "size": size, "gflop": g, "ratio": g["trl"] / g["alignkit"]})
            print(f"| {task} | {size} | {g['alignkit']:.1f} | {g['trl']:.1f} | **{g['trl'] / g['alignkit']:.2f}x** |",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sft,rm,dpo,grpo,generation")
    ap.add_argument("--sizes", default="tiny,135m")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--trl-path", default=os.environ.get("TRL_PATH"), help="a directory holding trl (PYTHONPATH)")
    ap.add_argument("--trl-fast", action="store_true", help="TRL's fastest GPU settings (no gradient checkpointing, "
                                                            "padding-free SFT/DPO)")
    ap.add_argument("--trl-precision", default="default", choices=["default", "fp32"],
                    help="default: TRL's own (bf16 autocast whenever fp16 is off, on a CPU too); fp32: bf16=False")
    ap.add_argument("--alignkit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an alignkit config override for the alignkit side (repeatable), e.g. train.precision=fp32")
    ap.add_argument("--flops", action="store_true", help="count each side's matrix FLOPs per step (sft, rm, dpo) "
                                                         "instead of timing")
    ap.add_argument("--src-model", default=None, help="directory with SmolLM2's config and tokenizer")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from transformers import AutoTokenizer

    a.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-vs-trl-"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    src = Path(a.src_model) if a.src_model else default_model_dir()
    rows = make_rows(64)
    data = a.workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(src)
    import platform
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, device {a.device}, steps {a.steps} "
          f"(grpo {a.grpo_steps}), median after the first", flush=True)
    if a.flops:
        return flops_table(a, data, src)
    print("| work | size | alignkit step | TRL step | alignkit | TRL | ratio | alignkit peak | TRL peak |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for size in a.sizes.split(","):
        model_dir = build_model(size, a.workdir / f"model-{size}", src)
        for task in a.tasks.split(","):
            res = {side: run_side(a, task, size, side, model_dir, data) for side in ("alignkit", "trl")}
            units, unit_name = per_step_units(task, tok, rows)
            med = {s: statistics.median(r["times"][1:] or r["times"]) for s, r in res.items()}
            rate = {s: units / med[s] for s in med}
            row = {"task": task, "size": size, "unit": unit_name, "step_s": med, "rate": rate,
                   "peak_gib": {s: r["peak_gib"] for s, r in res.items()}, "ratio": rate["alignkit"] / rate["trl"]}
            if a.device == "cuda" and task == "sft":
                row["mfu"] = {s: mfu(model_dir, rate[s]) for s in rate}
            results.append(row)
            mem = "GPU" if a.device == "cuda" else "RSS"
            extra = f" (MFU {row['mfu']['alignkit']:.0%} vs {row['mfu']['trl']:.0%})" if "mfu" in row else ""
            print(f"| {task} | {size} | {med['alignkit']:.2f} s | {med['trl']:.2f} s | {rate['alignkit']:.0f} "
                  f"{unit_name} | {rate['trl']:.0f} | **{row['ratio']:.2f}x**{extra} | "
                  f"{row['peak_gib']['alignkit']:.2f} GiB {mem} | {row['peak_gib']['trl']:.2f} GiB |", flush=True)
    print(f"# load at the end {os.getloadavg()[0]:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
