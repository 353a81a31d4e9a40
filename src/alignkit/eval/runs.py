"""``alignkit report RUN_DIR`` and ``alignkit compare RUN... --output compare.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field

from alignkit.config import Section, as_config
from alignkit.eval.paired import compare_eval_dirs


class ReportConfig(Section):
    """Regenerate a run's report.html from its files."""

    command: Literal["report"] = "report"
    run_dir: str
    """Run directory (it needs metrics.jsonl; config.yaml, alerts.jsonl, samples.jsonl and summary.json
    are used when present)."""
    output: Optional[str] = None
    """Where to write the HTML (default: RUN_DIR/report.html)."""


class CompareConfig(Section):
    """Put several runs side by side in one HTML file."""

    command: Literal["compare"] = "compare"
    runs: List[str] = Field(min_length=1)
    """Run directories (training runs and/or `alignkit eval` outputs)."""
    output: str = "compare.html"
    """Where to write the comparison: an .html file, or a directory (then DIR/compare.html)."""
    baseline: Optional[str] = None
    """The starting model's run (an `alignkit eval` output): every other run is tested against it,
    paired by prompt, and called better / worse / not distinguishable. Default: the first run."""


def report(config: Union[ReportConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Write RUN_DIR/report.html (or ``output``) and return its path."""
    # deferred: CLI start-up: the report module pulls the probes and rewards (~0.1 s), not needed by `--help`
    from alignkit.eval.report import write_report

    cfg = as_config(ReportConfig, config, overrides)
    path = write_report(Path(cfg.run_dir), out=Path(cfg.output) if cfg.output else None)
    print(f"report: {path}")
    return {"report": str(path)}


def compare(config: Union[CompareConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Write the comparison of ``runs`` to ``output`` and return its path."""
    # deferred: CLI start-up: the report module pulls the probes and rewards (~0.1 s), not needed by `--help`
    from alignkit.eval.report import compare_runs

    cfg = as_config(CompareConfig, config, overrides)
    out = Path(cfg.output)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "compare.html"
    path = compare_runs([Path(r) for r in cfg.runs], out, baseline=Path(cfg.baseline) if cfg.baseline else None)
    print(f"comparison: {path}")
    for line in verdict_lines([Path(r) for r in cfg.runs], Path(cfg.baseline) if cfg.baseline else None):
        print(line)
    return {"compare": str(path), "runs": len(cfg.runs)}


def verdict_lines(runs: List[Path], baseline: Optional[Path] = None) -> List[str]:
    """``RUN: rewards/gold +0.31 ± 0.13 (95% CI ...): better than the starting model`` for every run
    against ``baseline`` (default: the first run), paired by prompt, where both have per-prompt rewards."""
    # deferred: CLI start-up: the report module pulls the probes and rewards (~0.1 s), not needed by `--help`
    from alignkit.eval.report import VERDICT_SOURCES

    base = baseline or runs[0]
    out = []
    for run in runs:
        if Path(run).resolve() == Path(base).resolve():
            continue
        for source in VERDICT_SOURCES:
            pc = compare_eval_dirs(base, run, source)
            if pc is not None:
                out.append(f"{run}: rewards/{source} {pc.text(than=f'the starting model ({base})')}")
    return out
