"""Tiny dependency-free SVG charts for the HTML reports: line plots, scatter plots and bar charts.

Each function returns one ``<svg>`` element as a string (scalable through its ``viewBox``), with
axes, "nice" ticks, a title, axis labels and a legend when there is more than one series.
Non-finite points (nan, inf) are skipped; a single point is drawn as a dot (the reports show single
values as numbers or bars instead); a constant series gets a y-range padded around its value; an
empty plot says "no finite data". Tick labels are printed with just enough digits to be distinct, and
an integer axis (training steps) only gets integer ticks.
"""

from __future__ import annotations

import math
from html import escape
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PALETTE", "bar_plot", "line_plot", "scatter_plot"]

Points = List[Tuple[float, float]]

# Tableau 10: distinguishable, colour-blind friendlier than the rainbow
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

WIDTH, HEIGHT = 380, 250
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 42  # margins around the plotting area
MAX_LINE_POINTS = 1200  # longer series are decimated (keeping each bucket's min and max)
LEGEND_ROW = 15


def _finite(points: Sequence[Tuple[float, float]]) -> Points:
    out = []
    for x, y in points:
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(fx) and math.isfinite(fy):
            out.append((fx, fy))
    return out


def _nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> Tuple[float, float, List[float]]:
    """Round axis limits outward to multiples of a 1/2/5·10^k step (at least 1 when ``integer``);
    returns (lo, hi, ticks)."""
    if hi < lo:
        lo, hi = hi, lo
    if not math.isfinite(hi - lo):  # a range beyond float: no rounding possible
        return lo, hi, [lo, hi]
    if hi == lo:  # constant data: pad so the line sits in the middle
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    start, stop = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [start + i * step for i in range(int(round((stop - start) / step)) + 1)]
    return start, stop, ticks


def _fmt(v: float, digits: int = 4) -> str:
    if abs(v) < 1e-12 * (1 + abs(v)):  # a tick at zero computed as 1e-17
        return "0"
    return f"{v:.{digits}g}"


