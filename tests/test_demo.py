"""`alignkit demo`: the bundled pipeline end to end on a tiny model, then `report`, `compare` and the
reward-model evaluation on what it produced."""

import json
import re

import pytest
from click.testing import CliRunner

from alignkit.cli import build_cli
from tests.gold_toy import SPEC

STAGES = ["pairs", "labels", "rm_pairs", "rm", "dpo", "ppo", "eval_base", "eval_dpo", "eval_ppo", "compare"]


def run(args):
    res = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def demo_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    # tiny random models babble random characters (VADER scores them all 0: every pair ties), so the
    # test swaps in a continuous toy gold reward
    res = run(["demo", "--quick", "--model", str(tiny_model), "--output", str(out), f"vars.gold={SPEC}"])
    return out, res.output


def test_demo_runs_every_stage_and_reports(demo_dir):
    out, output = demo_dir
    events = [json.loads(x) for x in (out / "pipeline.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["action"]) for e in events] == [(s, "ran") for s in STAGES]
    for s in STAGES:
        assert (out / s / "DONE").exists(), s
    for s in ("rm", "dpo", "ppo", "eval_base", "eval_dpo", "eval_ppo"):
        assert (out / s / "report.html").is_file(), s
    pairs = [json.loads(x) for x in (out / "labels" / "prefs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and all(p["score_chosen"] > p["score_rejected"] for p in pairs)  # one per prompt
    res = {s: json.loads((out / s / "eval.json").read_text()) for s in ("eval_base", "eval_dpo", "eval_ppo")}
    assert res["eval_base"]["metrics"]["kl/ref"] == 0.0 and res["eval_base"]["reference_is_policy"]
    for s in ("eval_dpo", "eval_ppo"):
        m = res[s]["metrics"]
        assert m["num_prompts"] == 4 and m["num_samples"] == 8
        # the reference's samples are the base evaluation's, reused rather than generated again
        assert m["reference/rewards/gold"] == pytest.approx(res["eval_base"]["metrics"]["rewards/gold"])
        assert res[s]["reference_samples"].endswith("eval_base/samples.jsonl")
        assert {"rewards/proxy", "rewards/gold", "win_rate/gold", "kl/ref", "diversity/distinct_2"} <= set(m)
    # PPO logged the gold reward live next to the proxy (the over-optimization check reads both)
    ppo = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/gold" in r for r in ppo) and any("kl/ref" in r for r in ppo)
    html = (out / "compare" / "compare.html").read_text()
    assert 'data-metric="frontier"' in html and "base model (eval)" in html and "PPO (eval)" in html
    assert "Final numbers" in html
    assert "gold" in output and "compare.html" in output


def test_second_demo_run_skips_every_stage(demo_dir, tiny_model):
    out, _ = demo_dir
    before = (out / "eval_ppo" / "eval.json").stat().st_mtime_ns
    run(["demo", "--quick", "--model", str(tiny_model), "--output", str(out), f"vars.gold={SPEC}"])
    events = [json.loads(x) for x in (out / "pipeline.jsonl").read_text().splitlines()]
    assert [e["action"] for e in events[len(STAGES):]] == ["skipped"] * len(STAGES)
    assert (out / "eval_ppo" / "eval.json").stat().st_mtime_ns == before


def test_report_regenerates_plots_and_samples(demo_dir, tmp_path):
    out, _ = demo_dir
    run_dir = out / "dpo"
    (run_dir / "report.html").unlink()
    res = run(["report", str(run_dir)])
    html = (run_dir / "report.html").read_text()
    assert str(run_dir / "report.html") in res.output
    metrics = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               for k, v in json.loads(line).items() if k not in ("step",) and isinstance(v, (int, float))}
    plots = re.findall(r'<figure data-metric="([^"]+)" data-keys="([^"]*)"><svg', html)
    drawn = [k for name, keys in plots if not name.startswith("reward_vs_kl") for k in keys.split()]
    single = re.findall(r'<tr data-metric="([^"]+)">', html)
    assert {"train/loss", "rewards/margin", "logps/chosen", "eval/accuracy"} <= set(drawn)
    assert ("rewards/accuracy", "rewards/accuracy eval/accuracy") in plots  # held-out over train
    assert sorted(drawn + single) == sorted(metrics)  # every logged metric once: a plot or a number
    assert "<h2>Samples</h2>" in html and "<th>before</th><th>after</th>" in html
    # --output writes elsewhere
    run(["report", str(run_dir), "--output", str(tmp_path / "r.html")])
    assert (tmp_path / "r.html").read_text().count("<svg") == html.count("<svg")


def test_compare_two_runs(demo_dir, tmp_path):
    out, _ = demo_dir
    target = tmp_path / "c.html"
    run(["compare", str(out / "dpo"), str(out / "ppo"), "--output", str(target)])
    html = target.read_text()
    assert "dpo (dpo)" in html and "ppo (ppo)" in html
    shared = set(re.findall(r'<figure data-metric="([^"]+)"><svg', html))
    assert "train/loss" in shared and "train/grad_norm" in shared
    assert "Final numbers" in html and "<th>steps</th>" in html


def test_reward_model_eval_cli_on_the_demo_rm(demo_dir, tmp_path):
    out, _ = demo_dir
    res = run(["eval", "--reward-model", str(out / "rm" / "model"), "--data", str(out / "labels" / "prefs.jsonl"),
               "--output", str(tmp_path / "rmeval")])
    assert "rm/ece" in res.output and "calibration" in res.output
    doc = json.loads((tmp_path / "rmeval" / "eval.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "rmeval" / "samples.jsonl").read_text().splitlines()]
    acc = sum(1.0 if r["score_chosen"] > r["score_rejected"] else 0.5 if r["score_chosen"] == r["score_rejected"]
              else 0.0 for r in rows) / len(rows)
    assert doc["metrics"]["rm/accuracy"] == pytest.approx(acc) and doc["metrics"]["rm/num_pairs"] == 8
    assert sum(b["count"] for b in doc["calibration"]) == 16  # every pair counted both ways


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("ALIGNKIT_FULL_DEMO"),
                    reason="the full demo on the embedded model takes ~8 min on 2 cores: ALIGNKIT_FULL_DEMO=1")
def test_full_demo_aligned_models_beat_the_base(tmp_path):
    """The README's main job as the issue states it: on held-out prompts both aligned models score
    higher on the gold reward than the starting model, and neither drifts beyond the KL budget."""
    pytest.importorskip("vaderSentiment")
    from alignkit.demo import demo

    res = demo(output=str(tmp_path / "demo"))["results"]
    base = res["base"]["rewards/gold"]
    for label in ("DPO", "PPO"):
        assert res[label]["rewards/gold"] > base + 0.05, (label, res[label]["rewards/gold"], base)
        assert res[label]["win_rate/gold"] > 0.5
        assert 0.0 < res[label]["kl/ref"] < 10.0
