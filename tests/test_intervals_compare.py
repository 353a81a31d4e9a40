"""Intervals where a user compares: eval directories with per-prompt rewards, `compare`'s verdict
against the starting model (paired by prompt), ± in its tables and error bars on its plots."""

import json
import math
import random
import re
from pathlib import Path

import pytest

from alignkit.eval.evaluate import EvalConfig, summarize, write_eval_run
from alignkit.eval.paired import compare_eval_dirs, gain_from_metrics, prompt_scores, read_samples
from alignkit.eval.report import compare_runs
from alignkit.eval.stats import format_pm, gain_text, mean_interval, paired_comparison, t_quantile

PROMPTS = [f"Tell me about day {i}." for i in range(8)]


def levels(seed=0):
    """Each prompt's difficulty: prompts differ a lot."""
    rng = random.Random(seed)
    return [rng.uniform(-0.6, 0.6) for _ in PROMPTS]


def sample_gold(effect, seed, samples=4, noise=0.2):
    """Gold rewards of a model ``effect`` above the starting model: gold[i][j], prompt i, sample j."""
    rng = random.Random(seed)
    return [[level + effect + rng.gauss(0, noise) for _ in range(samples)] for level in levels()]


def base_gold():
    return sample_gold(0.0, seed=100)


def make_eval(path: Path, name: str, gold, ref=None, kl=1.0, seed=0) -> Path:
    """An `alignkit eval` output directory from hand-made scores (gold[i][j]: prompt i, sample j),
    written by the same code as the command (summarize + write_eval_run)."""
    rng = random.Random(seed)
    index = [i for i, g in enumerate(gold) for _ in g]
    flat = [v for g in gold for v in g]
    texts = [f"reply {n}" for n in range(len(flat))]
    kl_tokens = [[kl / 2 + rng.uniform(-0.1, 0.1)] * 2 for _ in flat]
    ref_flat = [v for g in ref for v in g] if ref is not None else None
    proxy = [2 * v + 1 for v in flat]
    rewards = {"gold": flat, "proxy": proxy}
    ref_rewards = {"gold": ref_flat, "proxy": [2 * v + 1 for v in ref_flat]} if ref is not None else None
    lengths = [rng.randint(8, 24) for _ in flat]
    metrics = summarize(texts, lengths, [True] * len(flat), index, kl_tokens, rewards, ref_rewards,
                        index, "gold" if ref is not None else None)
    samples = [{"tag": "policy", "prompt": PROMPTS[i], "prompt_index": i, "completion": t,
                "rewards": {"gold": g, "proxy": p}, "reward": g} for t, i, g, p in zip(texts, index, flat, proxy)]
    cfg = EvalConfig(output=str(path), name=name)
    write_eval_run(path, cfg, metrics, {"policy": name, "reference": "base"}, samples)
    return path


@pytest.fixture()
def eval_dirs(tmp_path):
    base = base_gold()
    better, same, worse = sample_gold(0.3, seed=1), sample_gold(0.0, seed=2), sample_gold(-0.25, seed=3)
    return {
        "base": make_eval(tmp_path / "eval_base", "base", base, ref=base, kl=0.0),
        "better": make_eval(tmp_path / "eval_dpo", "dpo", better, ref=base, kl=3.0, seed=1),
        "same": make_eval(tmp_path / "eval_same", "same", same, ref=base, kl=0.5, seed=2),
        "worse": make_eval(tmp_path / "eval_ppo", "ppo", worse, ref=base, kl=6.0, seed=3),
    }