def tick_labels(ticks: Sequence[float]) -> List[str]:
    """Labels for ``ticks`` with the fewest significant digits (at least 4) that keep them distinct:
    ticks 1000.1, 1000.2 print as "1000.1", "1000.2", not "1000", "1000"."""
    for digits in range(4, 17):
        labels = [_fmt(v, digits) for v in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels

def _decimate(pts: Points, limit: int = MAX_LINE_POINTS) -> Points:
    """Keep first/last and each bucket's min and max so spikes survive downsampling."""
    if len(pts) <= limit:
        return pts
    buckets = limit // 2
    size = len(pts) / buckets
    out: Points = []
    for b in range(buckets):
        chunk = pts[int(b * size):int((b + 1) * size)]
        if not chunk:
            continue
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out.extend(sorted({lo, hi}, key=lambda p: p[0]))
    return [pts[0]] + out + [pts[-1]]


class _Frame:
    """Maps data coordinates to pixels and draws the axes, ticks and labels."""

    def __init__(self, series: Dict[str, Points], title: str, xlabel: str, ylabel: str, extent: Points = ()):
        # ``extent``: more points the axes must hold (the ends of error bars), not drawn as a series
        allpts = [p for pts in series.values() for p in pts] + list(extent)
        integer_x = bool(allpts) and all(float(p[0]).is_integer() for p in allpts)
        self.labels = list(series)
        self.legend_rows = self._legend_layout() if len(series) > 1 else []
        self.height = HEIGHT + (LEGEND_ROW * len(self.legend_rows) + 4 if self.legend_rows else 0)
        self.plot_bottom = HEIGHT - BOTTOM
        if allpts:
            self.x0, self.x1, self.xticks = _nice_ticks(min(p[0] for p in allpts), max(p[0] for p in allpts),
                                                        integer=integer_x)
            self.y0, self.y1, self.yticks = _nice_ticks(min(p[1] for p in allpts), max(p[1] for p in allpts))
        else:
            self.x0, self.x1, self.xticks = 0.0, 1.0, []
            self.y0, self.y1, self.yticks = 0.0, 1.0, []
        self.title, self.xlabel, self.ylabel, self.empty = title, xlabel, ylabel, not allpts

    def _legend_layout(self) -> List[List[Tuple[int, str]]]:
        rows: List[List[Tuple[int, str]]] = [[]]
        used = LEFT
        for i, label in enumerate(self.labels):
            w = 22 + 7 * min(len(label), 40)
            if rows[-1] and used + w > WIDTH - RIGHT:
                rows.append([])
                used = LEFT
            rows[-1].append((i, label))
            used += w
        return rows

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return self.plot_bottom - (y - self.y0) / (self.y1 - self.y0) * (self.plot_bottom - TOP)

    def open(self) -> List[str]:
        t = escape(self.title)
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {self.height}" '
            f'width="100%" role="img" aria-label="{t}" font-family="sans-serif" font-size="11">',
            f"<title>{t}</title>",
            f'<rect x="0" y="0" width="{WIDTH}" height="{self.height}" fill="white"/>',
            f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{t}</text>',
        ]
        bottom, right = self.plot_bottom, WIDTH - RIGHT
        for v, label in zip(self.yticks, tick_labels(self.yticks)):
            y = self.py(v)
            parts.append(f'<line x1="{LEFT}" y1="{y:.2f}" x2="{right}" y2="{y:.2f}" stroke="#eee"/>')
            parts.append(f'<text class="ytick" x="{LEFT - 5}" y="{y + 4:.2f}" text-anchor="end">{label}</text>')
        for v, label in zip(self.xticks, tick_labels(self.xticks)):
            x = self.px(v)
            parts.append(f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 4}" stroke="#333"/>')
            parts.append(f'<text class="xtick" x="{x:.2f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
        parts.append(f'<polyline points="{LEFT},{TOP} {LEFT},{bottom} {right},{bottom}" '
                     f'fill="none" stroke="#333"/>')
        parts.append(f'<text x="{(LEFT + right) / 2}" y="{bottom + 32}" text-anchor="middle">'
                     f"{escape(self.xlabel)}</text>")
        cy = (TOP + bottom) / 2
        parts.append(f'<text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">'
                     f"{escape(self.ylabel)}</text>")
        if self.empty:
            parts.append(f'<text x="{(LEFT + right) / 2}" y="{cy}" text-anchor="middle" '
                         f'fill="#999">no finite data</text>')
        return parts

    def close(self) -> List[str]:
        parts = []
        for r, row in enumerate(self.legend_rows):
            y = HEIGHT + 8 + r * LEGEND_ROW  # below the x-axis label
            x = float(LEFT)
            for i, label in row:
                colour = PALETTE[i % len(PALETTE)]
                short = label if len(label) <= 40 else label[:39] + "…"
                parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="14" height="9" fill="{colour}"/>')
                parts.append(f'<text x="{x + 18:.1f}" y="{y}">{escape(short)}</text>')
                x += 22 + 7 * len(short)
        parts.append("</svg>")
        return parts


def line_plot(series: Dict[str, List[Tuple[float, float]]], title: str,
              xlabel: str = "step", ylabel: str = "") -> str:
    """Line chart of one or more ``{label: [(x, y), ...]}`` series, as an SVG string.

    Points are sorted by x; nan/inf points are skipped; a series with one finite point is drawn
    as a dot. Very long series are decimated for drawing, keeping every bucket's extremes.
    """
    clean = {label: sorted(_finite(pts)) for label, pts in series.items()}
    frame = _Frame(clean, title, xlabel, ylabel)
    parts = frame.open()
    for i, (label, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle class="pt" cx="{frame.px(x):.2f}" cy="{frame.py(y):.2f}" r="3" fill="{colour}">'
                         f"<title>{escape(label)}: ({_fmt(x)}, {_fmt(y)})</title></circle>")
        elif pts:
            coords = " ".join(f"{frame.px(x):.2f},{frame.py(y):.2f}" for x, y in _decimate(pts))
            parts.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.6"><title>{escape(label)}</title></polyline>')
    return "\n".join(parts + frame.close())


MAX_POINT_LABELS = 12  # printed point labels per group; every point keeps its label in the tooltip


def labelled_indices(n: int, limit: int = MAX_POINT_LABELS) -> List[int]:
    """Which of ``n`` points get a printed label: all up to ``limit``, else ``limit`` evenly spread ones
    that always include the first and the last."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def scatter_plot(points: Dict[str, List[Tuple[float, float]]], title: str,
                 xlabel: str = "", ylabel: str = "",
                 errors: Optional[Dict[str, List[Optional[Tuple[float, float, float, float]]]]] = None,
                 point_labels: Optional[Dict[str, List[str]]] = None) -> str:
    """Scatter chart of ``{label: [(x, y), ...]}`` groups, one colour per group, as an SVG string.

    nan/inf points are skipped. Each dot carries a hover tooltip with its label and coordinates.
    ``errors`` gives, per label and point (same order as ``points``), its intervals ``(x_lo, x_hi,
    y_lo, y_hi)`` or None: drawn as horizontal and vertical error bars through the dot.
    ``point_labels`` (``{label: [text per point]}``, e.g. the step of each point) are added to the tooltips
    and printed beside the dots (up to :data:`MAX_POINT_LABELS` per group, first and last included).
    """
    bars: Dict[str, List[Tuple[float, float, float, float]]] = {}
    for label, pts in points.items():
        for j, e in enumerate((errors or {}).get(label, [])[:len(pts)]):
            if e is not None and all(math.isfinite(float(v)) for v in e) and math.isfinite(float(pts[j][1])):
                bars.setdefault(label, []).append((float(pts[j][0]), float(pts[j][1]), *map(float, e)))
    clean: Dict[str, Points] = {}
    texts: Dict[str, List[str]] = {}
    for label, pts in points.items():
        given = (point_labels or {}).get(label)
        keep = [i for i, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y)]
        clean[label] = [(float(pts[i][0]), float(pts[i][1])) for i in keep]
        texts[label] = [str(given[i]) for i in keep] if given is not None and len(given) == len(pts) else []
    # the axes hold the error bars too
    frame = _Frame(clean, title, xlabel, ylabel,
                   [(b[2], b[4]) for bs in bars.values() for b in bs] + [(b[3], b[5]) for bs in bars.values() for b in bs])
    parts = frame.open()
    for i, label in enumerate(clean):
        colour = PALETTE[i % len(PALETTE)]
        for x, y, x_lo, x_hi, y_lo, y_hi in bars.get(label, []):
            px, py = frame.px(x), frame.py(y)
            parts.append(_error_bar(px, frame.py(y_lo), frame.py(y_hi), colour))
            parts.append(f'<path class="errbar-x" d="M{frame.px(x_lo):.2f},{py - 4:.2f}V{py + 4:.2f}'
                         f'M{frame.px(x_lo):.2f},{py:.2f}H{frame.px(x_hi):.2f}M{frame.px(x_hi):.2f},{py - 4:.2f}'
                         f'V{py + 4:.2f}" stroke="{colour}" stroke-width="1.3" fill="none"/>')
    for i, (label, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        names = texts[label]
        shown = set(labelled_indices(len(pts))) if names else set()
        for j, (x, y) in enumerate(pts):
            tip = f"{escape(label)}" + (f" {escape(names[j])}" if names else "")
            parts.append(f'<circle class="pt" cx="{frame.px(x):.2f}" cy="{frame.py(y):.2f}" r="3.5" '
                         f'fill="{colour}" fill-opacity="0.8"><title>{tip}: '
                         f"({_fmt(x)}, {_fmt(y)})</title></circle>")
            if j in shown:
                parts.append(f'<text class="ptlabel" x="{frame.px(x) + 5:.2f}" y="{frame.py(y) - 5:.2f}" '
                             f'font-size="9" fill="{colour}">{escape(names[j])}</text>')
    return "\n".join(parts + frame.close())


def _error_bar(x: float, y_lo: float, y_hi: float, colour: str = "#222", cap: float = 5.0) -> str:
    """A vertical error bar (pixels) with caps: one path, class ``errbar`` for tests and styling."""
    return (f'<path class="errbar" d="M{x - cap:.2f},{y_hi:.2f}H{x + cap:.2f}M{x:.2f},{y_hi:.2f}V{y_lo:.2f}'
            f'M{x - cap:.2f},{y_lo:.2f}H{x + cap:.2f}" stroke="{colour}" stroke-width="1.3" fill="none"/>')


def _interval(errors: Optional[Dict[str, Tuple[float, float]]], label: str) -> Optional[Tuple[float, float]]:
    lo_hi = (errors or {}).get(label)
    if lo_hi is None:
        return None
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def bar_plot(values: Dict[str, float], title: str, ylabel: str = "",
             errors: Optional[Dict[str, Tuple[float, float]]] = None) -> str:
    """Bar chart of one value per label (e.g. one final number per run), as an SVG string.

    The value axis always includes 0, so bar lengths compare; each bar carries its value above (or
    below, when negative) and a hover tooltip. A non-finite value is drawn as a grey "n/a" slot.
    ``errors`` maps a label to its interval ``(lo, hi)``: drawn as an error bar over the bar, the
    printed value becoming ``value ± half-width``.
    """
    labels = list(values)
    finite = [float(v) for v in values.values() if v is not None and math.isfinite(float(v))]
    finite += [e for label in labels if (iv := _interval(errors, label)) for e in iv]
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    room = 0.12 * (hi - lo)  # headroom for the value printed beyond each bar's end
    frame = _Frame({"": [(0.0, lo - room if lo < 0 else lo), (1.0, hi + room if hi > 0 else hi)]} if finite else {},
                   title, "", ylabel)
    frame.xticks = []
    frame.legend_rows = []
    parts = frame.open()
    n = max(len(labels), 1)
    slot = (WIDTH - LEFT - RIGHT) / n
    width = min(48.0, slot * 0.7)
    zero = frame.py(0.0) if finite else frame.plot_bottom
    for i, label in enumerate(labels):
        v = values[label]
        cx = LEFT + slot * (i + 0.5)
        short = label if len(label) <= 18 else label[:17] + "…"
        parts.append(f'<text class="barlabel" x="{cx:.2f}" y="{frame.plot_bottom + 14}" text-anchor="middle">'
                     f"{escape(short)}</text>")
        if v is None or not math.isfinite(float(v)):
            parts.append(f'<text x="{cx:.2f}" y="{zero - 4:.2f}" text-anchor="middle" fill="#999">n/a</text>')
            continue
        y = frame.py(float(v))
        top, h = min(y, zero), abs(zero - y)
        colour = PALETTE[i % len(PALETTE)]
        iv = _interval(errors, label)
        text = _fmt(float(v)) if iv is None else f"{_fmt(float(v))} ± {_fmt((iv[1] - iv[0]) / 2, 2)}"
        parts.append(f'<rect class="bar" x="{cx - width / 2:.2f}" y="{top:.2f}" width="{width:.2f}" '
                     f'height="{max(h, 0.5):.2f}" fill="{colour}"><title>{escape(label)}: {text}'
                     + (f" (95% interval {_fmt(iv[0])} to {_fmt(iv[1])})" if iv else "") + "</title></rect>")
        if iv is not None:
            y_lo, y_hi = frame.py(iv[0]), frame.py(iv[1])
            parts.append(_error_bar(cx, y_lo, y_hi))
            top, h = min(top, y_hi), max(top + h, y_lo) - min(top, y_hi)  # the label clears the bar too
        ty = top - 4 if float(v) >= 0 else top + h + 12
        parts.append(f'<text x="{cx:.2f}" y="{ty:.2f}" text-anchor="middle">{text}</text>')
    return "\n".join(parts + frame.close())
