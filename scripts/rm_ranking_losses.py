"""Compare the ranking losses of `alignkit rm` on held-out rankings (the table in docs/human-feedback.md).

A tiny task anyone can rerun on a CPU in a few minutes: each response is 6 letters, its true utility is
its number of vowels, and the training rankings of K = 4 responses are *noisy*: drawn from a
Plackett-Luce model over the true utilities (temperature ``--noise``), as rankings by people are. The
held-out rankings are the true orders. Three set-ups, same model, steps and learning rate:

- ``bradley_terry``: all K-choose-2 pairs of a prompt in one batch element (the default, InstructGPT);
- ``plackett_luce``: the likelihood of the whole ranking;
- ``pairs_shuffled``: the same pairs written as separate rows (each pair its own element), the way a
  pairwise-only trainer sees a ranking.

    python scripts/rm_ranking_losses.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from itertools import combinations
from pathlib import Path


def noisy_ranking(rng: random.Random, utilities, noise: float):
    """A Plackett-Luce draw: pick the next best with probability proportional to exp(u / noise)."""
    left, order = list(range(len(utilities))), []
    while left:
        w = [math.exp(utilities[i] / noise) for i in left]
        i = rng.choices(left, weights=w)[0]
        order.append(i)
        left.remove(i)
    return order


def make_rows(n: int, seed: int, k: int = 4, noise: float = 0.0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "say:" + "".join(rng.choice("mnop") for _ in range(rng.randint(1, 4)))
        vowels = rng.sample(range(7), k)
        resp = []
        for v in vowels:
            letters = [rng.choice("aeiou") for _ in range(v)] + [rng.choice("xyzqw") for _ in range(6 - v)]
            rng.shuffle(letters)
            resp.append("".join(letters))
        order = noisy_ranking(rng, vowels, noise) if noise > 0 else sorted(range(k), key=lambda i: -vowels[i])
        rows.append({"prompt": prompt, "responses": [resp[i] for i in order]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=64, help="training prompts")
    ap.add_argument("--heldout", type=int, default=200, help="held-out prompts (true orders)")
    ap.add_argument("--noise", type=float, default=1.5, help="Plackett-Luce temperature of the training rankings")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    from alignkit.testing import save_tiny_model
    from alignkit.train.reward import train_rm

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            model = save_tiny_model(tmp / f"model{seed}", seed=seed)
            train = make_rows(args.train, 100 + seed, noise=args.noise)
            held = make_rows(args.heldout, 999)
            files = {}
            for name, rows in (("rankings", train), ("pairs", [
                    {"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
                    for r in train for i, j in combinations(range(len(r["responses"])), 2)])):
                files[name] = tmp / f"{name}{seed}.jsonl"
                files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
            for setup, data, loss, batch in (("bradley_terry", "rankings", "bradley_terry", 4),
                                             ("plackett_luce", "rankings", "plackett_luce", 4),
                                             ("pairs_shuffled", "pairs", "bradley_terry", 24)):
                s = train_rm(**{"model.name_or_path": str(model), "data.path": str(files[data]),
                                "data.eval_path": str(tmp / "held.jsonl"), "train.epochs": args.epochs,
                                "train.batch_size": batch, "optim.lr": 3e-3, "log.progress": False,
                                "train.seed": seed, "rm.loss": loss, "log.samples": 0},
                             output=str(tmp / f"{setup}{seed}"))
                for key in ("eval/accuracy", "eval/ranking_exact", "eval/plackett_luce_nll"):
                    results.setdefault(setup, {}).setdefault(key, []).append(s[key])
                print(setup, seed, {k: round(s[k], 4) for k in ("eval/accuracy", "eval/ranking_exact",
                                                                "eval/plackett_luce_nll")}, flush=True)
    print(f"\n{args.train} training rankings (K=4, noise {args.noise}), {args.heldout} held-out true orders, "
          f"{args.epochs} epochs, {args.seeds} seeds (mean ± sd)")
    print("| set-up | pairwise accuracy | exact ranking | Plackett-Luce NLL |")
    print("|---|---|---|---|")
    for setup, m in results.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
                 for v in (m["eval/accuracy"], m["eval/ranking_exact"], m["eval/plackett_luce_nll"])]
        print(f"| {setup} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
