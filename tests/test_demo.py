"""`alignkit demo`: the bundled pipeline end to end on a tiny model, then `report`, `compare` and the
reward-model evaluation on what it produced."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkit.cli import build_cli
from tests.gold_toy import SPEC
from tests.helpers import chromium_path

STAGES = ["pairs", "labels", "rm", "dpo", "eval_base", "eval_dpo", "ppo", "eval_ppo", "compare"]


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
    # every pair of a prompt's 3 replies whose scores differ (quick preset: pair_margin 0): 1 to 3 per prompt
    per_prompt = Counter(json.dumps(p["prompt"]) for p in pairs)
    assert len(per_prompt) == 8 and all(1 <= n <= 3 for n in per_prompt.values()), per_prompt
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
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
    # the reward model's accuracy: on its eval pairs (held-out prompts) and on the base's held-out answers
    rm = json.loads((out / "demo_summary.json").read_text())["reward_model"]
    assert 0.0 <= rm["eval_split"]["accuracy"] <= 1.0 and rm["eval_split"]["pairs"] >= 1
    assert rm["heldout_prompts"]["prompts"] <= 4 and rm["heldout_prompts"]["pairs"] >= 1
    assert "reward model" in output


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
    single = re.findall(r'<tr data-metric="([^"]+)">', html) \
        + [k for keys in re.findall(r'data-in-summary="([^"]*)"', html) for k in keys.split()]
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
    shared = set(re.findall(r'<figure data-metric="([^"]+)" data-keys="[^"]*"><svg', html))
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
    n_pairs = len(rows)  # the sampled pairs the RM eval kept (how many depends on the draws)
    assert 0 < n_pairs <= len((out / "labels" / "prefs.jsonl").read_text().splitlines())
    assert doc["metrics"]["rm/accuracy"] == pytest.approx(acc) and doc["metrics"]["rm/num_pairs"] == n_pairs > 0
    assert sum(b["count"] for b in doc["calibration"]) == 2 * n_pairs  # every pair counted both ways


# what the page itself reports, evaluated in Chromium after layout (so "has data" means drawn, not just present)
PAGE_CHECK = """() => {
  const figs = [...document.querySelectorAll('figure')].map(f => {
    const drawn = [...f.querySelectorAll('.series, .pt, .bar')].filter(e => {
      const b = e.getBBox(); return b.width > 0 || b.height > 0; });
    const ticks = cls => [...f.querySelectorAll('text.' + cls)].map(t => t.textContent);
    return {metric: f.dataset.metric, drawn: drawn.length, lines: f.querySelectorAll('.series').length,
            dots: f.querySelectorAll('.pt').length, empty: f.textContent.includes('no finite data'),
            x: ticks('xtick'), y: ticks('ytick'), width: f.getBoundingClientRect().width};
  });
  const banner = document.querySelector('#alerts');
  return {figs, banner: banner && {n: Number(banner.dataset.alerts), text: banner.textContent,
                                   bg: getComputedStyle(banner).backgroundColor},
          alerts: [...document.querySelectorAll('div.alert')].map(a => a.dataset.kind),
          alertColor: [...document.querySelectorAll('div.alert b')].map(b => getComputedStyle(b).color),
          singles: document.querySelectorAll('tr[data-metric], [data-in-summary]').length};
}"""
RED = "rgb(201, 42, 42)"


@pytest.mark.slow
def test_demo_reports_in_headless_chromium(demo_dir, tmp_path):
    """Every report of the demo (and the comparison), rendered by Chromium: no console errors, every plot
    draws data, no duplicate tick labels, no lone dot on a step axis, and the alert banner says exactly
    what alerts.jsonl holds (red when it holds anything). Screenshots go to the test's folder, or to
    docs/images/ with ALIGNKIT_UPDATE_SCREENSHOTS=1."""
    from playwright.sync_api import sync_playwright

    from tests.test_report import write_run

    out, _ = demo_dir
    shots = Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOTS") \
        else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    synthetic = write_run(tmp_path / "kl_blowup_run")  # a run with an alert, so the red path is seen too
    run(["report", str(synthetic)])
    pages = {s: out / s / "report.html" for s in ("rm", "dpo", "ppo", "eval_base", "eval_dpo", "eval_ppo")}
    pages["compare"] = out / "compare" / "compare.html"
    pages["synthetic"] = synthetic / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        for name, path in pages.items():
            page.goto(path.as_uri())
            got = page.evaluate(PAGE_CHECK)
            assert not errors, (name, errors)
            assert got["figs"] or got["singles"], name  # an evaluation logs every metric once: numbers
            for f in got["figs"]:
                where = (name, f["metric"])
                assert f["drawn"] > 0 and not f["empty"], where  # every plot has data on screen
                assert f["width"] > 200, where
                assert len(set(f["x"])) == len(f["x"]) and len(set(f["y"])) == len(f["y"]), (where, f)
                if not f["metric"].startswith(("reward_vs_kl", "frontier")):
                    assert not (f["dots"] == 1 and f["lines"] == 0), where  # a single value is a number or bar
            if name == "compare":
                continue
            alerts_file = path.parent / "alerts.jsonl"
            kinds = [json.loads(l)["kind"] for l in alerts_file.read_text().splitlines() if l.strip()] \
                if alerts_file.exists() else None
            if kinds is not None:  # eval directories have none: the report recomputes from the metrics
                assert got["banner"]["n"] == len(kinds) and got["alerts"] == kinds, (name, got["banner"], kinds)
            n = got["banner"]["n"]
            assert len(got["alerts"]) == n
            if n:
                assert got["banner"]["bg"] == RED and set(got["alertColor"]) == {RED}, name
                assert f"{n} alert" in got["banner"]["text"]
            else:
                assert "No alerts" in got["banner"]["text"] and got["banner"]["bg"] != RED
            assert "No failure mode detected" not in got["banner"]["text"]
        assert pages and page.evaluate(PAGE_CHECK)["banner"]["n"] == 1  # the synthetic run's kl_blowup
        # small screenshots: the top of a page, or the part of it a heading starts
        for name, heading in (("dpo", None), ("dpo", "Metrics"), ("ppo", "Reward versus KL"),
                              ("ppo", "Throughput and memory"), ("eval_ppo", None), ("compare", "Shared metrics"),
                              ("synthetic", None)):
            page.set_viewport_size({"width": 1100, "height": 760})
            page.goto(pages[name].as_uri())
            suffix = ""
            if heading:
                page.locator("h2", has_text=heading).first.evaluate("h => h.scrollIntoView()")
                suffix = "_" + heading.split()[0].lower()
            page.screenshot(path=str(shots / f"report_{name}{suffix}.png"))
        browser.close()


FULL_DEMO = os.environ.get("ALIGNKIT_FULL_DEMO", "")
# ALIGNKIT_FULL_DEMO=1: seed 0 on the machine's own path; =all: seeds 0, 1, 2 x (auto, fp32), the README's table
FULL_DEMO_CASES = ([(s, p) for p in ("auto", "fp32") for s in (0, 1, 2)] if FULL_DEMO == "all" else [(0, "auto")])


@pytest.mark.slow
@pytest.mark.skipif(not FULL_DEMO, reason="the full demo on the embedded model takes 4-8 min on 2 cores: "
                    "ALIGNKIT_FULL_DEMO=1 (one run) or =all (3 seeds x 2 precision paths)")
@pytest.mark.parametrize("seed,precision", FULL_DEMO_CASES)
def test_full_demo_aligned_models_beat_the_base(tmp_path, seed, precision):
    """The README's main job as issue 31 states it: on held-out prompts both aligned models beat the
    starting model's gold reward by a margin whose 95% interval (paired by prompt) excludes 0, and
    neither drifts beyond the KL budget."""
    pytest.importorskip("vaderSentiment")
    from alignkit.demo import demo

    out = demo(output=str(tmp_path / "demo"), seed=seed, precision=precision)
    res, gains = out["results"], out["gains"]
    for label in ("DPO", "PPO"):
        gain = gains[label]["gain"]
        assert gain["verdict"] == "better" and gain["diff_lo"] > 0, (label, gain)
        assert res[label]["win_rate/gold"] > 0.5
        assert 0.0 < res[label]["kl/ref"] < 15.0


def test_demo_seed_and_precision_reach_every_stage():
    """--seed N seeds every stage that draws anything; --precision fp32 pins every training stage to
    fp32 and every model that samples or scores to float32 weights (the path of a CPU without bf16)."""
    from alignkit.demo import DemoConfig, stage_vars
    from alignkit.pipeline import PipelineConfig, check_stages, load_spec

    def stages(**kw):
        spec = load_spec(PipelineConfig(file="builtin:demo_pipeline", vars=stage_vars(DemoConfig(**kw))))
        return {name: data for name, _, data in check_stages(spec)}

    fp32 = stages(seed=3, precision="fp32")
    for name in ("pairs", "eval_base", "eval_dpo", "eval_ppo"):
        assert fp32[name]["seed"] == 3 and fp32[name]["model"]["dtype"] == "float32", name
        assert fp32[name]["generation"]["dtype"] == "float32", name
    for name in ("rm", "dpo", "ppo"):
        assert fp32[name]["train"]["seed"] == 3 and fp32[name]["train"]["precision"] == "fp32", name
    assert fp32["ppo"]["generation"]["dtype"] == "float32"
    for name in ("ppo", "eval_base", "eval_dpo", "eval_ppo"):  # the reward model scores in float32 too
        assert fp32[name]["rewards"][0]["options"] == {"dtype": "float32"}, name
    auto = stages()
    assert auto["ppo"]["train"]["precision"] == "auto" and auto["ppo"]["train"]["seed"] == 0
    assert auto["eval_base"]["model"]["dtype"] == "auto" and auto["pairs"]["generation"]["dtype"] == "auto"


def test_demo_gains_are_paired_by_prompt(tmp_path):
    """The summary's gain: per-prompt mean difference, t interval over prompts. Hand-computed: base
    prompt means A 0.1, B 0.5, C 0.3; policy 0.5, 0.7, 0.6; differences 0.4, 0.2, 0.3: mean 0.3,
    s 0.1, se 0.057735, t(2, 0.975) 4.302653, interval 0.3 ± 0.248414, p = 1 - t/sqrt(2 + t^2) = 0.0351."""
    from alignkit.demo import gain_lines, gold_gains

    def write(stage, rows):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "samples.jsonl").write_text("".join(json.dumps(
            {"tag": tag, "prompt": p, "completion": "x", "rewards": {"gold": g, "proxy": 0.0}}) + "\n"
            for tag, p, g in rows))

    write("eval_base", [("policy", "A", 0.0), ("policy", "A", 0.2), ("policy", "B", 0.5), ("policy", "B", 0.5),
                        ("policy", "C", 0.3)])
    # the reference rows an eval keeps beside its policy rows are not the policy's
    write("eval_dpo", [("reference", "A", 9.0), ("policy", "A", 0.4), ("policy", "A", 0.6), ("policy", "B", 0.6),
                       ("policy", "B", 0.8), ("policy", "C", 0.5), ("policy", "C", 0.7)])
    g = gold_gains(tmp_path)
    assert set(g) == {"base", "DPO"} and "gain" not in g["base"]
    assert g["base"]["gold"]["mean"] == pytest.approx(0.3)
    assert g["base"]["gold"]["hi"] - 0.3 == pytest.approx(4.302653 * 0.2 / 3 ** 0.5, abs=1e-5)
    gain = g["DPO"]["gain"]
    assert gain["diff_mean"] == pytest.approx(0.3) and gain["diff_n"] == 3
    assert gain["diff_lo"] == pytest.approx(0.3 - 0.248414, abs=1e-5)
    assert gain["diff_hi"] == pytest.approx(0.3 + 0.248414, abs=1e-5)
    t = 0.3 / (0.1 / 3 ** 0.5)
    assert gain["p_value"] == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-6)
    assert gain["verdict"] == "better"
    (line,) = gain_lines({"DPO": {"kl/ref": 1.5}}, g)
    assert "gain +0.300 [+0.052, +0.548]" in line and "better than the starting model" in line
    # a gain whose interval holds 0 says so
    write("eval_ppo", [("policy", "A", 0.3), ("policy", "B", 0.4), ("policy", "C", 0.4)])
    g = gold_gains(tmp_path)
    assert g["PPO"]["gain"]["verdict"] == "not distinguishable"
    assert "NOT DISTINGUISHABLE from the starting model" in gain_lines({}, g)[1]


def test_reward_model_accuracy_on_held_out_prompts(tmp_path):
    """Pairs within a prompt whose gold gap exceeds the margin, scored by whether the proxy orders them
    as gold does (a proxy tie is one half), averaged per prompt, then over prompts. Hand-computed with
    margin 0.3: prompt A (gold 0.0, 0.5, 0.9; proxy 1, 2, 0): pairs (0.0, 0.5) right, (0.0, 0.9) wrong,
    (0.5, 0.9) wrong -> 1/3; prompt B (gold 0.0, 1.0; proxy 3, 3): a tie -> 1/2; prompt C (gold 0.1,
    0.2): gap 0.1, no pair. Mean of (1/3, 1/2) = 5/12 over 2 prompts, 4 pairs; the t interval over the
    two prompt means: se = |1/2 - 1/3| / 2 = 1/12, half-width t(1, 0.975) = 12.7062 x 1/12."""
    from alignkit.demo import reward_model_lines, rm_heldout_accuracy

    rows = [("A", 0.0, 1.0), ("A", 0.5, 2.0), ("A", 0.9, 0.0), ("B", 0.0, 3.0), ("B", 1.0, 3.0),
            ("C", 0.1, 0.0), ("C", 0.2, 5.0)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"tag": "policy", "prompt": p, "completion": "x",
                                        "rewards": {"gold": g, "proxy": q}}) + "\n" for p, g, q in rows)
                    + json.dumps({"tag": "reference", "prompt": "A", "rewards": {"gold": 9.0, "proxy": -9.0}}) + "\n")
    res = rm_heldout_accuracy(path, margin=0.3)
    assert res["pairs"] == 4 and res["prompts"] == 2 and res["margin"] == 0.3
    acc = res["accuracy"]
    assert acc["mean"] == pytest.approx(5 / 12)
    assert acc["hi"] - acc["mean"] == pytest.approx(12.7062 / 12, rel=1e-4)
    assert rm_heldout_accuracy(path, margin=2.0) is None  # no pair qualifies
    (line,) = reward_model_lines({"heldout_prompts": res})
    assert "4 answer pairs" in line and "2 prompts" in line and "gold gap > 0.3" in line
