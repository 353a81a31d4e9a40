"""``alignkit annotate export``: training data, an agreement report and (A/B mode) the human win rate.

Writes to OUTPUT/:

- ``rankings.jsonl``: ``{prompt, responses: [best, ..., worst], item_id, annotators, scores}`` for every
  item whose aggregated order (``aggregate``: Borda or pairwise majority) is strict; the rankings shape
  ``alignkit rm`` reads (items whose consensus keeps a tie are in pairs.jsonl only, and counted).
  The task row's own fields travel under ``meta`` (``{}`` when it had none): they never replace a
  computed field, so a task file that carries ``soft_label`` or ``scores`` of its own (an AI judge's
  preferences.jsonl sent to people for checking) cannot overwrite what the annotators said.
- ``pairs.jsonl``: ``{prompt, chosen, rejected, soft_label, item_id, annotators}`` for every pair of
  responses the annotators did not split evenly; ``soft_label`` = share of annotators preferring
  chosen (ties half), the preference shape of ``alignkit dpo`` and ``alignkit rm``; ``meta`` as above.
- ``answers.jsonl``: every stored answer (annotator, ranks per response, order shown, seconds, ...).
- ``agreement.json`` and ``agreement.html`` (report.html style): Krippendorff's alpha and Fleiss' kappa
  on the pairwise judgments, pairwise percent agreement, and per annotator the answers, speed,
  agreement with the consensus of the others and position bias.
- A/B mode: ``human_eval.json`` (win rate of run B over run A, ties half, 95% interval, computed from
  the stored mapping of responses to runs; and the judges' position bias), and the same
  numbers as ``human/...`` keys in both runs' ``summary.json`` (run A gets 1 - the win rate), which is
  where ``alignkit compare`` shows them beside the automatic metrics.
"""

from __future__ import annotations

import json
import statistics
from html import escape
from pathlib import Path
from typing import Any, Dict, List

from alignkit.annotate import agreement as A
from alignkit.annotate.store import Store
from alignkit.data.load import write_jsonl
from alignkit.eval.style import page


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3f}"
    return escape(str(v))


def collect(store: Store, aggregate: str = "borda") -> Dict[str, Any]:
    """Everything export writes, as Python objects (the tests read this)."""
    if aggregate not in A.AGGREGATORS:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {sorted(A.AGGREGATORS)}")
    items = {it["id"]: it for it in store.items()}
    answers = store.answers()
    by_item: Dict[str, List[Dict[str, Any]]] = {}
    for a in answers:
        if a["ranks"] is not None:
            by_item.setdefault(a["item_id"], []).append(a)
    rankings, pairs = [], []
    counts = {"items": len(items), "answers": len(answers), "skipped": sum(a["skipped"] for a in answers),
              "all_bad": sum(a["all_bad"] for a in answers), "items_answered": len(by_item),
              "consensus_with_ties": 0, "no_preference": 0, "pairs_split_evenly": 0}
    units: List[List[int]] = []  # one per (item, pair): the annotators' judgments
    for iid, ans in by_item.items():
        it = items[iid]
        ranks = [a["ranks"] for a in ans]
        scores, consensus = A.AGGREGATORS[aggregate](ranks)
        probs = A.pair_probabilities(ranks)
        for key in probs:
            units.append([A.judgments(r)[key] for r in ranks])
        if len(set(consensus)) == 1:
            counts["no_preference"] += 1
        elif len(set(consensus)) < len(consensus):
            counts["consensus_with_ties"] += 1
        else:
            order = sorted(range(len(consensus)), key=lambda i: consensus[i])
            rankings.append({"prompt": it["prompt"], "responses": [it["responses"][i] for i in order],
                             "item_id": iid, "annotators": len(ans), "aggregate": aggregate,
                             "scores": [round(scores[i], 4) for i in order], "meta": it["extra"]})
        for (i, j), p in probs.items():
            if p == 0.5:
                counts["pairs_split_evenly"] += 1
                continue
            c, r = (i, j) if p > 0.5 else (j, i)
            pairs.append({"prompt": it["prompt"], "chosen": it["responses"][c], "rejected": it["responses"][r],
                          "soft_label": round(max(p, 1 - p), 6), "item_id": iid, "annotators": len(ans),
                          "meta": it["extra"]})
    stats = {"krippendorff_alpha": A.krippendorff_alpha(units, "interval"),
             "krippendorff_alpha_nominal": A.krippendorff_alpha(units, "nominal"),
             "fleiss_kappa": A.fleiss_kappa([[u.count(1), u.count(0), u.count(-1)] for u in units]),
             "pairwise_agreement": A.percent_agreement(units),
             "units": len([u for u in units if len(u) >= 2]),
             **A.position_bias([(a["ranks"], a["order"]) for ans in by_item.values() for a in ans])}
    annotators = []
    for uid, name in sorted(store.users().items()):
        mine = [a for a in answers if a["user_id"] == uid]
        if not mine:
            continue
        ranked = [a for a in mine if a["ranks"] is not None]
        agree = total = 0
        for a in ranked:
            res = A.consensus_agreement(a["ranks"], [b["ranks"] for b in by_item[a["item_id"]] if b["user_id"] != uid])
            if res:
                agree, total = agree + res[0], total + res[1]
        secs = [a["seconds"] for a in mine if a["seconds"] is not None]
        annotators.append({"annotator": name, "answers": len(mine), "skipped": sum(a["skipped"] for a in mine),
                           "all_bad": sum(a["all_bad"] for a in mine),
                           "median_seconds": statistics.median(secs) if secs else float("nan"),
                           "agreement_with_consensus": agree / total if total else float("nan"),
                           "judgments_compared": total,
                           **A.position_bias([(a["ranks"], a["order"]) for a in ranked])})
    out = {"rankings": rankings, "pairs": pairs, "answers": answers, "counts": counts, "agreement": stats,
           "annotators": annotators, "aggregate": aggregate}
    settings = store.settings()
    if settings["mode"] == "ab":
        out["ab"] = ab_result(items, by_item, settings.get("ab") or {})
    return out


