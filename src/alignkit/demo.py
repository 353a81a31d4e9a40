"""``alignkit demo``: the classical pipeline end to end on the embedded model, in minutes on a CPU.

It runs the bundled pipeline ``resources/demo_pipeline.yaml`` (see that file and docs/pipeline.md):
sample reply pairs from the starting model, label them with a programmatic gold reward (positive
sentiment by VADER, as in the controlled sentiment task of Rafailov et al. 2023), train a reward model,
run DPO on the pairs and PPO against the reward model, evaluate every model on held-out prompts and
write the reports. Then it prints gold reward, proxy reward and KL before and after, and where the
reports are. Being a pipeline, an interrupted demo continues where it stopped when run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Union

from alignkit.config import Section, as_config
from alignkit.eval.stats import Interval, mean_interval, paired_comparison

EVALS = (("eval_base", "base"), ("eval_dpo", "DPO"), ("eval_ppo", "PPO"))


class DemoConfig(Section):
    """Run the bundled demo pipeline and print the before/after numbers."""

    command: str = "demo"
    """The command this config is for (set automatically)."""
    output: str = "runs/demo"
    """Directory of the demo: one subdirectory per stage, compare/compare.html."""
    model: Optional[str] = None
    """Starting model (empty: the embedded SmolLM2-135M-Instruct). It must have a chat template."""
    task: Literal["classic", "reasoning", "redteam"] = "classic"
    """classic: SFT-free RLHF on a sentiment task (reward model, DPO, PPO); reasoning: GRPO with the DAPO
    preset on rule-checked arithmetic answers (R1-Zero in miniature, docs/reasoning-demo.md); redteam:
    attack, repair and re-test (builtin:redteam_repair, docs/red-teaming.md)."""
    seed: Optional[int] = None
    """Seed of every stage (sampling of the pairs, LoRA init and data order of rm, dpo and ppo, the
    evaluations' sampling); empty: the pipeline's vars.seed (0). The demo's claims are checked on seeds
    0, 1 and 2 (docs/pipeline.md)."""
    precision: Literal["auto", "fp32"] = "auto"
    """auto: bf16 where it is native (autocast for training, bf16 weights for sampling and scoring),
    fp32 elsewhere; fp32: fp32 everywhere, whatever the machine (the path of a CPU without native bf16)."""
    quick: bool = False
    """A smoke run in seconds (few prompts, steps and tokens): checks the wiring, proves nothing."""
    force: bool = False
    """Run every stage again instead of skipping the finished ones."""
    vars: Dict[str, Any] = {}
    """Override pipeline variables (e.g. vars.ppo_steps=20, vars.gold=python:my.module:fn)."""


PRECISION_VARS = {"auto": {}, "fp32": {"precision": "fp32", "dtype": "float32"}}
"""Pipeline variables of each ``--precision``: ``precision`` is train.precision of the training
stages, ``dtype`` the weights that sample and score (model.dtype, generation.dtype, reward models)."""


def stage_vars(cfg: DemoConfig) -> Dict[str, Any]:
    """The pipeline variables that the demo's own options set (``vars.KEY=`` given explicitly wins)."""
    out: Dict[str, Any] = dict(PRECISION_VARS[cfg.precision])
    if cfg.seed is not None:
        out["seed"] = cfg.seed
    if cfg.model:
        out["model"] = cfg.model
    return out


def read_results(output: Path) -> Dict[str, Dict[str, float]]:
    """{stage label: eval metrics} of the demo's evaluation stages that have an eval.json."""
    out = {}
    for stage, label in EVALS:
        path = Path(output) / stage / "eval.json"
        if path.is_file():
            out[label] = json.loads(path.read_text())["metrics"]
    return out


def read_gold(path: Path) -> Optional[tuple]:
    """(gold values, prompts) of the policy's samples in an evaluation's samples.jsonl, or None."""
    if not path.is_file():
        return None
    values, prompts = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("tag", "policy") == "policy" and "gold" in row.get("rewards", {}):
            values.append(float(row["rewards"]["gold"]))
            prompts.append(row["prompt"])
    return (values, prompts) if values else None


def gold_gains(output: Path, evals=EVALS) -> Dict[str, Dict[str, Any]]:
    """Held-out gold of every evaluated model with its 95% interval over prompts, and each trained
    model's gain over the first (the base), paired by prompt (:func:`alignkit.eval.stats.paired_comparison`:
    the per-prompt mean difference, its t interval and verdict). ``{label: {"gold": Interval dict,
    "gain": PairedComparison dict (not for the base)}}``."""
    golds = {label: read_gold(Path(output) / stage / "samples.jsonl") for stage, label in evals}
    base_label = evals[0][1]
    out: Dict[str, Dict[str, Any]] = {}
    for label, g in golds.items():
        if g is None:
            continue
        out[label] = {"gold": mean_interval(g[0], g[1]).to_dict()}
        if label != base_label and golds.get(base_label) is not None:
            base = golds[base_label]
            out[label]["gain"] = paired_comparison(base[0], g[0], base[1], g[1]).to_dict()
    return out


def rm_heldout_accuracy(samples: Path, margin: float = 0.3) -> Optional[Dict[str, Any]]:
    """The reward model (proxy) judged on prompts it never saw: in an evaluation's ``samples.jsonl``
    (the base model's answers to the held-out prompts, each scored by proxy and gold), every pair of
    answers to one prompt whose gold scores differ by more than ``margin`` counts as correct when the
    proxy orders it as gold does (a proxy tie counts one half). The accuracy is the mean over prompts
    of each prompt's share (pairs of one prompt are not independent), with a t interval over prompts
    (:func:`alignkit.eval.stats.mean_interval`). None when no pair qualifies."""

    if not samples.is_file():
        return None
    by_prompt: Dict[str, list] = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        r = row.get("rewards", {})
        if row.get("tag", "policy") == "policy" and "gold" in r and "proxy" in r:
            by_prompt.setdefault(row["prompt"], []).append((float(r["proxy"]), float(r["gold"])))
    values, groups = [], []
    for prompt, scored in by_prompt.items():
        for i in range(len(scored)):
            for j in range(i + 1, len(scored)):
                (pi, gi), (pj, gj) = scored[i], scored[j]
                if abs(gi - gj) <= margin:
                    continue
                agree = (pi - pj) * (gi - gj)
                values.append(1.0 if agree > 0 else 0.5 if pi == pj else 0.0)
                groups.append(prompt)
    if not values:
        return None
    iv = mean_interval(values, groups)
    return {"accuracy": iv.to_dict(), "pairs": len(values), "prompts": iv.n, "margin": margin}


def rm_stage_accuracy(output: Path) -> Optional[Dict[str, Any]]:
    """The rm stage's own held-out accuracy: its last ``eval/accuracy`` (pairs of held-out prompts:
    ``data.eval_fraction`` holds out whole prompts, docs/data.md) and the number of eval pairs."""
    metrics, report = output / "rm" / "metrics.jsonl", output / "rm" / "data_report.json"
    if not metrics.is_file():
        return None
    acc = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "eval/accuracy" in row:
            acc = float(row["eval/accuracy"])
    if acc is None:
        return None
    n = None
    if report.is_file():
        n = next((r.get("examples") for r in json.loads(report.read_text()) if r.get("role") == "eval"), None)
    return {"accuracy": acc, "pairs": n}


def demo(config: Union[DemoConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run the demo; returns ``{"results": {label: metrics}, "stages", "compare", "seconds"}``."""
    # deferred: CLI start-up: `alignkit demo --help` needs no pipeline, rewards or feedback modules (~0.1 s)
    from alignkit.pipeline import PipelineConfig, load_spec, run_pipeline

    cfg = as_config(DemoConfig, config, overrides)
    if cfg.task == "reasoning":
        return reasoning_demo(cfg)
    if cfg.task == "redteam":
        # deferred: torch stays out of this module's import
        from alignkit.redteam.repair import redteam_demo

        return redteam_demo(cfg)
    variables = {**stage_vars(cfg), **cfg.vars}
    t0 = time.perf_counter()
    pipeline = PipelineConfig(file="builtin:demo_pipeline", output=cfg.output, vars=variables,
                              preset="quick" if cfg.quick else None, force=cfg.force)
    res = run_pipeline(pipeline)
    seconds = time.perf_counter() - t0
    results = read_results(Path(cfg.output))
    gains = gold_gains(Path(cfg.output))
    compare = Path(cfg.output) / "compare" / "compare.html"
    margin = float(load_spec(pipeline).vars["pair_margin"])  # the pairs the reward model was trained on
    reward_model = {"eval_split": rm_stage_accuracy(Path(cfg.output)),
                    "heldout_prompts": rm_heldout_accuracy(Path(cfg.output) / "eval_base" / "samples.jsonl", margin)}
    (Path(cfg.output) / "demo_summary.json").write_text(json.dumps(
        {"seed": variables.get("seed", 0), "precision": cfg.precision, "seconds": seconds, "gold": gains,
         "reward_model": reward_model, "results": results}, indent=2, default=float))
    print_results(results, seconds, Path(cfg.output), compare, gains, reward_model)
    return {"results": results, "gains": gains, "reward_model": reward_model, "stages": res["stages"],
            "compare": str(compare), "seconds": seconds}


def print_results(results: Dict[str, Dict[str, float]], seconds: float, output: Path, compare: Path,
                  gains: Optional[Dict[str, Dict[str, Any]]] = None,
                  reward_model: Optional[Dict[str, Any]] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True)
    table = Table(title="alignkit demo, held-out prompts", caption="base: the starting model; gold: VADER sentiment in "
                  "[-1, 1]; proxy: the reward model; KL to the base in nats; win: rate against the base's replies; "
                  "len: reply tokens; r(p,g): correlation of proxy and gold over the samples")
    cols = [("gold", "rewards/gold"), ("proxy", "rewards/proxy"), ("KL/seq", "kl/ref"),
            ("KL/tok", "kl/ref_token"), ("win", "win_rate/gold"), ("len", "length/mean"),
            ("dist-2", "diversity/distinct_2"), ("r(p,g)", "rewards/proxy_gold_corr")]
    table.add_column("model", no_wrap=True)
    for name, _ in cols:
        table.add_column(name, justify="right", no_wrap=True)
    for label, m in results.items():
        table.add_row(label, *[f"{m.get(k, float('nan')):.2f}" for _, k in cols])
    con.print(table)
    for line in gain_lines(results, gains or {}):
        con.print(line, highlight=False)
    for line in reward_model_lines(reward_model or {}):
        con.print(line, highlight=False)
    con.print(f"reports: {compare} (side by side) and {output}/<stage>/report.html; took {seconds / 60:.1f} min",
              style="green", highlight=False)


def gain_lines(results: Dict[str, Dict[str, float]], gains: Dict[str, Dict[str, Any]]) -> list:
    """One line per trained model: held-out gold before -> after with 95% intervals over prompts, and
    the gain paired by prompt with its interval and verdict (better / worse / not distinguishable)."""
    def iv(d: Dict[str, Any]) -> Interval:
        return Interval(**d)

    lines = []
    base = gains.get("base")
    for label in ("DPO", "PPO"):
        g = gains.get(label)
        if base is None or g is None or "gain" not in g:
            continue
        d = g["gain"]
        lo, hi, n = d["diff_lo"], d["diff_hi"], d["diff_n"]
        verdict = {"better": "better than", "worse": "WORSE than"}.get(d["verdict"], "NOT DISTINGUISHABLE from")
        kl = results.get(label, {}).get("kl/ref", float("nan"))
        lines.append(f"{label}: held-out gold {iv(base['gold']).format()} -> {iv(g['gold']).format()}; gain "
                     f"{d['diff_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] (95%, paired over {n} prompts, "
                     f"p={d['p_value']:.2g}): {verdict} the starting model; KL {kl:.2f} nats/sequence")
    return lines


def reward_model_lines(rm: Dict[str, Any]) -> list:
    """How well the reward model orders replies to prompts it never saw (see :func:`rm_heldout_accuracy`)."""

    lines = []
    split, held = rm.get("eval_split"), rm.get("heldout_prompts")
    if split:
        lines.append(f"reward model: accuracy {split['accuracy']:.2f} on its {split['pairs']} eval pairs "
                     "(prompts held out of its training pairs)")
    if held:
        iv = Interval(**held["accuracy"])
        lines.append(f"reward model on the base's answers to the held-out prompts: orders {iv.format()} of "
                     f"{held['pairs']} answer pairs as gold does (gold gap > {held['margin']:g}, "
                     f"{held['prompts']} prompts)")
    return lines


REASONING_EVALS = (("eval_base", "base"), ("eval_after", "GRPO (DAPO)"))


def reasoning_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """``alignkit demo --task reasoning``: write the synthetic train/held-out prompts, run the bundled
    ``resources/reasoning_pipeline.yaml`` and print held-out accuracy and format rate before and after."""
    # deferred: CLI start-up: `alignkit demo --help` needs no pipeline, rewards or feedback modules (~0.1 s)
    from alignkit.pipeline import run_pipeline
    from alignkit.rewards.reasoning import reasoning_rows

    out = Path(cfg.output if cfg.output != DemoConfig.model_fields["output"].default else "runs/reasoning")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = reasoning_rows(256, seed=1)
    held = reasoning_rows(100, seed=2, exclude=[r["question"] for r in train])  # questions never seen in training
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    variables = {"prompts": str(data / "train.jsonl"), "heldout": str(data / "heldout.jsonl"), **stage_vars(cfg),
                 **cfg.vars}
    t0 = time.perf_counter()
    res = run_pipeline({"file": "builtin:reasoning_pipeline", "output": str(out), "vars": variables,
                        "preset": "quick" if cfg.quick else None, "force": cfg.force})
    seconds = time.perf_counter() - t0
    results = {}
    for stage, label in REASONING_EVALS:
        path = out / stage / "eval.json"
        if path.is_file():
            results[label] = json.loads(path.read_text())["metrics"]
    from rich.console import Console

    con = Console(stderr=True)
    for label, m in results.items():
        m["rewards/accuracy"] = m.get("rewards/gold", float("nan"))  # the eval stages' gold is the accuracy
        m["rewards/format"] = m.get("rewards/proxy", float("nan"))  # and their proxy the format rate
        con.print(f"{label}: held-out accuracy {m['rewards/accuracy']:.3f}, format rate {m['rewards/format']:.3f}, "
                  f"length {m.get('length/mean', float('nan')):.1f} tokens", highlight=False)
    compare = out / "compare" / "compare.html"
    con.print(f"reports: {compare}, {out}/grpo/report.html (reward curves); took {seconds / 60:.1f} min",
              style="green", highlight=False)
    return {"results": results, "stages": res["stages"], "compare": str(compare), "seconds": seconds}


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """The CLI runner (the numbers are printed by :func:`demo`)."""
    res = demo(cfg)
    return {"compare": res["compare"], "minutes": round(res["seconds"] / 60, 2)}
