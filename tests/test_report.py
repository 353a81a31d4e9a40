"""HTML run reports and run comparisons built from synthetic run directories."""

import json
import math
import re
from pathlib import Path

import pytest

from alignkit.eval.report import compare_runs, load_run, metric_series, write_report
from alignkit.eval.svg import line_plot, scatter_plot

TRAIN_KEYS = ["train/loss", "rewards/mean", "kl/ref", "rollout/length_mean", "diversity/distinct_2"]
EVAL_KEYS = ["eval/rewards/gold", "eval/kl/ref"]


def write_run(path: Path, *, command="ppo", name=None, steps=30, kl_scale=1.0, with_extras=True):
    """A small PPO-like run: train lines every step, eval lines every 10 steps, KL blowing up."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(steps):
        lines.append({"step": s, "train/loss": 1.0 / (1 + s), "rewards/mean": 0.03 * s,
                      "kl/ref": kl_scale * 0.5 * s, "rollout/length_mean": 100 + s,
                      "diversity/distinct_2": 0.6 - 0.002 * s})
        if s % 10 == 0:
            lines.append({"step": s, "eval/rewards/gold": 0.4 + 0.01 * s, "eval/kl/ref": kl_scale * 0.5 * s})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    if not with_extras:
        return path
    cfg = f"command: {command}\n" + (f"name: {name}\n" if name else "") + "beta: 0.05  # KL coef\n"
    (path / "config.yaml").write_text(cfg)
    alerts = [{"step": 24, "kind": "kl_blowup",
               "message": "KL to the reference is 12.0 nats/sequence, above the budget 10.0: "
                          "lower the learning rate or raise beta"}]
    (path / "alerts.jsonl").write_text("\n".join(json.dumps(a) for a in alerts) + "\n")
    samples = [
        {"tag": "before", "prompt": "Say hi & bye", "completion": "hi", "reward": 0.1},
        {"tag": "after", "prompt": "Say hi & bye", "completion": "<script>alert('x')</script> hi!",
         "reward": 0.9},
        {"tag": "after", "prompt": "Only after", "completion": "text without before"},
    ]
    (path / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in samples) + "\n")
    (path / "summary.json").write_text(json.dumps({"final/reward": 0.87, "final/kl": 14.5, "steps": steps}))
    return path


def figures(html: str) -> list:
    return re.findall(r'<figure data-metric="([^"]+)" data-keys="[^"]*"><svg', html)


def drawn(html: str) -> list:
    """Every metric key drawn by a plot (an overlay draws two)."""
    return [k for keys in re.findall(r'<figure data-metric="[^"]+" data-keys="([^"]*)"><svg', html)
            for k in keys.split()]


def figure(html: str, key: str) -> str:
    return html.split(f'data-metric="{key}"')[1].split("</svg>")[0]


def test_report_has_one_svg_per_metric_and_scatter(tmp_path):
    run = write_run(tmp_path / "run1")
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    html = out.read_text()
    metrics = figures(html)
    for key in TRAIN_KEYS + EVAL_KEYS:
        assert drawn(html).count(key) == 1 + (key in ("rewards/mean", "eval/rewards/gold")), key  # + scatter
    # each reward against KL in its own panel: the proxy and the gold reward are on different scales
    assert [m for m in metrics if m.startswith("reward_vs_kl")] == ["reward_vs_kl:eval/rewards/gold",
                                                                     "reward_vs_kl:rewards/mean"]
    # eval/kl/ref is overlaid on kl/ref (two curves, labelled train and eval); eval/rewards/gold has no
    # training twin and keeps its own plot
    kl = figure(html, "kl/ref")
    assert 'data-keys="kl/ref eval/kl/ref"' in html and kl.count("<polyline class=\"series\"") == 2
    assert ">train<" in kl and ">eval<" in kl
    assert html.count("<svg") == len(TRAIN_KEYS) + 1 + 2
    # loss first among the metric plots
    order = [m for m in metrics if not m.startswith("reward_vs_kl")]
    assert order[0] == "train/loss"
    assert "alignkit report: run1" in html


def test_report_alerts_summary_config(tmp_path):
    html = write_report(write_run(tmp_path / "r")).read_text()
    assert 'class="alert"' in html and "kl_blowup" in html and "above the budget 10.0" in html
    # the red banner comes before everything else and counts every alert
    assert html.index('<div class="banner bad" id="alerts" data-alerts="1"><b>1 alert</b>: kl_blowup') \
        < html.index("<h2>Summary</h2>")
    assert "final/reward" in html and "0.87" in html
    assert "<details><summary>config.yaml</summary>" in html and "beta: 0.05  # KL coef" in html
    assert "command: ppo" in html


def test_report_escapes_samples(tmp_path):
    html = write_report(write_run(tmp_path / "r")).read_text()
    assert "<script>" not in html  # the report itself has no scripts at all
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; hi!" in html
    assert "Say hi &amp; bye" in html
    # before and after side by side: "before" column header precedes "after"
    assert html.index("<th>before</th>") < html.index("<th>after</th>")
    assert "reward 0.9" in html and "text without before" in html


def test_report_with_only_metrics(tmp_path):
    run = write_run(tmp_path / "bare", with_extras=False)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "{truncated\n\n")
    html = write_report(run).read_text()
    assert len(figures(html)) == len(TRAIN_KEYS) + 1 + 2
    assert "1 unreadable line(s) skipped in metrics.jsonl" in html
    # no summary.json: last values; no alerts.jsonl: recomputed (KL reaches 14.5 > budget 10)
    assert "last logged value" in html
    assert "recomputed from metrics.jsonl" in html and "kl_blowup" in html
    assert "<details>" not in html and "Samples" not in html


def test_report_requires_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_metric_series_mixed_lines():
    rows = [{"step": 0, "a/x": 1.0, "note": "text", "flag": True}, {"step": 5, "eval/y": 2},
            {"a/x": 3.0}]
    # non-numeric values and booleans are dropped; a line without "step" uses its index (2)
    assert metric_series(rows) == {"a/x": [(0.0, 1.0), (2.0, 3.0)], "eval/y": [(5.0, 2.0)]}


def test_compare_runs(tmp_path):
    a = write_run(tmp_path / "a", command="ppo", name="ppo-beta0.05")
    b = write_run(tmp_path / "b", command="grpo", kl_scale=0.5)
    (b / "metrics.jsonl").write_text((b / "metrics.jsonl").read_text()
                                     + json.dumps({"step": 30, "only/b": 1.0}) + "\n")
    out = compare_runs([a, b], tmp_path / "cmp" / "compare.html")
    html = out.read_text()
    assert out.is_file()
    metrics = figures(html)
    for key in TRAIN_KEYS + EVAL_KEYS:
        assert metrics.count(key) == 1
    assert "only/b" not in metrics  # logged by one run only
    assert '<td class="alert"><b>kl_blowup</b></td>' in html  # alerts in red in the runs table
    assert "frontier" in metrics
    # both runs in the legend, labelled by name and command (algorithm)
    assert "ppo-beta0.05 (ppo)" in html and "b (grpo)" in html
    # the frontier uses eval points: 3 eval lines per run -> 6 dots
    frontier = figure(html, "frontier")
    assert frontier.count("<circle") == 6 and "eval/rewards/gold" in frontier
    # overlaid curves: two polylines per shared metric plot
    loss = figure(html, "train/loss")
    assert loss.count('<polyline class="series"') == 2  # one curve per run


def test_compare_same_names_get_unique_labels(tmp_path):
    a = write_run(tmp_path / "x" / "run", with_extras=False)
    b = write_run(tmp_path / "y" / "run", with_extras=False)
    html = compare_runs([a, b], tmp_path / "c.html").read_text()
    assert "run #2" in html


def test_svg_edge_cases():
    nan, inf = float("nan"), float("inf")
    svg = line_plot({"s": [(0, 1.0), (1, nan), (2, inf), (3, 2.0)]}, "t<1>", "step", "y")
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "t&lt;1&gt;" in svg
    assert "nan" not in svg and "inf" not in svg
    assert svg.count(",") >= 2  # the polyline kept the two finite points
    single = line_plot({"s": [(5, 3.0)]}, "one", "step", "y")
    assert "<circle" in single and "nan" not in single
    const = line_plot({"s": [(0, 2.0), (1, 2.0), (2, 2.0)]}, "flat", "step", "y")
    assert "<polyline" in const and "nan" not in const
    empty = line_plot({"s": [(0, nan)]}, "empty", "step", "y")
    assert "no finite data" in empty
    scat = scatter_plot({"a": [(1, 1), (2, nan)], "b": [(3, 4)]}, "sc", "x", "y")
    assert scat.count("<circle") == 2 and ">a<" in scat and ">b<" in scat  # legend
    big = line_plot({"s": [(i, math.sin(i)) for i in range(20000)]}, "long", "step", "y")
    assert len(big) < 60000  # decimated


def test_load_run_reads_name_and_command(tmp_path):
    run = load_run(write_run(tmp_path / "dir", command="dpo", name="my-dpo"))
    assert (run.name, run.command, run.label) == ("my-dpo", "dpo", "my-dpo (dpo)")
    assert run.config["beta"] == 0.05 and len(run.samples) == 3 and run.summary["steps"] == 30


def test_single_values_are_numbers_and_alerts_banner_is_red(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    # an evaluation: every metric logged once; a training-like run logs train/loss twice
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/rewards/gold": 0.31, "eval/kl/ref": 2.5,
                                                   "eval/win_rate/gold": 0.625}) + "\n")
    (run / "alerts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in [
        {"step": 3, "kind": "heldout_regression", "message": "eval/accuracy fell from 0.5 to 0.29"},
        {"step": 4, "kind": "kl_blowup", "message": "KL 12 > 10"}]))
    html = write_report(run).read_text()
    assert figures(html) == []  # no lone dots on a step axis
    rows = dict(re.findall(r'<tr data-metric="([^"]+)"><th>[^<]+</th><td>([^<]+)</td>', html))
    assert rows == {"eval/kl/ref": "2.5", "eval/rewards/gold": "0.31", "eval/win_rate/gold": "0.625"}
    banner = re.search(r'<div class="banner bad" id="alerts" data-alerts="2">(.*?)</div>', html).group(1)
    assert "2 alerts" in banner and "heldout_regression, kl_blowup" in banner
    assert html.count('<div class="alert" data-kind=') == 2
    assert ".banner.bad{background:#c92a2a" in html  # red
    assert "No failure mode detected" not in html and "No alerts" not in html
    # a value the summary already shows (an evaluation's summary.json drops the eval/ prefix) is only named
    (run / "summary.json").write_text(json.dumps({"kl/ref": 2.5, "rewards/gold": 0.3}))
    html = write_report(run).read_text()
    rows = dict(re.findall(r'<tr data-metric="([^"]+)"><th>[^<]+</th><td>([^<]+)</td>', html))
    assert rows == {"eval/rewards/gold": "0.31", "eval/win_rate/gold": "0.625"}
    assert 'data-in-summary="eval/kl/ref"' in html
    (run / "alerts.jsonl").write_text("")
    html = write_report(run).read_text()
    assert '<div class="banner none" id="alerts" data-alerts="0">No alerts (alerts.jsonl)' in html
    assert 'class="ok"' not in html  # no green all-clear


def test_throughput_and_memory_panel_and_eval_overlay(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": s, "train/loss": 1 / s, "time/step_s": 0.5, "perf/examples_per_s": 16.0,
             "perf/peak_mem_gb": 1.0 + s / 10} for s in range(1, 6)]
    rows += [{"step": 0, "eval/loss": 1.2}, {"step": 5, "eval/loss": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = write_report(run).read_text()
    perf = html.split("<h2>Throughput and memory</h2>")[1]
    assert figures(perf) == ["perf/examples_per_s", "perf/peak_mem_gb", "time/step_s"]
    assert figures(html.split("<h2>Throughput and memory</h2>")[0]) == ["train/loss"]
    loss = figure(html, "train/loss")
    assert loss.count("<polyline class=\"series\"") == 2 and ">train<" in loss and ">eval<" in loss


def test_compare_shows_single_values_as_bars(tmp_path):
    runs = []
    for name, gold in (("base", 0.1), ("dpo", 0.4), ("ppo", -0.2)):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/rewards/gold": gold}) + "\n")
        runs.append(d)
    html = compare_runs(runs, tmp_path / "c.html").read_text()
    bars = figure(html, "eval/rewards/gold")
    assert bars.count('<rect class="bar"') == 3 and bars.count("<polyline") == 1  # the axes only
    assert [t for t in re.findall(r'<text class="barlabel"[^>]*>([^<]+)</text>', bars)] == ["base", "dpo", "ppo"]
    assert "<circle" not in bars


def test_tick_labels_are_distinct_and_steps_are_integers():
    from alignkit.eval.svg import tick_labels

    svg = line_plot({"s": [(0, 1000.1), (1, 1000.2), (2, 1000.4)]}, "t", "step", "y")
    ys = re.findall(r'<text class="ytick"[^>]*>([^<]+)</text>', svg)
    xs = re.findall(r'<text class="xtick"[^>]*>([^<]+)</text>', svg)
    assert len(ys) == len(set(ys)) >= 3 and "1000.1" in ys  # .4g alone would print "1000" for each
    assert xs == ["0", "1", "2"]  # a step axis has no 0.5 ticks
    assert tick_labels([0.1, 0.2, 0.30000000000000004]) == ["0.1", "0.2", "0.3"]


def test_reward_vs_kl_points_carry_their_steps(tmp_path):
    """Every point's tooltip names its step; up to 12 labels are printed, always the first and last."""
    run = write_run(tmp_path / "r", steps=30)
    html = write_report(run).read_text()
    fig = figure(html, "reward_vs_kl:rewards/mean")
    tips = re.findall(r"<title>rewards/mean (step \d+): \(([^,]+), ([^)]+)\)</title>", fig)
    assert [t[0] for t in tips] == [f"step {s}" for s in range(30)]
    assert float(tips[7][1]) == pytest.approx(3.5) and float(tips[7][2]) == pytest.approx(0.21)  # kl 0.5*7, 0.03*7
    printed = re.findall(r'<text class="ptlabel"[^>]*>(step \d+)</text>', fig)
    assert len(printed) == 12 and printed[0] == "step 0" and printed[-1] == "step 29"
    eval_fig = figure(html, "reward_vs_kl:eval/rewards/gold")
    assert re.findall(r'class="ptlabel"[^>]*>(step \d+)<', eval_fig) == ["step 0", "step 10", "step 20"]