def test_paired_comparison_of_two_eval_dirs_by_hand(eval_dirs):
    base, better = base_gold(), json.loads((eval_dirs["better"] / "eval.json").read_text())["metrics"]
    pc = compare_eval_dirs(eval_dirs["base"], eval_dirs["better"], "gold")
    # by hand: per-prompt mean differences, then a t interval with 7 degrees of freedom
    rows = read_samples(eval_dirs["better"])
    diffs = []
    for i, p in enumerate(PROMPTS):
        mine = [r["rewards"]["gold"] for r in rows if r["prompt"] == p]
        diffs.append(sum(mine) / len(mine) - sum(base[i]) / len(base[i]))
    mean = sum(diffs) / 8
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7 / 8)
    assert pc.diff.n == 8 and pc.diff.mean == pytest.approx(mean) and pc.diff.se == pytest.approx(se)
    assert pc.diff.lo == pytest.approx(mean - t_quantile(0.975, 7) * se)
    assert pc.verdict == "better" and pc.diff.mean == pytest.approx(0.3, abs=0.1)
    # the eval's own gain over its reference (the base's samples) is the same comparison
    own = gain_from_metrics(better, "gold")
    assert own.diff.mean == pytest.approx(pc.diff.mean) and own.diff.lo == pytest.approx(pc.diff.lo)
    assert own.verdict == "better" and "better than the starting model" in own.text()
    assert compare_eval_dirs(eval_dirs["base"], eval_dirs["same"]).verdict == "not distinguishable"
    assert compare_eval_dirs(eval_dirs["base"], eval_dirs["worse"]).verdict == "worse"


def test_prompt_scores_skip_reference_rows_and_missing_scores():
    rows = [{"tag": "reference", "prompt": "a", "rewards": {"gold": 1.0}},
            {"tag": "policy", "prompt": "a", "rewards": {"gold": 0.5}},
            {"tag": "policy", "prompt": "b", "rewards": {"proxy": 2.0}},
            {"tag": "policy", "prompt": "c", "rewards": {"gold": float("nan")}}]
    assert prompt_scores(rows, "gold") == ([0.5], ["a"])


def test_gain_text_reads_like_a_claim():
    iv = mean_interval([0.2, 0.3, 0.25, 0.35])
    line = gain_text(iv, 0.001)
    # mean 0.275, s = 0.064550, se = 0.032275, t(3) = 3.182446: half-width 0.1027 (two significant digits)
    assert line == "+0.28 ± 0.10 (95% CI 0.17 to 0.38, p=0.001, 4 prompts): better than the starting model"
    assert gain_text(iv, digits=3).startswith("+0.275 ± 0.103 (95% CI 0.172 to 0.378, 4 prompts)")
    assert format_pm(0.33921, 0.2317) == "0.34 ± 0.23" and format_pm(2.975, 0.0402) == "2.975 ± 0.040"
    assert format_pm(-0.25, 0.0, sign=True) == "-0.25 ± 0"
    flat = paired_comparison([0.0, 0.1, 0.2], [0.05, 0.05, 0.2])
    assert flat.text().endswith("not distinguishable from the starting model")


def test_compare_states_verdicts_and_shows_intervals(eval_dirs, tmp_path):
    runs = [eval_dirs[k] for k in ("base", "better", "same", "worse")]
    html = compare_runs(runs, tmp_path / "compare.html").read_text()
    verdicts = dict(((m[0], m[1]), m[2]) for m in re.findall(
        r'data-run="([^"]+)" data-source="([^"]+)" data-verdict="([^"]+)"', html))
    assert verdicts[("dpo (eval)", "gold")] == "better"
    assert verdicts[("same (eval)", "gold")] == "not distinguishable"
    assert verdicts[("ppo (eval)", "gold")] == "worse"
    assert verdicts[("ppo (eval)", "proxy")] == "worse"  # proxy = 2 gold + 1
    assert "base (eval) (starting model)" in html
    # the final numbers: mean ± half-width, the companion keys folded in
    final = html[html.index('<table class="final">'):]
    final = final[:final.index("</table>")]
    assert 'data-metric="rewards/gold"' in final and "rewards/gold_lo" not in final
    dpo = json.loads((eval_dirs["better"] / "summary.json").read_text())
    half = (dpo["rewards/gold_hi"] - dpo["rewards/gold_lo"]) / 2
    assert format_pm(dpo["rewards/gold"], half) in final
    # error bars: one per run on the gold bars, none for a metric without interval
    gold_fig = re.search(r'<figure data-metric="eval/rewards/gold".*?</figure>', html, re.S).group(0)
    assert gold_fig.count('class="errbar"') == 4 and gold_fig.count('<rect class="bar"') == 4
    assert 'data-metric="eval/rewards/gold_lo"' not in html  # not a plot of its own
    len_fig = re.search(r'<figure data-metric="eval/length/mean".*?</figure>', html, re.S).group(0)
    assert "errbar" not in len_fig
    # the frontier: a vertical and a horizontal bar through every point
    frontier = re.search(r'<figure data-metric="frontier".*?</figure>', html, re.S).group(0)
    assert frontier.count('class="errbar"') == 4 and frontier.count('class="errbar-x"') == 4


