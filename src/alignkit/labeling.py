"""Synthetic preference data: sample several responses per prompt, then label them with a reward.

``alignkit sample-pairs`` (pipeline stage ``sample_pairs``) writes ``OUTPUT/samples.jsonl`` with rows
``{prompt, completions: [...], ended: [...], <the prompt row's other fields>}``.
``alignkit label`` (stage ``label``) scores every completion with reward sources and writes preference
pairs ``{prompt, chosen, rejected, score_chosen, score_rejected}`` to ``OUTPUT/prefs.jsonl``: by default
the best versus the worst completion of each prompt, the on-policy recipe of Xiong et al. 2024
("Iterative Preference Learning from Human Feedback") and of the best-of-n pairs in the controlled
sentiment task of Rafailov et al. 2023 (DPO, section 6.1), where a programmatic "gold" scorer labels
pairs sampled from the model itself. Ties carry no preference and are dropped (and counted).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Literal, Union

import torch
from pydantic import Field, field_validator

from alignkit.config import DataConfig, Section, as_config
from alignkit.data import prepare
from alignkit.data.load import DataError
from alignkit.models.loading import best_device, load_causal_lm, load_tokenizer
from alignkit.rewards import RewardSpec, build_reward
from alignkit.rollout.generate import GenerationConfig, generate
from alignkit.rollout.job import NSamplesJob
from alignkit.rollout.sampling import pick_best_worst
from alignkit.train.logging import phase


class SamplePairsConfig(NSamplesJob):
    """Sample n responses per prompt from a model (the raw material for labelled pairs)."""

    command: Literal["sample-pairs"] = "sample-pairs"
    output: str = "runs/samples"
    """Directory for samples.jsonl and summary.json."""
    data: DataConfig = DataConfig()
    """Prompt rows ({prompt, ...} or {messages}); the other fields are copied to the output rows."""
    n: int = Field(2, ge=2)
    """Responses per prompt."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=64, temperature=1.0)
    """Sampling settings (a temperature near 1 gives the spread that labelling needs)."""
    seed: int = 0
    """Sampling seed."""


class LabelConfig(Section):
    """Score sampled responses with reward sources and turn them into preference pairs."""

    command: Literal["label"] = "label"
    output: str = "runs/labels"
    """Directory for prefs.jsonl and summary.json."""
    samples: str
    """samples.jsonl written by sample-pairs (rows {prompt, completions: [...]}) or its directory."""
    rewards: List[RewardSpec] = Field(min_length=1)
    """Reward sources that judge the responses (CLI: --reward KIND:ARG@W, repeatable), summed with weights;
    e.g. python:alignkit.rewards.sentiment:vader_compound or model:runs/rm/model."""
    pairs: Literal["best_worst", "all"] = "best_worst"
    """best_worst: one pair per prompt, the highest- against the lowest-scored response; all: every pair
    of responses with different scores."""
    min_margin: float = Field(0.0, ge=0)
    """Keep a pair only when score(chosen) - score(rejected) exceeds this (ties are always dropped)."""

    @field_validator("rewards", mode="before")
    @classmethod
    def _specs(cls, v: Any) -> List[RewardSpec]:
        return RewardSpec.coerce_list(v)


