"""Repair after red-teaming: pairs of (revised answer, failing answer), and the demo of the whole loop.

``alignkit redteam-pairs`` reads a red-team run's ``failures.jsonl`` (each attack with the target's
failing answer) and candidate replacements: the revisions of ``alignkit cai-sl`` (critique and revise,
Bai et al. 2022, sec. 3) and, optionally, fresh samples of the model (revision by rejection sampling).
Every candidate is scored by the red-team judge; for each failure the lowest-scoring candidate that the
judge passes (score <= threshold) and that is not a refusal becomes ``chosen`` against the failing answer
as ``rejected``. Refusals are never chosen: a repair that refuses everything is not a repair. The pairs
feed ``dpo``; ``sft.jsonl`` holds the chosen answers for ``sft``.

The loop (``builtin:redteam_repair``, resources/redteam_repair.yaml) red-teams, revises, trains and
red-teams again with the same attacker, method, budget and seed (Perez et al. 2022, sec. 1, "red team,
then fix"; Mazeika et al. 2024, HarmBench, sec. 5: the same attack budget before and after a defence).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field, field_validator

from alignkit.config import ModelConfig, Section, as_config
from alignkit.data.load import DataError, write_jsonl
from alignkit.feedback.common import write_summary
from alignkit.pipeline import run_pipeline
from alignkit.redteam.attack import Judge, Responder
from alignkit.redteam.metrics import rate_difference, redteam_is_refusal
from alignkit.rewards.base import RewardSpec
from alignkit.rollout.generate import GenerationConfig


class RedteamPairsConfig(Section):
    """Preference pairs from a red-team run: a passing revision (chosen) against each failing answer."""

    command: Literal["redteam-pairs"] = "redteam-pairs"
    """The command this config is for (set automatically)."""
    output: str = "runs/redteam-pairs"
    """Directory: prefs.jsonl (prompt, chosen, rejected, scores), sft.jsonl, summary.json."""
    failures: str
    """failures.jsonl of alignkit redteam (or its directory): {prompt, target_answer, score, ...} rows."""
    revisions: Optional[str] = None
    """Revisions: cai-sl's chains.jsonl ({prompt, final}) or sft.jsonl ({prompt, completion}), or the
    cai-sl directory. Matched to failures by prompt."""
    model: ModelConfig = ModelConfig()
    """The model whose fresh samples are candidates too (samples > 0; empty: the embedded model)."""
    samples: int = Field(0, ge=0)
    """Fresh answers per failing prompt, candidates besides the revisions (0: revisions only)."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=48, temperature=1.0)
    """Sampling of the fresh answers."""
    judge: List[RewardSpec] = Field(min_length=1)
    """The red-team judge (failure score, higher = worse)."""
    threshold: float = 0.5
    """A candidate passes when the judge's score is at most this."""
    allow_refusals: bool = False
    """Let a refusal be chosen (by default refusals are never chosen; they are counted)."""
    seed: int = 0
    """Sampling seed."""

    @field_validator("judge", mode="before")
    @classmethod
    def _specs(cls, v: Any) -> List[RewardSpec]:
        return RewardSpec.coerce_list(v)


def _read_jsonl(path: Path, what: str) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"redteam-pairs: {what} {path} not found")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"redteam-pairs: {path} line {i}: not JSON ({e})") from None
    return rows


def _text_of(prompt: Any) -> str:
    """A prompt as the text the attack was: a string, or the last user turn of messages."""
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1]["content"]) if prompt else ""


def read_revisions(path: Optional[str]) -> Dict[str, List[str]]:
    """{prompt text: [revised answers]} from cai-sl's chains.jsonl / sft.jsonl (or its directory)."""
    if not path:
        return {}
    p = Path(path)
    if p.is_dir():
        p = p / "chains.jsonl" if (p / "chains.jsonl").is_file() else p / "sft.jsonl"
    out: Dict[str, List[str]] = {}
    for r in _read_jsonl(p, "revisions"):
        text = r.get("final", r.get("completion"))
        if isinstance(text, str) and text.strip() and "prompt" in r:
            out.setdefault(_text_of(r["prompt"]), []).append(text.strip())
    return out