def ab_result(items: Dict[str, Dict[str, Any]], by_item: Dict[str, List[Dict[str, Any]]],
              ab: Dict[str, Any]) -> Dict[str, Any]:
    """Win rate of run B over run A: each judgment scores 1 (B ranked above A), 0.5 (tie) or 0; answers
    identical in both runs (never shown) count as one tie each. Which response is which run's comes from
    the stored ``sources`` (never from what a judge saw). Position bias: ``first_shown_preferred`` (share
    of strict judgments won by the response shown first; 0.5 = none) and ``a_shown_first`` (share of
    judgments where run A's response was shown first; 0.5 = balanced draws)."""
    item_scores, shown = [], []
    a_first = n = 0
    for iid, ans in by_item.items():
        src = items[iid]["sources"]
        a_i, b_i = src.index("A"), src.index("B")
        item_scores.append([1.0 if r["ranks"][b_i] < r["ranks"][a_i] else 0.5 if r["ranks"][b_i] == r["ranks"][a_i]
                            else 0.0 for r in ans])
        for r in ans:
            shown.append((r["ranks"], r["order"]))
            a_first += r["order"][0] == a_i
            n += 1
    item_scores += [[0.5]] * int(ab.get("identical", 0))
    res = A.win_rate(item_scores)
    bias = A.position_bias(shown)
    return {"run_a": ab.get("runs", [None, None])[0], "run_b": ab.get("runs", [None, None])[1],
            "identical": int(ab.get("identical", 0)), **res,
            "first_shown_preferred": bias["first_shown_preferred"],
            "a_shown_first": a_first / n if n else float("nan")}


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def agreement_html(res: Dict[str, Any], title: str = "alignkit annotation report", nav: str = "") -> str:
    """The report page; ``nav``: trusted HTML put under the title (the admin page's export links)."""
    st, c = res["agreement"], res["counts"]
    body = [f"<h1>{escape(title)}</h1>", nav,
            f'<p class="note">aggregate: {escape(res["aggregate"])}; {c["items_answered"]} of {c["items"]} items '
            f'answered; {c["answers"]} answers ({c["skipped"]} skipped, {c["all_bad"]} all bad).</p>']
    if "ab" in res:
        ab = res["ab"]
        body += ["<h2>Blind A/B evaluation</h2>",
                 f"<p>Win rate of <b>B</b> ({escape(str(ab['run_b']))}) over <b>A</b> ({escape(str(ab['run_a']))}): "
                 f"<b>{_fmt(ab['win_rate'])}</b> (95% CI {_fmt(ab['ci_low'])} to {_fmt(ab['ci_high'])}; ties count "
                 f"half; {int(ab['wins'])} wins, {int(ab['ties'])} ties, {int(ab['losses'])} losses over "
                 f"{int(ab['items'])} items, {ab['identical']} identical answers counted as ties).</p>",
                 f"<p>Position bias: the response shown first won {_fmt(ab['first_shown_preferred'])} of strict "
                 f"judgments (0.5 = none); run A was shown first in {_fmt(ab['a_shown_first'])} of judgments "
                 "(orders are drawn per judge and item).</p>"]
    body += ["<h2>Agreement</h2>",
             _table([{"statistic": k, "value": st[k]} for k in
                     ("krippendorff_alpha", "krippendorff_alpha_nominal", "fleiss_kappa", "pairwise_agreement",
                      "units", "first_shown_preferred", "best_at_position_1", "best_at_position_1_chance")],
                    ["statistic", "value"]),
             '<p class="note">Units are the (item, response pair) judgments: +1, tie 0, -1. Krippendorff\'s alpha '
             "with the interval metric (and nominal), Fleiss' kappa over the three categories, percent agreement "
             "over pairs of annotators. Position bias: share of strict judgments won by the response shown "
             "earlier (0.5 = none).</p>",
             "<h2>Annotators</h2>",
             _table(res["annotators"], ["annotator", "answers", "skipped", "all_bad", "median_seconds",
                                        "agreement_with_consensus", "judgments_compared", "first_shown_preferred",
                                        "best_at_position_1"]),
             '<p class="note">Agreement with consensus: share of an annotator\'s pairwise judgments that match the '
             "majority of the other annotators of the same item (pairs they split evenly left out).</p>",
             "<h2>Outputs</h2>",
             _table([{"file": "rankings.jsonl", "rows": len(res["rankings"])},
                     {"file": "pairs.jsonl", "rows": len(res["pairs"])},
                     {"file": "items whose consensus keeps a tie (pairs only)", "rows": c["consensus_with_ties"]},
                     {"file": "items with no preference (all tied)", "rows": c["no_preference"]},
                     {"file": "pairs split evenly (left out)", "rows": c["pairs_split_evenly"]}], ["file", "rows"])]
    return page(title, body)


