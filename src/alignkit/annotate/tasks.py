"""Task files for ``alignkit annotate``: rows with a prompt and two or more responses.

Accepted rows (detected per row, like the training data):

- ``alignkit sample-pairs`` output ``{prompt, completions: [...]}`` (the file or its directory);
- ``{prompt, responses: [...]}`` (any order: the annotators rank them);
- ``{prompt, chosen, rejected}`` (two responses; which one was "chosen" is not shown);
- A/B mode: two ``alignkit eval`` directories, whose ``samples.jsonl`` policy samples are matched by
  prompt and sample number (:func:`ab_items`).

A prompt is a string or a list of chat messages. Rows that fit none of these, or with fewer than two
distinct responses, are counted by reason with their row number (``DataReport``), never dropped silently.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Dict, List, Tuple

from alignkit.data.load import DataError, DataReport, read_rows

MAX_RESPONSES = 9  # keys 1-9
_RNG = secrets.SystemRandom()


def _text(v: Any) -> Any:
    if isinstance(v, dict) and "content" in v:  # a message
        return v["content"]
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):  # a conversation: its last turn
        return v[-1].get("content")
    return v


def row_to_item(row: Dict[str, Any]) -> Dict[str, Any]:
    """One task row -> ``{prompt, responses, extra}``; raises ValueError with the reason."""
    if "prompt" not in row:
        raise ValueError("no prompt field")
    prompt = row["prompt"]
    if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
        raise ValueError("prompt is not a non-empty string or message list")
    for key in ("completions", "responses"):
        if key in row:
            responses = row[key]
            if not isinstance(responses, list):
                raise ValueError(f"{key} is not a list")
            break
    else:
        if "chosen" in row and "rejected" in row:
            responses, key = [row["chosen"], row["rejected"]], "chosen/rejected"
        else:
            raise ValueError("no responses: expected completions (sample-pairs), responses, or chosen/rejected")
    texts = [_text(r) for r in responses]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{key}: every response must be text")
    unique = list(dict.fromkeys(texts))
    if len(unique) < 2:
        raise ValueError("fewer than two distinct responses")
    if len(unique) > MAX_RESPONSES:
        raise ValueError(f"more than {MAX_RESPONSES} responses")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "completions", "responses", "chosen", "rejected",
                                                        "ended")}
    return {"prompt": prompt, "responses": unique, "extra": extra}


def read_task(path: str) -> Tuple[List[Dict[str, Any]], DataReport]:
    """Items of a task file (a sample-pairs directory means its samples.jsonl) and the report."""
    p = Path(path)
    if p.is_dir() and (p / "samples.jsonl").is_file():
        p = p / "samples.jsonl"
    name, rows = read_rows(str(p))
    report = DataReport(source=name, role="task")
    items = []
    for n, row in rows:
        report.rows_read += 1
        try:
            items.append(row_to_item(row))
        except ValueError as e:
            report.drop(n, str(e))
    report.examples = len(items)
    if not items:
        raise DataError(f"{name}: no rows with a prompt and two or more responses\n"
                        + "\n".join(report.summary_lines()))
    return items, report


def _policy_samples(run_dir: Path) -> Dict[Any, List[str]]:
    f = run_dir / "samples.jsonl"
    if not f.is_file():
        raise DataError(f"{run_dir}: no samples.jsonl (A/B mode takes two `alignkit eval` output directories)")
    out: Dict[Any, List[str]] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("tag", "policy") == "policy" and "completion" in row:
                key = json.dumps(row["prompt"], sort_keys=True)
                out.setdefault(key, []).append(row["completion"])
    return out


def ab_items(run_a: str, run_b: str) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Blind A/B items from two eval runs: sample j of a prompt in run A against sample j of the same
    prompt in run B. ``sources`` records which run each response came from (never shown). Identical
    answers are counted (``identical``, a tie) and not shown. Returns (items, counts)."""
    a, b = _policy_samples(Path(run_a)), _policy_samples(Path(run_b))
    items, identical, unmatched = [], 0, 0
    for key, texts_a in a.items():
        texts_b = b.get(key)
        if texts_b is None:
            unmatched += 1
            continue
        for j, (ta, tb) in enumerate(zip(texts_a, texts_b)):
            if ta == tb:
                identical += 1
                continue
            # stored in a random order too, so no response index means "run A" anywhere
            pair = [(ta, "A"), (tb, "B")]
            _RNG.shuffle(pair)
            items.append({"prompt": json.loads(key), "responses": [t for t, _ in pair],
                          "sources": [s for _, s in pair], "extra": {"sample": j}})
    if not items:
        raise DataError(f"A/B: {run_a} and {run_b} share no prompt with different answers "
                        f"({unmatched} prompts unmatched, {identical} identical answers)")
    return items, {"identical": identical, "unmatched_prompts": unmatched + sum(k not in a for k in b)}
