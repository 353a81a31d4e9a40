"""Bring rankings made in Label Studio or Argilla into the annotation store.

Each record becomes an item (same content id as a task row, so importing twice adds nothing) and each
annotator's ranking an answer of annotator ``labelstudio:<who>`` / ``argilla:<who>``; then
``alignkit annotate export`` aggregates them with any answers given in alignkit.

Label Studio (JSON export, a list of tasks): ``{"data": {"prompt"|"text"|"question": ..., "items": [{"id",
"body"|"text"|"title"}, ...]}, "annotations": [{"completed_by", "lead_time", "result": [{"type": "ranker",
"value": {"ranker": {"<bucket>": [item ids, best first]}}}]}]}`` (the Ranker tag; with several buckets
they are read in their order, each bucket below the previous), and pairwise tasks ``{"data": {"prompt",
"left", "right"}, ... "result": [{"type": "pairwise", "value": {"selected": "left"|"right"}}]}``.

Argilla (records as JSON or JSONL, v1 FeedbackDataset or v2): ``{"fields": {"prompt": ..., "<name>":
response text, ...}, "responses": ...}`` with a ranking question whose value is a list of
``{"value": name, "rank": r}`` (ties share r) or a list of names best first. v1 puts responses as
``[{"user_id", "status", "values": {"<question>": {"value": [...]}}}]``, v2 as
``{"<question>": [{"user_id", "value": [...]}]}``; only submitted responses are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from alignkit.data.load import DataError

PROMPT_KEYS = ("prompt", "text", "question", "instruction", "input")


def _prompt(d: Dict[str, Any]) -> Any:
    for k in PROMPT_KEYS:
        if d.get(k):
            return d[k]
    raise ValueError(f"no prompt field (looked for {', '.join(PROMPT_KEYS)})")


def _ranks_from_ordered(groups: List[List[int]], k: int) -> Optional[List[int]]:
    """Ranks per response from ordered tie groups of response indices; None if not every response is
    placed exactly once."""
    seen = [i for g in groups for i in g]
    if sorted(seen) != list(range(k)):
        return None
    ranks, place = [0] * k, 1
    for g in groups:
        for i in g:
            ranks[i] = place
        place += len(g)
    return ranks


def label_studio(tasks: List[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], List[Tuple[str, List[int], float]]]]:
    """(item, [(annotator, ranks, seconds)]) per task of a Label Studio JSON export."""
    out = []
    for t in tasks:
        data = t.get("data") or {}
        prompt = _prompt(data)
        if "items" in data:
            ids = [str(x.get("id")) for x in data["items"]]
            texts = [str(x.get("body") or x.get("text") or x.get("title") or "") for x in data["items"]]
        elif "left" in data and "right" in data:
            ids, texts = ["left", "right"], [str(data["left"]), str(data["right"])]
        else:
            raise ValueError("a ranking task needs data.items (Ranker) or data.left/data.right (Pairwise)")
        answers = []
        for ann in t.get("annotations") or []:
            if ann.get("was_cancelled"):
                continue
            who = ann.get("completed_by")
            who = who.get("email") or who.get("id") if isinstance(who, dict) else who
            for res in ann.get("result") or []:
                v = res.get("value") or {}
                if res.get("type") == "ranker" and isinstance(v.get("ranker"), dict):
                    groups = [[ids.index(str(i))] for bucket in v["ranker"].values() for i in bucket if str(i) in ids]
                    ranks = _ranks_from_ordered(groups, len(ids))
                elif res.get("type") == "pairwise" and v.get("selected") in ("left", "right"):
                    ranks = [1, 2] if v["selected"] == "left" else [2, 1]
                else:
                    continue
                if ranks is not None:
                    answers.append((f"labelstudio:{who}", ranks, float(ann.get("lead_time") or 0) or None))
        out.append(({"prompt": prompt, "responses": texts}, answers))
    return out


def _argilla_value(value: Any, names: List[str]) -> Optional[List[int]]:
    if not isinstance(value, list) or not value:
        return None
    if isinstance(value[0], dict):  # [{"value": name, "rank": r}], ties share r
        by_rank: Dict[int, List[int]] = {}
        for v in value:
            if v.get("value") in names:
                by_rank.setdefault(int(v.get("rank") or 0), []).append(names.index(v["value"]))
        groups = [by_rank[r] for r in sorted(by_rank)]
    else:
        groups = [[names.index(v)] for v in value if v in names]
    return _ranks_from_ordered(groups, len(names))


def argilla(records: List[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], List[Tuple[str, List[int], float]]]]:
    """(item, [(annotator, ranks, seconds)]) per Argilla record with a ranking question."""
    out = []
    for rec in records:
        fields = rec.get("fields") or {}
        prompt = _prompt(fields)
        raw: List[Tuple[str, Any]] = []
        resp = rec.get("responses") or []
        if isinstance(resp, dict):  # v2: {question: [{"user_id", "value"}]}
            for entries in resp.values():
                for e in entries or []:
                    if e.get("status", "submitted") == "submitted":
                        raw.append((str(e.get("user_id")), e.get("value")))
        else:  # v1: [{"user_id", "status", "values": {question: {"value"}}}]
            for e in resp:
                if e.get("status", "submitted") == "submitted":
                    for q in (e.get("values") or {}).values():
                        raw.append((str(e.get("user_id")), (q or {}).get("value")))
        names: List[str] = []
        for _, v in raw:
            if isinstance(v, list):
                for x in v:
                    n = x.get("value") if isinstance(x, dict) else x
                    if isinstance(n, str) and n not in names:
                        names.append(n)
        if len(names) < 2:
            continue  # not a ranking record (or nobody answered)
        texts = [str(fields.get(n, n)) for n in names]
        answers = [(f"argilla:{u}", r, None) for u, v in raw if (r := _argilla_value(v, names)) is not None]
        out.append(({"prompt": prompt, "responses": texts}, answers))
    return out


def read_export(path: str) -> Tuple[str, List]:
    """Detect the format ("label_studio" or "argilla") of an export file and parse it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        records = doc if isinstance(doc, list) else doc.get("records") or [doc]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise DataError(f"{path}: no records")
    first = records[0]
    try:
        if "annotations" in first or "data" in first:
            return "label_studio", label_studio(records)
        if "fields" in first:
            return "argilla", argilla(records)
    except (ValueError, AttributeError, TypeError) as e:
        raise DataError(f"{path}: {e}") from None
    raise DataError(f"{path}: neither a Label Studio export (data/annotations) nor Argilla records (fields)")


def import_labels(store, path: str) -> Dict[str, Any]:
    """Add the export's items and answers to ``store``; returns counts."""
    # deferred: sqlalchemy/starlette load only when the annotation store or server runs
    from alignkit.annotate.store import item_id

    fmt, parsed = read_export(path)
    items = [it for it, _ in parsed]
    added = store.add_items(items)
    stored = present = 0
    for it, answers in parsed:
        iid = item_id(it["prompt"], it["responses"])
        stored_item = store.items(iid)[0]
        remap = [stored_item["responses"].index(t) for t in it["responses"]]  # first import's order wins
        for who, ranks, secs in answers:
            r = [0] * len(ranks)
            for i, rank in enumerate(ranks):
                r[remap[i]] = rank
            ok = store.import_answer(who, iid, r, order=list(range(len(r))), seconds=secs)
            stored += ok
            present += not ok
    return {"format": fmt, "records": len(parsed), "items_added": added["added"], "answers_imported": stored,
            "answers_present": present}
