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
    return re.findall(r'<figure data-metric="([^"]+)"><svg', html)


def test_report_has_one_svg_per_metric_and_scatter(tmp_path):
    run = write_run(tmp_path / "run1")
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    html = out.read_text()
    metrics = figures(html)
    for key in TRAIN_KEYS + EVAL_KEYS:
        assert metrics.count(key) == 1, key
    assert "reward_vs_kl" in metrics  # rewards/mean and kl/ref both present
    assert html.count("<svg") == len(TRAIN_KEYS) + len(EVAL_KEYS) + 1
    # loss first among the metric plots, train namespaces before eval ones
    order = [m for m in metrics if m != "reward_vs_kl"]
    assert order[0] == "train/loss"
    assert order.index("kl/ref") < order.index("eval/kl/ref")
    assert "alignkit report: run1" in html


def test_report_alerts_summary_config(tmp_path):
    html = write_report(write_run(tmp_path / "r")).read_text()
    assert 'class="alert"' in html and "kl_blowup" in html and "above the budget 10.0" in html
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
    assert len(figures(html)) == len(TRAIN_KEYS) + len(EVAL_KEYS) + 1
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
    assert "frontier" in metrics
    # both runs in the legend, labelled by name and command (algorithm)
    assert "ppo-beta0.05 (ppo)" in html and "b (grpo)" in html
    # the frontier uses eval points: 3 eval lines per run -> 6 dots
    frontier = html.split('data-metric="frontier">')[1].split("</svg>")[0]
    assert frontier.count("<circle") == 6 and "eval/rewards/gold" in frontier
    # overlaid curves: two polylines per shared metric plot
    loss = html.split('data-metric="train/loss">')[1].split("</svg>")[0]
    assert loss.count('<polyline points="') == 1 + 2  # axes + one curve per run


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