def test_compare_cli_prints_the_verdicts(eval_dirs, tmp_path):
    from click.testing import CliRunner

    from alignkit.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["compare", str(eval_dirs["better"]), str(eval_dirs["worse"]),
                                           "--baseline", str(eval_dirs["base"]), "--output", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    lines = [l for l in res.output.splitlines() if "rewards/gold" in l]
    assert len(lines) == 2
    assert lines[0].startswith(f"{eval_dirs['better']}: rewards/gold +0.") and "better than the starting model" in lines[0]
    assert "worse than the starting model" in lines[1] and "8 prompts" in lines[1]


def test_compare_baseline_flag_and_runs_without_samples(eval_dirs, tmp_path):
    runs = [eval_dirs["better"], eval_dirs["base"]]
    html = compare_runs(runs, tmp_path / "c.html", baseline=eval_dirs["base"]).read_text()
    assert "base (eval) (starting model)" in html
    assert re.search(r'data-run="dpo \(eval\)" data-source="gold" data-verdict="better"', html)
    lone = tmp_path / "train_run"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    html = compare_runs([lone, eval_dirs["base"]], tmp_path / "d.html").read_text()
    assert "No per-prompt rewards to pair" in html


def test_compare_intervals_in_headless_chromium(eval_dirs, tmp_path):
    """compare.html as a browser draws it: every error bar has a height on screen, the verdicts read
    better / not distinguishable / worse in green / grey / red, and the final numbers carry ±. The
    screenshot goes to the test's folder, or to docs/images/ with ALIGNKIT_UPDATE_SCREENSHOTS=1."""
    import os

    from playwright.sync_api import sync_playwright

    from tests.helpers import chromium_path

    runs = [eval_dirs[k] for k in ("base", "better", "same", "worse")]
    page_path = compare_runs(runs, tmp_path / "compare.html")
    shots = Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOTS") \
        else tmp_path
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        got = page.evaluate("""() => ({
          bars: [...document.querySelectorAll('figure[data-metric="eval/rewards/gold"] path.errbar')]
              .map(e => e.getBBox().height),
          verdicts: [...document.querySelectorAll('tr.verdict')].map(r => [r.dataset.run, r.dataset.source,
              r.dataset.verdict, getComputedStyle(r.lastElementChild).color]),
          pm: [...document.querySelectorAll('table.final td .iv')].length})""")
        assert not errors
        assert len(got["bars"]) == 4 and all(h > 5 for h in got["bars"]), got["bars"]  # drawn, not a line
        colours = {v: c for _, _, v, c in got["verdicts"]}
        assert colours == {"better": "rgb(43, 138, 62)", "not distinguishable": "rgb(85, 85, 85)",
                           "worse": "rgb(201, 42, 42)"}
        assert got["pm"] >= 4 * 4  # gold, proxy, win rate and KL of 4 runs at least
        page.set_viewport_size({"width": 1100, "height": 1250})
        page.screenshot(path=str(shots / "compare-intervals.png"))
        browser.close()