def _update_summary(run_dir: Path, values: Dict[str, float]) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(values)
    path.write_text(json.dumps(summary, indent=2, default=float))


def export(store: Store, output: str, aggregate: str = "borda") -> Dict[str, Any]:
    """Write every export file into ``output``; returns a flat summary."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    res = collect(store, aggregate)
    write_jsonl(out / "rankings.jsonl", res["rankings"])
    write_jsonl(out / "pairs.jsonl", res["pairs"])
    write_jsonl(out / "answers.jsonl", res["answers"])
    report = {k: res[k] for k in ("counts", "agreement", "annotators", "aggregate")}
    summary: Dict[str, Any] = {"rankings": len(res["rankings"]), "pairs": len(res["pairs"]), **res["counts"],
                               **{f"agreement/{k}": v for k, v in res["agreement"].items()}}
    if "ab" in res:
        ab = res["ab"]
        report["ab"] = ab
        (out / "human_eval.json").write_text(json.dumps(ab, indent=2))
        summary.update({"human/win_rate": ab["win_rate"], "human/ci_low": ab["ci_low"], "human/ci_high": ab["ci_high"]})
        for run, wr, lo, hi in ((ab["run_b"], ab["win_rate"], ab["ci_low"], ab["ci_high"]),
                                (ab["run_a"], 1 - ab["win_rate"], 1 - ab["ci_high"], 1 - ab["ci_low"])):
            if run and Path(run).is_dir():
                _update_summary(Path(run), {"human/win_rate": wr, "human/win_rate_ci_low": lo,
                                            "human/win_rate_ci_high": hi, "human/judgments": ab["judgments"]})
    (out / "agreement.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "agreement.html").write_text(agreement_html(res), encoding="utf-8")
    summary["output"] = str(out)
    return summary