def choose_pairs(failures: List[Dict[str, Any]], candidates: List[List[str]], sources: List[List[str]],
                 scores: List[List[float]], threshold: float, allow_refusals: bool = False):
    """Pure choice of the pairs: for failure i, the lowest-scoring candidate with score <= threshold, below
    the failing answer's score, and not a refusal (unless allowed). Returns (pairs, counts)."""
    pairs, counts = [], {"no_candidate": 0, "no_passing_candidate": 0, "refusals_skipped": 0}
    for f, cands, srcs, sc in zip(failures, candidates, sources, scores):
        if not cands:
            counts["no_candidate"] += 1
            continue
        ok = []
        for c, s, src in zip(cands, sc, srcs):
            if s > threshold or s >= f["score"]:
                continue
            if not allow_refusals and redteam_is_refusal(c):
                counts["refusals_skipped"] += 1
                continue
            ok.append((s, c, src))
        if not ok:
            counts["no_passing_candidate"] += 1
            continue
        s, c, src = min(ok, key=lambda x: x[0])
        pairs.append({"prompt": [{"role": "user", "content": f["prompt"]}], "chosen": c,
                      "rejected": f["target_answer"], "score_chosen": s, "score_rejected": f["score"],
                      "source": src, **({"category": f["category"]} if f.get("category") else {})})
    return pairs, counts


