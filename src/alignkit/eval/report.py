"""Self-contained HTML reports for one run, and comparisons across runs.

A run directory holds (only ``metrics.jsonl`` is required):

``metrics.jsonl``  one JSON object per line, ``{"step": int, "<namespace>/<name>": float, ...}``;
                   lines may carry different keys (train lines, ``eval/``-prefixed eval lines).
``config.yaml``    the run's configuration; ``name`` / ``run_name`` and ``command`` are used.
``alerts.jsonl``   ``{"step", "kind", "message"}`` per line (see :mod:`alignkit.eval.diagnostics`);
                   when absent, the alerts are recomputed from ``metrics.jsonl``.
``samples.jsonl``  ``{"tag": "before" | "after" | ..., "prompt", "completion", "reward"?}``.
``completions.jsonl`` online RL: ``{"step", "prompt", "completion", <reward name>..., "reward", "advantage"}``.
``summary.json``   a flat dict of final numbers; when absent, the last logged value of each metric.

The HTML embeds inline SVG (:mod:`alignkit.eval.svg`), no scripts and no external assets, so it
can be attached to an issue or opened offline. All text from the run is HTML-escaped.

What is drawn how: a metric logged at two or more steps is a line; a metric logged once is a number
(in a table; in a comparison, a bar per run), never a lone dot on a step axis. A held-out ``eval/X``
curve is overlaid on its training twin (``X``; ``eval/loss`` on ``train/loss``, ``eval/accuracy`` on
``rewards/accuracy``). Every reward gets its own panel (gold and proxy rewards live on different
scales). ``time/`` and ``perf/`` metrics (and ``time``, the wall clock of each line) form a throughput
and memory panel. The alert banner lists
every alert in ``alerts.jsonl`` in red; without alerts it says so in neutral grey, never "all good".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from alignkit.eval.behaviour import compare_probes_html
from alignkit.eval.diagnostics import Diagnostics
from alignkit.eval.paired import read_samples, versus
from alignkit.eval.stats import format_pm, is_interval_key, read_interval
from alignkit.eval.style import page
from alignkit.eval.svg import bar_plot, line_plot, scatter_plot
from alignkit.train.rundir import flatten_config

__all__ = ["RunData", "compare_runs", "load_run", "metric_series", "write_report"]

Series = Dict[str, List[Tuple[float, float]]]
# namespaces in reading order; others follow alphabetically, eval last
NAMESPACE_ORDER = ["train", "loss", "rewards", "kl", "logps", "rollout", "diversity", "policy",
                   "value", "optim", "lr", "perf"]
# reward keys for reward-versus-KL plots, most trustworthy first
REWARD_KEYS = ["eval/rewards/gold", "rewards/gold", "eval/rewards/mean", "rewards/mean"]
KL_KEYS = ["eval/kl/ref", "kl/ref"]
# held-out metrics overlaid on a training metric of another name (otherwise eval/X goes with X)
EVAL_PARTNERS = {"eval/loss": "train/loss", "eval/accuracy": "rewards/accuracy", "eval/margin": "rewards/margin"}
PERF_NAMESPACES = ("time", "perf")  # the throughput and memory panel

@dataclass
class RunData:
    """Everything read from a run directory."""

    path: Path
    name: str
    command: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    config_text: Optional[str] = None
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    alerts: List[Dict[str, Any]] = field(default_factory=list)
    alerts_computed: bool = False
    samples: List[Dict[str, Any]] = field(default_factory=list)
    completions: List[Dict[str, Any]] = field(default_factory=list)  # online RL: rollout rows by step
    summary: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.command})" if self.command else self.name


def _read_jsonl(path: Path, notes: List[str]) -> List[Dict[str, Any]]:
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line cut short by a crash
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{bad} unreadable line(s) skipped in {path.name}")
    return rows


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; raises FileNotFoundError when ``metrics.jsonl`` is missing."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: a run directory needs metrics.jsonl")
    run = RunData(path=run_dir, name=run_dir.resolve().name)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8")
        try:
            cfg = yaml.safe_load(run.config_text)
            run.config = cfg if isinstance(cfg, dict) else None
        except yaml.YAMLError as exc:
            run.notes.append(f"config.yaml could not be parsed: {exc}")
    if run.config:
        run.name = str(run.config.get("name") or run.config.get("run_name") or run.name)
        if run.config.get("command"):
            run.command = str(run.config["command"])
    run.metrics = _read_jsonl(metrics_path, run.notes)
    if (run_dir / "alerts.jsonl").is_file():
        run.alerts = _read_jsonl(run_dir / "alerts.jsonl", run.notes)
    else:
        diag = Diagnostics()
        found = diag.replay(run.metrics)
        if (run_dir / "summary.json").is_file() and run.metrics:  # a finished run: its end-of-run alerts too
            found += diag.end_of_run(int(run.metrics[-1].get("step", len(run.metrics))))
        run.alerts = [a.to_dict() for a in found]
        run.alerts_computed = True
    if (run_dir / "samples.jsonl").is_file():
        run.samples = _read_jsonl(run_dir / "samples.jsonl", run.notes)
    if (run_dir / "completions.jsonl").is_file():
        run.completions = _read_jsonl(run_dir / "completions.jsonl", run.notes)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            run.summary = summary if isinstance(summary, dict) else {}
        except json.JSONDecodeError as exc:
            run.notes.append(f"summary.json could not be parsed: {exc}")
    return run


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def metric_series(metrics: Sequence[Dict[str, Any]]) -> Series:
    """``{key: [(step, value), ...]}`` for every numeric key; a line without ``step`` uses its index."""
    out: Series = {}
    for i, row in enumerate(metrics):
        step = _number(row.get("step"))
        step = float(i) if step is None else step
        for key, value in row.items():
            v = _number(value)
            if key != "step" and v is not None:
                out.setdefault(key, []).append((step, v))
    return out


def _namespace(key: str) -> str:
    """Top-level namespace: ``train/loss`` -> ``train``, ``eval/rewards/gold`` -> ``eval``."""
    return key.split("/", 1)[0] if "/" in key else ""


def _ordered_groups(keys: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Group keys by top-level namespace: groups holding a loss first (train before eval), then
    the usual RLHF reading order; inside a group, loss keys first, then alphabetical."""
    groups: Dict[str, List[str]] = {}
    for key in keys:
        groups.setdefault(_namespace(key), []).append(key)

    def ns_rank(ns: str) -> Tuple[Any, ...]:
        has_loss = any("loss" in k.rsplit("/", 1)[-1] for k in groups[ns])
        pref = NAMESPACE_ORDER.index(ns) if ns in NAMESPACE_ORDER else len(NAMESPACE_ORDER)
        return (not has_loss, ns == "eval", pref, ns)

    return [(ns, sorted(groups[ns], key=lambda k: ("loss" not in k.rsplit("/", 1)[-1], k)))
            for ns in sorted(groups, key=ns_rank)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return escape(str(value))


def _fmt_key(values: Dict[str, Any], key: str) -> str:
    """``values[key]``, as ``mean ± half-width`` with the interval in a tooltip where ``KEY_lo`` and
    ``KEY_hi`` are there too (see :func:`alignkit.eval.stats.interval_keys`)."""
    iv = read_interval(values, key)
    if iv is None or not math.isfinite(iv.lo) or not math.isfinite(iv.hi):
        return _fmt(_number(values.get(key)) if _number(values.get(key)) is not None else values.get(key))
    return (f'<span class="iv" title="95% interval {iv.lo:.4g} to {iv.hi:.4g} over {iv.n} prompts">'
            f"{format_pm(iv.mean, iv.half_width)}</span>")


def _reward_kl_points(series: Series, reward_key: str) -> List[Tuple[float, float]]:
    """(KL, reward) at the steps where ``reward_key`` and a KL key were both logged."""
    return [(kl, r) for _, kl, r in reward_kl_steps(series, reward_key)]


def reward_kl_steps(series: Series, reward_key: str) -> List[Tuple[float, float, float]]:
    """(step, KL, reward) at the steps where ``reward_key`` and a KL key were both logged."""
    # an eval reward pairs with the eval KL when one was logged, a train reward with the train KL
    for kl_key in KL_KEYS if reward_key.startswith("eval/") else KL_KEYS[1:]:
        kl = dict(series.get(kl_key, ()))
        pts = [(s, kl[s], r) for s, r in series.get(reward_key, ()) if s in kl]
        if pts:
            return pts
    return []


def _step_labels(series: Series, reward_key: str) -> List[str]:
    """"step N" for each reward-vs-KL point, so the path of the run reads off the plot."""
    return [f"step {int(s) if float(s).is_integer() else s}" for s, _, _ in reward_kl_steps(series, reward_key)]


def _figure(key: str, svg: str, keys: Sequence[str] = ()) -> str:
    """A plot; ``data-keys`` names every metric it draws (for tests and the browser check)."""
    return (f'<figure data-metric="{escape(key)}" data-keys="{escape(" ".join(keys or [key]))}">'
            f"{svg}</figure>")


def _finite_points(pts: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    return [(s, v) for s, v in pts if math.isfinite(v)]


@dataclass
class _Plot:
    key: str  # the metric the plot is named after (the training one of an overlay)
    curves: Series  # {curve label: points}
    keys: List[str]  # every metric drawn


@dataclass
class _Layout:
    """How a run's metrics are shown: line plots by namespace, numbers, and the perf panel."""

    groups: List[Tuple[str, List[_Plot]]]  # namespace -> plots
    single: Dict[str, Tuple[float, float]]  # key -> (step, value) of metrics logged once
    perf: List[_Plot]


def _eval_partner(key: str, series: Series) -> Optional[str]:
    """The training metric a held-out ``eval/`` metric is overlaid on, when that was logged as a curve."""
    if not key.startswith("eval/"):
        return None
    partner = EVAL_PARTNERS.get(key, key[len("eval/"):])
    return partner if len(_finite_points(series.get(partner, ()))) >= 2 else None


def _layout(series: Series) -> _Layout:
    plots: Dict[str, _Plot] = {}
    single: Dict[str, Tuple[float, float]] = {}
    for key, pts in series.items():
        partner = _eval_partner(key, series)
        if partner is not None and partner not in plots:  # held-out points over the training curve
            plots[partner] = _Plot(partner, {"train": series[partner], "eval": pts}, [partner, key])
    drawn = {k for p in plots.values() for k in p.keys}
    for key, pts in series.items():
        if key in drawn:
            continue
        finite = _finite_points(pts)
        if len(finite) >= 2:
            plots[key] = _Plot(key, {key: pts}, [key])
        else:  # once (or never finite): a number, not a lone dot on a step axis
            single[key] = finite[-1] if finite else (pts[-1][0] if pts else 0.0, float("nan"))
    perf = [plots.pop(k) for k in sorted(plots) if _namespace(k) in PERF_NAMESPACES or k == "time"]
    groups = [(ns, [plots[k] for k in keys]) for ns, keys in _ordered_groups(list(plots))]
    return _Layout(groups, single, perf)


def _plot_figure(plot: _Plot) -> str:
    return _figure(plot.key, line_plot(plot.curves, plot.key, "step", plot.key.rsplit("/", 1)[-1]), plot.keys)


def _single_html(single: Dict[str, Tuple[float, float]], summary: Dict[str, Any]) -> List[str]:
    """Metrics logged once, as numbers; those the summary table already shows (same value, under the
    same key or without ``eval/``, as an evaluation's summary.json has them) are only named."""
    if not single:
        return []

    def in_summary(key: str, value: float) -> bool:
        return any(_number(summary.get(k)) == value for k in (key, key[len("eval/"):] if key.startswith("eval/") else key))

    shown = {k: sv for k, sv in single.items() if not in_summary(k, sv[1])}
    named = sorted(k for k in single if k not in shown)
    out = ["<h3>Logged once</h3>"]
    if shown:
        rows = "".join(f'<tr data-metric="{escape(k)}"><th>{escape(k)}</th><td>{_fmt(v)}</td>'
                       f'<td class="note">step {_fmt(s)}</td></tr>'
                       for k, (s, v) in sorted(shown.items(), key=lambda kv: (_namespace(kv[0]) == "eval", kv[0])))
        out += ['<p class="note">Metrics with a single value: shown as numbers, not plots.</p>',
                f'<table class="single">{rows}</table>']
    if named:
        out.append(f'<p class="note" data-in-summary="{escape(" ".join(named))}">{len(named)} metric(s) logged once '
                   "with the value shown in the summary above: " + escape(", ".join(named)) + ".</p>")
    return out


def _summary_html(run: RunData, series: Series) -> List[str]:
    if run.summary:
        items = [(k, _fmt_key(run.summary, k)) for k in run.summary if not is_interval_key(k, run.summary)]
        caption = "summary.json (± : half-width of the 95% interval over prompts)"
    else:
        items = [(k, _fmt(pts[-1][1])) for k, pts in sorted(series.items()) if pts]
        caption = "last logged value of each metric (no summary.json)"
    if not items:
        return []
    # KEY_before (held-out numbers before training) goes in a column beside KEY, not in a row of its own
    keys = {str(k) for k, _ in items}
    before = {str(k)[:-len("_before")]: v for k, v in items if str(k).endswith("_before")
              and str(k)[:-len("_before")] in keys}
    rows = [f"<tr><th>{escape(str(k))}</th>" + (f"<td>{before[k] if k in before else ''}</td>" if before else "")
            + f"<td>{v}</td></tr>" for k, v in items if not (str(k).endswith("_before") and
                                                                   str(k)[:-len("_before")] in before)]
    head = "<tr><th></th><th>before training</th><th>final</th></tr>" if before else ""
    per = max(12, -(-len(rows) // 3))  # long summaries in up to three side-by-side tables
    tables = "".join(f"<table>{head}{''.join(rows[i:i + per])}</table>" for i in range(0, len(rows), per))
    return ["<h2>Summary</h2>", f'<p class="note">{escape(caption)}</p>', f'<div class="cols">{tables}</div>']


def _alerts_html(run: RunData) -> List[str]:
    """The banner at the top: every alert in red, or a neutral "no alerts" (never a green all-clear:
    the checks only see the metrics a run logged)."""
    n = len(run.alerts)
    source = ("recomputed from metrics.jsonl with default thresholds (no alerts.jsonl)" if run.alerts_computed
              else "alerts.jsonl")
    if not n:
        return [f'<div class="banner none" id="alerts" data-alerts="0">No alerts ({escape(source)}). The live '
                "checks only see the metrics this run logged; read the plots too.</div>"]
    kinds = ", ".join(dict.fromkeys(str(a.get("kind", "alert")) for a in run.alerts))
    out = [f'<div class="banner bad" id="alerts" data-alerts="{n}"><b>{n} alert{"s" if n > 1 else ""}</b>: '
           f'{escape(kinds)} <span class="src">({escape(source)})</span></div>']
    for a in run.alerts:
        out.append(f'<div class="alert" data-kind="{escape(str(a.get("kind", "alert")))}">'
                   f'<b>{escape(str(a.get("kind", "alert")))}</b> at step '
                   f'{escape(str(a.get("step", "?")))}: {escape(str(a.get("message", "")))}</div>')
    return out


def _samples_html(samples: List[Dict[str, Any]], max_prompts: int) -> List[str]:
    if not samples:
        return []
    tags: List[str] = []
    by_prompt: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for s in samples:
        tag = str(s.get("tag", "sample"))
        if tag not in tags:
            tags.append(tag)
        by_prompt.setdefault(str(s.get("prompt", "")), {}).setdefault(tag, []).append(s)
    # "before" then "after" side by side, any other tags after them in order of appearance
    tags.sort(key=lambda t: {"before": 0, "after": 1}.get(t, 2))
    cells = [[by_prompt[p].get(tag, []) for tag in tags] for p in by_prompt]
    return _samples_table("Samples", tags, list(by_prompt), cells, max_prompts)


def _samples_table(title: str, columns: List[str], prompts: List[str], cells: List[List[List[Dict[str, Any]]]],
                   max_prompts: int, empty: str = "") -> List[str]:
    """A table of samples: per prompt, a row with the prompt, then a row with one cell per column
    (``cells[i][j]``: the samples of prompt i in column j, each answer with its reward). Escaped."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = []
    for prompt, row in list(zip(prompts, cells))[:max_prompts]:
        tds = []
        for samples in row:
            parts = []
            for s in samples:
                reward = _number(s.get("reward"))
                r = f'<div class="note">reward {_fmt(reward)}</div>' if reward is not None else ""
                parts.append(f"<pre>{escape(str(s.get('completion', '')))}</pre>{r}")
            tds.append(f"<td>{'<hr>'.join(parts) or empty}</td>")
        rows.append(f'<tr><td colspan="{len(columns)}"><b>Prompt:</b><pre>{escape(prompt)}</pre></td></tr>'
                    f"<tr>{''.join(tds)}</tr>")
    out = [f"<h2>{escape(title)}</h2>", f'<table class="samples"><tr>{head}</tr>{"".join(rows)}</table>']
    if len(prompts) > max_prompts:
        out.append(f'<p class="note">{len(prompts) - max_prompts} more prompt(s) not shown.</p>')
    return out


def _spread(values: List[int], k: int) -> List[int]:
    """At most ``k`` of ``values``, evenly spaced, first and last included."""
    if len(values) <= k:
        return values
    return sorted({values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)})


def _completions_html(rows: List[Dict[str, Any]], max_steps: int = 30, max_rows: int = 16) -> List[str]:
    """Online RL's rollout samples by step (``completions.jsonl``): one collapsible table per logged step
    (the last one open): prompt, completion, each reward, the total and the advantage. All text escaped."""
    if not rows:
        return []
    by_step: Dict[int, List[Dict[str, Any]]] = {}
    for r in rows:
        step = r.get("step")
        if isinstance(step, int):
            by_step.setdefault(step, []).append(r)
    steps = _spread(sorted(by_step), max_steps)
    fixed = ("step", "prompt", "completion", "reward", "advantage", "ended")
    rewards: List[str] = []
    for r in rows:
        rewards += [k for k in r if k not in fixed and k not in rewards]
    cols = ["completion", *rewards, "reward", "advantage"]
    out = ["<h2>Rollout samples by step</h2>",
           f'<p class="note">The policy\'s own samples during training with their rewards (each component unweighted, '
           f'the weighted total) and advantages, {len(steps)} of {len(by_step)} logged step(s); '
           "log_completions keeps every row of a step.</p>"]
    for step in steps:
        items = by_step[step]
        mean = [x for x in (_number(r.get("reward")) for r in items) if x is not None]
        avg = f", mean reward {_fmt(sum(mean) / len(mean))}" if mean else ""
        head = "<th>prompt</th>" + "".join(f"<th>{escape(c)}</th>" for c in cols)
        body, last_prompt = [], None
        for r in items[:max_rows]:
            prompt = str(r.get("prompt", ""))
            pcell = f"<td><pre>{escape(prompt)}</pre></td>" if prompt != last_prompt else '<td class="note">same</td>'
            last_prompt = prompt
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append(f"<td><pre>{escape(str(v))}</pre></td>" if c == "completion" else
                             f"<td>{_fmt(v) if v is not None else '-'}</td>")
            body.append(f"<tr>{pcell}{''.join(cells)}</tr>")
        more = f'<p class="note">{len(items) - max_rows} more row(s) in completions.jsonl.</p>' \
            if len(items) > max_rows else ""
        opened = " open" if step == steps[-1] else ""
        out.append(f'<details class="rollout" data-step="{step}"{opened}><summary>step {step}: {len(items)} '
                   f'completion(s){avg}</summary><table class="samples"><tr>{head}</tr>{"".join(body)}</table>'
                   f"{more}</details>")
    return out


def write_report(run_dir: Path, *, out: Optional[Path] = None, max_prompts: int = 50) -> Path:
    """Write ``report.html`` (or ``out``) for the run in ``run_dir`` and return its path.

    Sections: the alert banner, summary table, a reward-versus-KL scatter per reward when a reward and
    ``kl/ref`` were logged together at two or more steps, one line plot per metric grouped by namespace
    (loss first; held-out curves overlaid on their training twins), the metrics logged once as numbers,
    the throughput and memory panel, sample completions (tags side by side, "before" left of "after"),
    online RL's rollout samples by step with their rewards (``completions.jsonl``), and the config in a
    collapsed block.
    """
    run = load_run(Path(run_dir))
    series = metric_series(run.metrics)
    title = f"alignkit report: {run.name}"
    body = [f"<h1>{escape(title)}</h1>"]
    if run.command:
        body.append(f'<p class="note">command: {escape(run.command)}</p>')
    body += [f'<p class="note">{escape(n)}</p>' for n in run.notes]
    body += _alerts_html(run)
    body += _summary_html(run, series)
    layout = _layout(series)

    # one panel per reward: a gold reward in [-1, 1] and a proxy around 4 on one axis flatten the gold one
    scatter = [(key, pts) for key in REWARD_KEYS if len(pts := _reward_kl_points(series, key)) >= 2]
    if scatter:
        body += ["<h2>Reward versus KL</h2>", '<div class="grid">']
        body += [_figure(f"reward_vs_kl:{key}", scatter_plot({key: pts}, f"{key} vs KL", "KL (nats/sequence)", key,
                                                             point_labels={key: _step_labels(series, key)}),
                         [key]) for key, pts in scatter]
        body.append("</div>")
    body.append("<h2>Metrics</h2>")
    if not series:
        body.append('<p class="note">metrics.jsonl has no numeric metrics.</p>')
    body.append('<div class="grid">')
    for ns, plots in layout.groups:
        body.append(f"<h3>{escape(ns or 'other')}</h3>")
        body += [_plot_figure(p) for p in plots]
    body.append("</div>")
    body += _single_html(layout.single, run.summary)
    body.append("<h2>Throughput and memory</h2>")
    if layout.perf:
        body += ['<div class="grid">'] + [_plot_figure(p) for p in layout.perf] + ["</div>"]
    else:
        body.append('<p class="note">No time/ or perf/ metrics were logged at two or more steps.</p>')
    body += _samples_html(run.samples, max_prompts)
    body += _completions_html(run.completions)
    if run.config_text is not None:
        body.append(f"<h2>Config</h2><details><summary>config.yaml</summary>"
                    f"<pre>{escape(run.config_text)}</pre></details>")
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.write_text(page(title, body), encoding="utf-8")
    return path


def _unique_labels(runs: List[RunData]) -> List[str]:
    labels, seen = [], {}
    for run in runs:
        label = run.label
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def _frontier(labels: List[str], all_series: List[Series]) -> Tuple[Series, str, Dict[str, list]]:
    """Per-run reward-vs-KL points: all eval points for an eval/ reward key, else the final point.

    Uses the first reward key that every plotted run has, so the y-axis means one thing. The third
    value holds each point's intervals ``(kl_lo, kl_hi, reward_lo, reward_hi)`` where the run logged
    them (``KEY_lo``/``KEY_hi`` at the same step), else None.
    """
    usable = [k for k in REWARD_KEYS if all(_reward_kl_points(s, k) for s in all_series)]
    if not usable:
        usable = [k for k in REWARD_KEYS if any(_reward_kl_points(s, k) for s in all_series)]
    if not usable:
        return {}, "", {}
    key = usable[0]
    points: Series = {}
    errors: Dict[str, list] = {}
    for label, s in zip(labels, all_series):
        pts = _reward_kl_points(s, key)
        if pts:
            points[label] = pts if key.startswith("eval/") else pts[-1:]
            errors[label] = _frontier_errors(s, key) if key.startswith("eval/") else []
    return points, key, errors


def _frontier_errors(series: Series, reward_key: str) -> list:
    """Intervals of the points of :func:`_reward_kl_points` (eval keys), in the same order."""
    kl_key = next((k for k in KL_KEYS if dict(series.get(k, ()))), KL_KEYS[0])
    kl = dict(series.get(kl_key, ()))
    ends = {k: dict(series.get(k, ())) for k in (f"{kl_key}_lo", f"{kl_key}_hi", f"{reward_key}_lo",
                                                   f"{reward_key}_hi")}
    out = []
    for step, _ in series.get(reward_key, ()):
        if step not in kl:
            continue
        e = [ends[k].get(step) for k in ends]
        out.append(tuple(e) if all(v is not None for v in e) else None)
    return out


def _summary_side_by_side(labels: List[str], runs: List[RunData]) -> List[str]:
    """One row per numeric summary.json key that at least two runs (or the only run) report; a key with
    an interval reads ``mean ± half-width``, its ``_se``/``_lo``/``_hi``/``_n``/``_p`` keys folded in."""
    counts: Dict[str, int] = {}
    for run in runs:
        for k, v in run.summary.items():
            if _number(v) is not None:
                counts[k] = counts.get(k, 0) + 1
    keys = [k for k, c in counts.items() if c >= min(2, len(runs)) and not is_interval_key(k, counts)]
    if not keys:
        return []
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    rows = "".join(f'<tr data-metric="{escape(k)}"><th>{escape(k)}</th>'
                   + "".join(f"<td>{_fmt_key(r.summary, k) if k in r.summary else ''}</td>" for r in runs)
                   + "</tr>" for k in keys)
    return ["<h2>Final numbers</h2>",
            '<p class="note">± : half-width of the 95% interval (t over prompt means; see docs/evaluation.md).</p>',
            f'<table class="final"><tr><th>summary.json</th>{head}</tr>{rows}</table>']


VERDICT_SOURCES = ("gold", "proxy")  # reward sources tested against the starting model, in this order
VERDICT_CLASS = {"better": "better", "worse": "worse", "not distinguishable": "same"}


def _verdicts_html(labels: List[str], runs: List[RunData], base: int) -> List[str]:
    """Every other run against the starting model (run ``base``): paired by prompt, per reward source,
    from the ``samples.jsonl`` rows of both (:func:`alignkit.eval.paired.versus`)."""
    base_samples = read_samples(runs[base].path)
    out = ["<h2>Against the starting model</h2>",
           f'<p class="note">Each run against <b>{escape(labels[base])}</b>, paired by prompt: the difference of the '
           "two models' mean reward on each prompt both evaluated, its mean with a 95% t interval over prompts "
           "and a two-sided t test. <i>better</i> / <i>worse</i>: the interval lies above / below 0; otherwise "
           "<i>not distinguishable</i>.</p>"]
    rows = []
    for i, (label, run) in enumerate(zip(labels, runs)):
        if i == base:
            continue
        samples = read_samples(run.path)
        for source in VERDICT_SOURCES:
            pc = versus(base_samples, samples, source)
            if pc is None:
                continue
            d = pc.diff
            ci = f"{d.lo:+.3g} to {d.hi:+.3g}" if math.isfinite(d.lo) else "n/a"
            p = f"{pc.p_value:.2g}" if math.isfinite(pc.p_value) else "n/a"
            rows.append(f'<tr class="verdict {VERDICT_CLASS[pc.verdict]}" data-run="{escape(label)}" '
                        f'data-source="{escape(source)}" data-verdict="{escape(pc.verdict)}">'
                        f"<td>{escape(label)}</td><td>rewards/{escape(source)}</td>"
                        f"<td>{format_pm(d.mean, d.half_width, sign=True)}</td><td>{ci}</td><td>{p}</td><td>{d.n}</td>"
                        f"<td><b>{escape(pc.verdict)}</b></td></tr>")
    if not rows:
        out.append('<p class="note">No per-prompt rewards to pair: the runs need <code>samples.jsonl</code> rows with '
                   "a prompt and its rewards on shared prompts (the output of <code>alignkit eval</code>).</p>")
        return out
    out.append('<table class="verdicts"><tr><th>run</th><th>reward</th><th>difference</th><th>95% interval</th>'
               "<th>p</th><th>prompts</th><th>verdict</th></tr>" + "".join(rows) + "</table>")
    return out


def compare_runs(run_dirs: List[Path], out: Path, baseline: Optional[Path] = None) -> Path:
    """Write an HTML comparing runs: overlaid curves and a reward-versus-KL frontier.

    Curves are drawn for every metric that at least two of the runs logged (all metrics for a
    single run), one colour per run (a bar per run where every run logged it once, e.g. evaluations,
    with its 95% interval as an error bar where the run logged ``KEY_lo``/``KEY_hi``), and a table of
    the final numbers (summary.json) side by side, ``mean ± half-width``. The frontier scatter (as in
    Figure 2 of the DPO paper) shows each run's eval points when the reward is an ``eval/`` key,
    otherwise its final point, with error bars in both directions; runs are labelled by name and, when
    ``config.yaml`` has one, ``command`` (the algorithm). Every run is tested against the starting
    model, ``baseline`` (default: the first run), paired by prompt: better / worse / not distinguishable.
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("compare_runs needs at least one run directory")
    base = 0
    if baseline is not None:
        paths = [Path(d).resolve() for d in run_dirs]
        if Path(baseline).resolve() in paths:
            base = paths.index(Path(baseline).resolve())
        else:
            runs.insert(0, load_run(Path(baseline)))
    labels = _unique_labels(runs)
    all_series = [metric_series(r.metrics) for r in runs]
    counts: Dict[str, int] = {}
    for s in all_series:
        for k in s:
            counts[k] = counts.get(k, 0) + 1
    shared = [k for k, c in counts.items() if c >= min(2, len(runs)) and not is_interval_key(k, counts)]
    title = "alignkit comparison: " + ", ".join(labels)
    body = [f"<h1>{escape(title)}</h1>", "<h2>Runs</h2><table><tr><th>run</th><th>directory</th>"
            "<th>alerts</th></tr>"]
    for label, run in zip(labels, runs):
        kinds = ", ".join(sorted({str(a.get("kind")) for a in run.alerts}))
        cell = f'<td class="alert"><b>{escape(kinds)}</b></td>' if kinds else "<td>none</td>"
        start = " (starting model)" if len(runs) > 1 and run is runs[base] else ""
        body.append(f"<tr><td>{escape(label)}{start}</td><td>{escape(str(run.path))}</td>{cell}</tr>")
    body.append("</table>")
    if len(runs) > 1:
        body += _verdicts_html(labels, runs, base)
    frontier, key, errors = _frontier(labels, all_series)
    body += compare_probes_html([r.path for r in runs], labels)  # behaviour probes before/after (eval --probe)
    if frontier:
        steps = {label: (_step_labels(s, key) if key.startswith("eval/") else _step_labels(s, key)[-1:])
                 for label, s in zip(labels, all_series) if label in frontier}
        body += ["<h2>Reward versus KL frontier</h2>", '<div class="grid">', _figure(
            "frontier", scatter_plot(frontier, f"{key} vs KL", "KL to reference (nats/sequence)",
                                     key, errors=errors, point_labels=steps)), "</div>"]
    body += _summary_side_by_side(labels, runs)
    body += config_diff_html(labels, runs)
    body.append("<h2>Shared metrics</h2>")
    if not shared:
        body.append('<p class="note">The runs share no metric.</p>')
    body.append('<div class="grid">')
    for ns, keys in _ordered_groups(shared):
        body.append(f"<h3>{escape(ns or 'other')}</h3>")
        for k in keys:
            curves = {label: s[k] for label, s in zip(labels, all_series) if k in s}
            if all(len(_finite_points(pts)) <= 1 for pts in curves.values()):  # one number per run: bars
                values = {label: (_finite_points(pts) or [(0.0, float("nan"))])[-1][1] for label, pts in curves.items()}
                bars = {label: (s[f"{k}_lo"][-1][1], s[f"{k}_hi"][-1][1]) for label, s in zip(labels, all_series)
                        if label in values and s.get(f"{k}_lo") and s.get(f"{k}_hi")}
                body.append(_figure(k, bar_plot(values, k, k.rsplit("/", 1)[-1], errors=bars)))
            else:
                body.append(_figure(k, line_plot(curves, k, "step", k.rsplit("/", 1)[-1])))
    body.append("</div>")
    body += samples_side_by_side_html(labels, runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(title, body), encoding="utf-8")
    return out


# ---------------------------------------------------------------- compare: config diff and samples

# fields that differ between any two runs without saying anything about the training
CONFIG_NOISE = ("output", "resume", "overwrite")


def config_diff(configs: Sequence[Optional[Dict[str, Any]]]) -> List[Tuple[str, List[Any]]]:
    """The dotted config fields whose values differ between the runs (a field one run lacks counts as
    different), sorted by name, each with its value per run (``MISSING`` where a run lacks it).
    Run-bookkeeping fields (:data:`CONFIG_NOISE`) are left out."""
    flat = [flatten_config(c) if isinstance(c, dict) else {} for c in configs]
    keys = sorted({k for f in flat for k in f})
    out = []
    for k in keys:
        if k in CONFIG_NOISE:
            continue
        values = [f.get(k, MISSING) for f in flat]
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
               for v in values[1:]):
            out.append((k, values))
    return out


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


MISSING = _Missing()


def _config_cell(v: Any) -> str:
    if v is MISSING:
        return '<td class="note">(not set)</td>'
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return f"<td><code>{escape(text)}</code></td>"


def config_diff_html(labels: List[str], runs: List[RunData]) -> List[str]:
    """compare.html's "Config differences": one row per config field whose value differs between runs."""
    if len(runs) < 2:
        return []
    have = [r.config is not None for r in runs]
    out = ["<h2>Config differences</h2>"]
    if not any(have):
        return out + ['<p class="note">No run has a config.yaml.</p>']
    missing = [label for label, h in zip(labels, have) if not h]
    if missing:
        out.append(f'<p class="note">No config.yaml in: {escape(", ".join(missing))}.</p>')
    diff = config_diff([r.config for r in runs])
    if not diff:
        return out + ['<p class="note">The runs have the same config (apart from output and resume).</p>']
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    rows = "".join(f"<tr><th>{escape(k)}</th>{''.join(_config_cell(v) for v in values)}</tr>" for k, values in diff)
    return out + [f'<table class="configdiff"><tr><th>field</th>{head}</tr>{rows}</table>']


NO_SAMPLE = '<span class="note">(no sample)</span>'

# the tag a run's final answers carry in samples.jsonl: training runs "after", evaluations "policy"
FINAL_TAGS = ("after", "policy", "sample")


def final_samples(run: RunData) -> Dict[str, List[Dict[str, Any]]]:
    """prompt -> the run's final samples for it (the first tag of :data:`FINAL_TAGS` it has, else its
    last tag), in file order."""
    tags = [str(s.get("tag", "sample")) for s in run.samples]
    if not tags:
        return {}
    tag = next((t for t in FINAL_TAGS if t in tags), tags[-1])
    out: Dict[str, List[Dict[str, Any]]] = {}
    for s, t in zip(run.samples, tags):
        if t == tag:
            out.setdefault(str(s.get("prompt", "")), []).append(s)
    return out


def samples_side_by_side_html(labels: List[str], runs: List[RunData], max_prompts: int = 20) -> List[str]:
    """compare.html's "Samples side by side": per prompt, each run's final answer(s) and reward in one row;
    prompts every run answered first (in the first run's order), then the others. Model text is escaped."""
    per_run = [final_samples(r) for r in runs]
    if len(runs) < 2 or sum(bool(p) for p in per_run) < 2:
        return []
    order: List[str] = []
    for p in per_run:
        order += [k for k in p if k not in order]
    order.sort(key=lambda k: -sum(k in p for p in per_run))  # stable: shared prompts first
    cells = [[p.get(prompt, []) for p in per_run] for prompt in order]
    return _samples_table("Samples side by side", labels, order, cells, max_prompts, NO_SAMPLE)
