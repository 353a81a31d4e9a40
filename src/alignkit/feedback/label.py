"""``alignkit judge``: label response pairs with an LLM judge; soft labels for ``alignkit rm``/``dpo``.

Input rows (shapes may mix in one file):

- ``{prompt, response_a, response_b}``: unlabelled pairs;
- ``{prompt, chosen, rejected}`` (any preference shape of the data layer: messages, HH transcripts):
  re-judged, and the agreement with the given labels is reported;
- ``{prompt, responses: [...]}``: every pair of responses is judged (the list order is not used).

Optional row fields: ``principle`` (fills ``{principle}``) and ``judge.reference_field`` (fills
``{reference}``). Output ``OUTPUT/preferences.jsonl`` rows ``{prompt, chosen, rejected, soft_label,
judge: {p_ab, p_ba, prob_a, consistent, status}, source_row, ...other row fields}`` with ``soft_label``
the judge's probability (>= 0.5) that chosen is better; ``OUTPUT/summary.json`` holds the counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Tuple, Union

from alignkit.config import Section, as_config
from alignkit.data.formats import RowError, _prompt, _text, parse_preference
from alignkit.data.load import DataError, DataReport, write_jsonl
from alignkit.feedback.common import InputConfig, print_report, read_input, write_summary
from alignkit.feedback.judge import (JudgeOptions, JudgeQuery, decide, judge_both_orders, load_judge,
                                     summarize)

PAIR_FIELDS = ("prompt", "response_a", "response_b", "chosen", "rejected", "responses", "soft_label")


class JudgeConfig(Section):
    """Label response pairs with an LLM judge (both orders, soft labels)."""

    command: Literal["judge"] = "judge"
    """The command this config is for (set automatically)."""
    output: str = "runs/judge"
    """Output directory: preferences.jsonl (the preference shape with soft_label) and summary.json."""
    data: InputConfig = InputConfig()
    """Pairs to judge: {prompt, response_a, response_b}, {prompt, chosen, rejected} or {prompt, responses}."""
    judge: JudgeOptions = JudgeOptions()
    """The judge model, its template and how verdicts become labels."""


def parse_pairs(rows, report: DataReport, reference_field: str) -> List[Dict[str, Any]]:
    """Rows -> pairs ``{row, prompt, a, b, given (a was labelled chosen), principle, reference, extra}``."""
    pairs: List[Dict[str, Any]] = []
    for n, row in rows:
        report.rows_read += 1
        extra = {k: v for k, v in row.items() if k not in PAIR_FIELDS}
        common = {"row": n, "principle": row.get("principle"), "reference": row.get(reference_field),
                  "extra": extra}
        try:
            if common["principle"] is not None and not isinstance(common["principle"], str):
                raise RowError("principle is not a string", "principle")
            if common["reference"] is not None and not isinstance(common["reference"], str):
                common["reference"] = str(common["reference"])
            if "response_a" in row or "response_b" in row:
                if "prompt" not in row:
                    raise RowError("a {response_a, response_b} pair needs a prompt", "prompt")
                a, b = _text(row.get("response_a"), "response_a"), _text(row.get("response_b"), "response_b")
                if a == b:
                    raise RowError("response_a equals response_b", "response_b")
                pairs.append(dict(common, prompt=_prompt(row["prompt"]), a=a, b=b, given=None))
            elif "responses" in row:
                found = parse_preference(row, n)  # every distinct pair of the list
                pairs.extend(dict(common, prompt=ex.prompt, a=ex.chosen, b=ex.rejected, given=None)
                             for ex in found)
            elif "chosen" in row and "rejected" in row:
                ex = parse_preference(row, n)[0]
                pairs.append(dict(common, prompt=ex.prompt, a=ex.chosen, b=ex.rejected, given=True))
            else:
                raise RowError("fits no pair shape: expected {prompt, response_a, response_b}, "
                               "{prompt, chosen, rejected} or {prompt, responses}")
        except RowError as e:
            report.drop(n, e.reason, e.field)
    report.examples = len(pairs)
    return pairs


def label_pairs(judge, pairs: List[Dict[str, Any]], opts: JudgeOptions) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Judge ``pairs`` in both orders; return the kept preference rows and the summary counts."""
    queries = [JudgeQuery(p["prompt"], p["a"], p["b"], p.get("principle"), p.get("reference")) for p in pairs]
    verdicts = judge_both_orders(judge, queries)
    decisions = [decide(v, opts.inconsistent, opts.min_confidence, opts.max_label) for v in verdicts]
    rows, agree = [], []
    for p, v, d in zip(pairs, verdicts, decisions):
        if p.get("given") is not None and v.valid:
            agree.append(1.0 if v.prob_a > 0.5 else 0.5 if v.prob_a == 0.5 else 0.0)
        if not d.keep:
            continue
        chosen, rejected = (p["a"], p["b"]) if d.a_chosen else (p["b"], p["a"])
        row = {"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "soft_label": round(d.soft_label, 6),
               "judge": {"p_ab": v.p_ab, "p_ba": v.p_ba, "prob_a": v.prob_a, "consistent": v.consistent,
                         "status": d.status}, "source_row": p["row"]}
        row.update({k: val for k, val in p.get("extra", {}).items() if k not in row})
        rows.append(row)
    summary = summarize(verdicts, decisions)
    if agree:
        summary["agreement_with_given_labels"] = sum(agree) / len(agree)
    return rows, summary


def run_judge(config: Union[JudgeConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Judge every pair of ``data.path``; write OUTPUT/preferences.jsonl and OUTPUT/summary.json."""
    cfg = as_config(JudgeConfig, config, overrides)
    name, rows = read_input(cfg.data, "pairs to judge")
    report = DataReport(source=name)
    pairs = parse_pairs(rows, report, cfg.judge.reference_field)
    print_report(report)
    if not pairs:
        raise DataError(f"{name}: no pairs to judge out of {report.rows_read} rows\n"
                        + "\n".join(report.summary_lines()))
    judge = load_judge(cfg.judge)
    out_rows, summary = label_pairs(judge, pairs, cfg.judge)
    out = Path(cfg.output)
    write_jsonl(out / "preferences.jsonl", out_rows)
    summary = {"command": "judge", **summary, "rows_read": report.rows_read, "rows_dropped": report.n_dropped,
               "output": str(out / "preferences.jsonl")}
    write_summary(out, summary)
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return summary


__all__ = ["JudgeConfig", "parse_pairs", "label_pairs", "run_judge"]