def sample_pairs(config: Union[SamplePairsConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Sample ``n`` responses for every prompt of ``data.path``; the Python twin of ``alignkit sample-pairs``."""
    cfg = as_config(SamplePairsConfig, config, overrides)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train
    model = load_causal_lm(cfg.model, trainable=False).to(best_device()).eval()
    torch.manual_seed(cfg.seed)
    with phase(f"sampling {len(items) * cfg.n} answers", label="sample_pairs"):
        ro = generate(model, tok, [it["prompt_ids"] for it in items], cfg.generation, n=cfg.n, compute_logprobs=False)
    rows = []
    for i, it in enumerate(items):
        idx = [j for j, p in enumerate(ro.prompt_index) if p == i]
        rows.append({**it["fields"], "prompt": it["prompt"], "completions": [ro.texts[j] for j in idx],
                     "ended": [bool(ro.ended[j]) for j in idx]})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"command": cfg.command, "prompts": len(rows), "samples": len(ro),
               "length_mean": float(ro.response_lengths.mean()), "eos_rate": float(ro.ended.float().mean()),
               "samples_path": str(out / "samples.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def make_pairs(scores: List[float], mode: str = "best_worst", min_margin: float = 0.0) -> List[tuple]:
    """Index pairs (chosen, rejected) from one prompt's scores; ties and gaps <= min_margin are dropped.

    best_worst on [0.2, 0.9, -0.1] -> [(1, 2)] (the one best-versus-worst rule,
    :func:`alignkit.rollout.sampling.pick_best_worst`); all -> [(1, 0), (0, 2), (1, 2)] (in the order of
    ``combinations``, the better response first).
    """
    if mode == "best_worst":
        pair = pick_best_worst(scores, min_margin).pair
        return [pair] if pair else []
    else:
        cand = [(i, j) if scores[i] >= scores[j] else (j, i) for i, j in combinations(range(len(scores)), 2)]
    return [(c, r) for c, r in cand if scores[c] - scores[r] > min_margin]


def label(config: Union[LabelConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Score and pair the samples; the Python twin of ``alignkit label``."""
    cfg = as_config(LabelConfig, config, overrides)
    src = Path(cfg.samples)
    if src.is_dir():
        src = src / "samples.jsonl"
    if not src.is_file():
        raise DataError(f"label: {src} not found (run sample-pairs first)")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get("completions"), list) or "prompt" not in r]
    if bad:
        raise DataError(f"label: {src} lines {bad[:5]} lack prompt/completions (expected sample-pairs output)")
    reward = build_reward(cfg.rewards)
    prompts, texts, fields, owner = [], [], [], []
    for i, r in enumerate(rows):
        extra = {k: v for k, v in r.items() if k not in ("prompt", "completions", "ended")}
        for t in r["completions"]:
            prompts.append(r["prompt"])
            texts.append(t)
            fields.append(extra)
            owner.append(i)
    scores = reward(prompts, texts, fields)
    per_row: Dict[int, List[float]] = {}
    for i, s in zip(owner, scores):
        per_row.setdefault(i, []).append(s)
    out_rows, dropped = [], 0
    for i, r in enumerate(rows):
        sc = per_row.get(i, [])
        pairs = make_pairs(sc, cfg.pairs, cfg.min_margin) if len(sc) >= 2 else []
        if not pairs:
            dropped += 1
        extra = {k: v for k, v in r.items() if k not in ("prompt", "completions", "ended")}
        for c, j in pairs:
            out_rows.append({**extra, "prompt": r["prompt"], "chosen": r["completions"][c],
                             "rejected": r["completions"][j], "score_chosen": sc[c], "score_rejected": sc[j]})
    if not out_rows:
        raise DataError(f"label: no pairs from {src}: every prompt's responses scored the same "
                        f"(within min_margin={cfg.min_margin}); sample more responses or at a higher temperature")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    gaps = [r["score_chosen"] - r["score_rejected"] for r in out_rows]
    summary = {"command": cfg.command, "prompts": len(rows), "pairs": len(out_rows), "prompts_without_pair": dropped,
               "score_mean": sum(scores) / len(scores),
               "chosen_mean": sum(r["score_chosen"] for r in out_rows) / len(out_rows),
               "rejected_mean": sum(r["score_rejected"] for r in out_rows) / len(out_rows),
               "gap_mean": sum(gaps) / len(gaps), "prefs_path": str(out / "prefs.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"label: {len(out_rows)} pairs from {len(rows)} prompts ({dropped} without a pair: tied scores); "
          f"mean score {summary['score_mean']:.3f}, chosen {summary['chosen_mean']:.3f}, "
          f"rejected {summary['rejected_mean']:.3f}")
    return summary