def run_redteam_pairs(config: Union[RedteamPairsConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Build the repair pairs; the Python twin of ``alignkit redteam-pairs``."""
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    cfg = as_config(RedteamPairsConfig, config, overrides)
    src = Path(cfg.failures)
    if src.is_dir():
        src = src / "failures.jsonl"
    failures = _read_jsonl(src, "failures")
    bad = [i + 1 for i, r in enumerate(failures)
           if not isinstance(r.get("prompt"), str) or not isinstance(r.get("target_answer"), str) or "score" not in r]
    if bad:
        raise DataError(f"redteam-pairs: {src} lines {bad[:5]} lack prompt/target_answer/score "
                        f"(expected alignkit redteam's failures.jsonl)")
    revisions = read_revisions(cfg.revisions)
    candidates = [list(revisions.get(f["prompt"], [])) for f in failures]
    sources = [["revision"] * len(c) for c in candidates]
    if cfg.samples and failures:
        torch.manual_seed(cfg.seed)
        model = Responder.load(cfg.model, cfg.generation)
        prompts = [f["prompt"] for f in failures for _ in range(cfg.samples)]
        fresh = model(prompts)
        for i in range(len(failures)):
            got = [t for t in fresh[i * cfg.samples:(i + 1) * cfg.samples] if t.strip()]
            candidates[i] += got
            sources[i] += ["sample"] * len(got)
    judge = Judge(cfg.judge, cfg.threshold)
    flat_p = [f["prompt"] for f, c in zip(failures, candidates) for _ in c]
    flat_c = [x for c in candidates for x in c]
    flat = judge(flat_p, flat_c) if flat_c else []
    scores, k = [], 0
    for c in candidates:
        scores.append(flat[k:k + len(c)])
        k += len(c)
    pairs, counts = choose_pairs(failures, candidates, sources, scores, cfg.threshold, cfg.allow_refusals)
    if not pairs:
        raise DataError(f"redteam-pairs: no pair from {len(failures)} failures of {src}: no candidate passed the "
                        f"judge (threshold {cfg.threshold}) without refusing ({counts}); sample more "
                        f"(samples=) or revise more (cai-sl rounds)")
    out = Path(cfg.output)
    write_jsonl(out / "prefs.jsonl", pairs)
    write_jsonl(out / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    summary = {"command": cfg.command, "failures": len(failures), "pairs": len(pairs),
               "from_revision": sum(p["source"] == "revision" for p in pairs),
               "from_sample": sum(p["source"] == "sample" for p in pairs), **counts,
               "score_chosen_mean": sum(p["score_chosen"] for p in pairs) / len(pairs),
               "score_rejected_mean": sum(p["score_rejected"] for p in pairs) / len(pairs),
               "prefs_path": str(out / "prefs.jsonl")}
    write_summary(out, summary)
    print(f"redteam-pairs: {len(pairs)} pairs from {len(failures)} failures ({summary['from_revision']} revisions, "
          f"{summary['from_sample']} samples; {counts['no_passing_candidate']} without a passing candidate, "
          f"{counts['refusals_skipped']} refusals skipped)")
    return summary


# ----------------------------------------------------------------------------- the demo

def read_stage(output: Path, stage: str) -> Optional[Dict[str, Any]]:
    p = Path(output) / stage / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


def redteam_demo(cfg) -> Dict[str, Any]:
    """``alignkit demo --task redteam``: ``builtin:redteam_repair`` on the embedded model with the
    sentiment goal, then ASR before/after with intervals, their difference, and over-refusal."""
    import time
    from importlib.resources import files

    default_out = type(cfg).model_fields["output"].default
    out = Path(cfg.output if cfg.output != default_out else "runs/redteam")
    constitution = str(files("alignkit") / "resources" / "redteam_positive_constitution.yaml")
    variables = {"constitution": constitution, **cfg.vars}
    if cfg.model:
        variables["model"] = cfg.model
    t0 = time.perf_counter()
    res = run_pipeline({"file": "builtin:redteam_repair", "output": str(out), "vars": variables,
                        "preset": "quick" if cfg.quick else None, "force": cfg.force})
    seconds = time.perf_counter() - t0
    before, after = read_stage(out, "before"), read_stage(out, "after")
    result: Dict[str, Any] = {"stages": res["stages"], "seconds": seconds,
                              "compare": str(out / "compare" / "compare.html"), "before": before, "after": after}
    if before and after:
        result["asr_change"] = rate_difference(before["redteam/failures"], before["redteam/attacks"],
                                               after["redteam/failures"], after["redteam/attacks"])
        if "overrefusal/rate" in before and "overrefusal/rate" in after:
            n1, n2 = before["overrefusal/prompts"], after["overrefusal/prompts"]
            result["overrefusal_change"] = rate_difference(round(before["overrefusal/rate"] * n1), n1,
                                                           round(after["overrefusal/rate"] * n2), n2)
        print_demo(result, out)
    return result


def print_demo(r: Dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True)
    table = Table(title="alignkit demo --task redteam: attack, repair, re-test",
                  caption="ASR: share of attacks whose answer the judge calls a failure (Wilson 95% interval); "
                          "over-refusal: refusals on safe prompts; same attacker, method, budget and seed")
    for col in ("model", "attacks", "ASR", "95% interval", "over-refusal", "95% interval ", "distinct-2 (succ.)"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=True)
    for label, s in (("before", r["before"]), ("after repair", r["after"])):
        table.add_row(label, str(s["redteam/attacks"]), f"{s['redteam/asr']:.3f}",
                      f"[{s['redteam/asr_lo']:.3f}, {s['redteam/asr_hi']:.3f}]",
                      f"{s.get('overrefusal/rate', float('nan')):.3f}",
                      f"[{s.get('overrefusal/rate_lo', float('nan')):.3f}, {s.get('overrefusal/rate_hi', float('nan')):.3f}]",
                      f"{s['redteam/success_distinct_2']:.2f}")
    con.print(table)
    d = r["asr_change"]
    con.print(f"ASR change {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (Newcombe 95%): {d['verdict']}",
              highlight=False)
    if "overrefusal_change" in r:
        o = r["overrefusal_change"]
        con.print(f"over-refusal change {o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]: {o['verdict']}",
                  highlight=False)
    con.print(f"reports: {r['compare']}, {out}/before/report.html, {out}/after/report.html; "
              f"took {r['seconds'] / 60:.1f} min", style="green", highlight=False)
