"""``alignkit score``: a reward model's score for each row (each response of a pair or ranking)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Union

from alignkit.config import ScoreConfig, as_config
from alignkit.data.formats import RowError, parse_preference, parse_sft
from alignkit.data.load import DataError, DataReport, read_rows


def score(config: Union[ScoreConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Score every row of ``data.path`` with ``reward_model``; write JSONL rows with their scores.

    Pairs get ``score_chosen``/``score_rejected``, rankings ``scores`` (one per response),
    {prompt, completion}/{messages}/{text} rows a single ``score``.
    """
    # deferred: torch stays out of this module's import
    from alignkit.models.reward import load_reward_scorer

    cfg = as_config(ScoreConfig, config, overrides)
    if not cfg.data.path:
        raise DataError("no data to score: pass --data FILE")
    scorer = load_reward_scorer(cfg.reward_model, batch_size=cfg.batch_size, dtype=cfg.dtype,
                                chat_template=cfg.data.chat_template, max_length=cfg.data.max_length)
    name, rows = read_rows(cfg.data.path, split=cfg.data.split, max_rows=cfg.data.max_rows)
    report = DataReport(source=name)
    jobs = []  # (row index in out, key, prompt, completion)
    out_rows = []
    for n, row in rows:
        report.rows_read += 1
        try:
            if "responses" in row and "prompt" in row:
                pairs = parse_preference(row, n)
                texts = [r if isinstance(r, str) else r.get("content") for r in row["responses"]]
                for i, t in enumerate(texts):
                    jobs.append((len(out_rows), ("scores", i), pairs[0].prompt, t))
            elif "chosen" in row and "rejected" in row:
                ex = parse_preference(row, n)[0]
                jobs.append((len(out_rows), "score_chosen", ex.prompt, ex.chosen))
                jobs.append((len(out_rows), "score_rejected", ex.prompt, ex.rejected))
            else:
                ex = parse_sft(row, n)[0]
                if ex.messages is not None:
                    msgs = ex.messages
                    jobs.append((len(out_rows), "score", msgs[:-1], msgs[-1]["content"]))
                else:
                    jobs.append((len(out_rows), "score", ex.prompt, ex.completion))
        except RowError as e:
            report.drop(n, e.reason, e.field)
            continue
        out_rows.append(dict(row, _row=n))
    if not out_rows:
        raise DataError(f"{name}: no rows to score\n" + "\n".join(report.summary_lines()))
    scores = scorer([j[2] for j in jobs], [j[3] for j in jobs])
    for (i, key, _, _), s in zip(jobs, scores):
        if isinstance(key, tuple):
            out_rows[i].setdefault("scores", [None] * len(out_rows[i]["responses"]))[key[1]] = s
        else:
            out_rows[i][key] = s
    report.examples = len(out_rows)
    pairs = [(r["score_chosen"], r["score_rejected"]) for r in out_rows if "score_chosen" in r]
    summary: Dict[str, Any] = {"rows_scored": len(out_rows), "rows_dropped": report.n_dropped}
    if pairs:
        summary["pairwise_accuracy"] = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs) / len(pairs)
        summary["mean_margin"] = sum(c - r for c, r in pairs) / len(pairs)
    lines = "".join(json.dumps(r) + "\n" for r in out_rows)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(lines)
        summary["output"] = cfg.output
    else:
        sys.stdout.write(lines)
    for line in report.summary_lines()[1:]:
        print(line, file=sys.stderr)
    return summary
