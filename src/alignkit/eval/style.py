"""The look of alignkit's static HTML pages (run report, comparison, probe report, annotation export):
one style sheet and one page shell, here in a module that imports nothing of ours, so that every page
writer shares them without importing another's module."""

from __future__ import annotations

from html import escape
from typing import List

__all__ = ["CSS", "page"]

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f5f5f5}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
figure{margin:0;border:1px solid #eee;padding:4px}.grid h3{grid-column:1/-1;margin:8px 0 0}
.alert{background:#fdecec;border-left:5px solid #c92a2a;padding:8px 12px;margin:6px 0}
.alert b{color:#c92a2a}.note{color:#666;font-size:13px}
.banner{padding:10px 14px;margin:12px 0;font-size:15px;border-radius:3px}
.banner.bad{background:#c92a2a;color:#fff}.banner.none{background:#f1f3f5;color:#333}
table.single td:nth-child(2){text-align:right;font-variant-numeric:tabular-nums}
.cols{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px}
.samples td{width:45%}
.verdicts tr.better td:last-child{color:#2b8a3e}.verdicts tr.worse td:last-child{color:#c92a2a}
.verdicts tr.same td:last-child{color:#555}.iv{white-space:nowrap}
"""


def page(title: str, body: List[str]) -> str:
    """A whole HTML document: ``title`` (escaped) and the ``body`` fragments, one per line, under :data:`CSS`."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