def test_compare_shows_config_differences_and_samples_side_by_side(tmp_path):
    from alignkit.eval.report import config_diff

    a = write_run(tmp_path / "a", command="dpo", name="lr-high")
    b = write_run(tmp_path / "b", command="dpo", name="lr-low")
    (a / "config.yaml").write_text("command: dpo\nname: lr-high\noutput: runs/a\noptim:\n  lr: 0.001\n"
                                   "  scheduler: cosine\ndpo:\n  beta: 0.1\n")
    (b / "config.yaml").write_text("command: dpo\nname: lr-low\noutput: runs/b\noptim:\n  lr: 1.0e-05\n"
                                   "  scheduler: cosine\ndpo:\n  beta: 0.1\n  loss: ipo\n")
    samples_b = [{"tag": "after", "prompt": "Say hi & bye", "completion": "bye <b>now</b>", "reward": 0.2}]
    (b / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in samples_b) + "\n")
    diff = dict((k, [str(x) for x in v]) for k, v in config_diff([load_run(a).config, load_run(b).config]))
    assert diff == {"dpo.loss": ["(not set)", "ipo"], "name": ["lr-high", "lr-low"], "optim.lr": ["0.001", "1e-05"]}
    html = compare_runs([a, b], tmp_path / "c.html").read_text()
    section = html.split("<h2>Config differences</h2>")[1].split("<h2>")[0]
    assert "<th>optim.lr</th><td><code>0.001</code></td><td><code>1e-05</code></td>" in section
    assert "scheduler" not in section and "output" not in section and "dpo.beta" not in section
    side = html.split("<h2>Samples side by side</h2>")[1]
    first = side.split("<tr>")[2]  # the first prompt is the one both runs answered
    assert "Say hi &amp; bye" in first
    answers = side.split("<tr>")[3]
    assert answers.index("&lt;script&gt;alert") < answers.index("bye &lt;b&gt;now&lt;/b&gt;")  # run a, then b
    assert "reward 0.9" in answers and "reward 0.2" in answers and "<script>" not in html
    assert "(no sample)" in side  # "Only after" exists in run a only
