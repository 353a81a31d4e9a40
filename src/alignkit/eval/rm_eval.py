"""``alignkit eval --reward-model DIR --data pairs.jsonl``: held-out accuracy and calibration.

A Bradley-Terry reward model (Bradley and Terry 1952; Ouyang et al. 2022, eq. 1) predicts
P(chosen preferred) = sigmoid(r_chosen - r_rejected). Accuracy only asks whether the sign is right;
calibration asks whether the probabilities mean what they say: of the pairs predicted at 0.8, are
80% right? Over-confident reward models are easier to over-optimize (Gao et al. 2022), and a
calibrated one can be used to weight or filter labels. ECE is the expected calibration error of
Naeini et al. 2015 / Guo et al. 2017 over equal-width bins (see :func:`alignkit.eval.metrics.calibration`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from alignkit.eval import metrics as M

Scorer = Callable[[List[Any], List[str]], List[float]]


def score_pairs(scorer: Scorer, prompts: Sequence[Any], chosen: Sequence[str],
                rejected: Sequence[str]) -> Tuple[List[float], List[float]]:
    """Score both responses of every pair in one call: (chosen scores, rejected scores)."""
    n = len(prompts)
    scores = list(scorer(list(prompts) * 2, list(chosen) + list(rejected)))
    if len(scores) != 2 * n:
        raise ValueError(f"reward scorer returned {len(scores)} scores for {2 * n} responses")
    return scores[:n], scores[n:]


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float], n_bins: int = 10) -> Dict[str, Any]:
    """Accuracy (ties half), mean margin r_c - r_r, mean predicted P(chosen) = mean sigmoid(r_c - r_r),
    ECE and the calibration bins: ``{"rm/accuracy", "rm/margin", "rm/prob_chosen", "rm/ece",
    "rm/num_pairs", "calibration": [bins]}``.
    """
    cal = M.calibration(chosen, rejected, n_bins)
    diffs = [c - r for c, r in zip(chosen, rejected)]
    probs = [M._sigmoid(d) for d in diffs]
    return {"rm/accuracy": M.pairwise_accuracy(chosen, rejected),
            "rm/margin": sum(diffs) / len(diffs) if diffs else float("nan"),
            "rm/prob_chosen": sum(probs) / len(probs) if probs else float("nan"),
            "rm/ece": cal["ece"], "rm/num_pairs": float(cal["n"]), "calibration": cal["bins"]}


def _load_pairs(cfg) -> Tuple[List[Any], List[str], List[str], List[int]]:
    # deferred: pydantic stays out of this module's import
    from alignkit.data.formats import parse_rows
    from alignkit.data.load import DataError, DataReport, read_rows

    if not cfg.data.path:
        raise DataError("no pairs to evaluate the reward model on: pass --data pairs.jsonl")
    name, rows = read_rows(cfg.data.path, split=cfg.data.split, max_rows=cfg.data.max_rows)
    report = DataReport(source=name)
    examples = parse_rows(rows, "preference", report)
    if not examples:
        raise DataError(f"{name}: no preference pairs\n" + "\n".join(report.summary_lines()))
    for line in report.summary_lines()[1:]:
        print(line)
    return ([e.prompt for e in examples], [e.chosen for e in examples], [e.rejected for e in examples],
            [e.row for e in examples])


def evaluate_reward_model(cfg, scorer: Scorer = None) -> Dict[str, Any]:
    """Score every pair of ``cfg.data.path`` with ``cfg.reward_model`` (or ``scorer``) and write the
    eval run (eval.json with the calibration bins, samples.jsonl with each pair's scores)."""
    # deferred: torch stays out of this module's import
    from alignkit.eval.evaluate import display_prompt, print_table, write_eval_run

    prompts, chosen, rejected, rows = _load_pairs(cfg)
    if scorer is None:
        # deferred: torch stays out of this module's import
        from alignkit.models.reward import load_reward_scorer

        scorer = load_reward_scorer(cfg.reward_model, batch_size=cfg.batch_size, dtype=cfg.model.dtype,
                                    chat_template=cfg.data.chat_template, max_length=cfg.data.max_length)
    sc, sr = score_pairs(scorer, prompts, chosen, rejected)
    result = pair_metrics(sc, sr, cfg.calibration_bins)
    bins = result.pop("calibration")
    samples = [{"tag": "pair", "prompt": display_prompt(p), "row": r, "completion": f"chosen: {c}\n\nrejected: {j}",
                "reward": a - b, "score_chosen": a, "score_rejected": b}
               for p, c, j, r, a, b in zip(prompts, chosen, rejected, rows, sc, sr)]
    context = {"reward_model": cfg.reward_model, "data": cfg.data.path}
    write_eval_run(Path(cfg.output), cfg, result, context, samples, extra={"calibration": bins})
    print_table(result, f"reward model: {cfg.reward_model}")
    _print_bins(bins)
    return result


def _print_bins(bins: List[Dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="calibration (predicted vs observed P(preferred))")
    for col in ("bin", "mean predicted", "observed", "count"):
        table.add_column(col, justify="right")
    for b in bins:
        if b["count"]:
            table.add_row(f"[{b['lo']:.1f}, {b['hi']:.1f})", f"{b['mean_predicted']:.3f}", f"{b['observed']:.3f}",
                          str(b["count"]))
    Console(stderr=True).print(table)
