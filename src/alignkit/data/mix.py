"""``data.mix``: several training datasets sampled by weight.

Each dataset is read, checked and tokenized on its own (its own report, its own held-out side by the
usual rules: ``data.eval_path`` for all of them, else each one's ``eval_split`` / test twin /
``eval_fraction`` of its rows, so a held-out row is never drawn for training). Then dataset i, with
share ``p_i = w_i / sum(w)``, gives ``k_i`` of the ``N = sum(n_i)`` mixed training examples (``n_i``:
its usable examples; ``k_i``: ``p_i * N`` rounded by largest remainder, so the ``k_i`` add up to N).
Its examples are drawn in whole seeded passes (a dataset drawn 2.5 times has every example twice and
half of them a third time; one drawn 0.4 times gives a random 40% of its examples). The loop then
shuffles the mixed list by epoch as it does any training set. ``data_report.json`` records each
dataset's weight, share, examples available and drawn, and passes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence

from alignkit.data.load import DataError, DataReport
from alignkit.data.prepared import Prepared, count_overlap, eval_source, load_split, no_examples_message, prepare_in_memory


@dataclass
class MixReport(DataReport):
    """A dataset's report with its place in the mixture (``mix``: weight, share, drawn, passes)."""

    mix: Optional[Dict[str, Any]] = None

    @classmethod
    def of(cls, report: DataReport, mix: Dict[str, Any]) -> "MixReport":
        return cls(**{f.name: getattr(report, f.name) for f in fields(DataReport)}, mix=mix)

    def summary_lines(self) -> List[str]:
        lines = super().summary_lines()
        if self.mix:
            m = self.mix
            lines.insert(1, f"  mix: weight {m['weight']:g} -> {100 * m['share']:.1f}% of the mixed training set: "
                            f"{m['examples_drawn']} drawn from its {m['examples_available']} examples "
                            f"({m['passes']:.2f} passes)")
        return lines

    def to_dict(self, rows_file: Optional[str] = None) -> Dict[str, Any]:
        out = super().to_dict(rows_file)
        if self.mix:
            out["mix"] = dict(self.mix)
        return out


def shares(weights: Sequence[float]) -> List[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


def allocate(weights: Sequence[float], total: int) -> List[int]:
    """Examples per dataset: ``share * total`` rounded by largest remainder (the counts sum to ``total``;
    ties go to the earlier dataset)."""
    exact = [p * total for p in shares(weights)]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(n: int, k: int, rng: random.Random) -> List[int]:
    """``k`` indices of ``range(n)`` in whole shuffled passes: each index ``k // n`` or ``k // n + 1`` times."""
    out: List[int] = []
    while len(out) < k:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm[:k - len(out)]
    return out


def source_config(cfg, src, **update):
    """``cfg`` (a DataConfig) for one dataset of the mixture."""
    return cfg.model_copy(update={"path": src.path, "split": src.split, "subset": src.subset or cfg.subset,
                                  "mix": [], **update})


def prepare_mix(kind: str, cfg, encoder, seed: int, require_eval: bool, reports: List[DataReport],
                **parse_kwargs):
    """:func:`alignkit.data.prepare` for ``data.mix`` (module docstring)."""
    if cfg.path:
        raise DataError("set data.path or data.mix, not both (data.mix lists every training dataset)")
    trains, evals = [], []
    for src in cfg.mix:
        own: List[DataReport] = []
        sub = source_config(cfg, src)
        try:
            if cfg.eval_path:  # one held-out set for the mixture: read only the training side here
                train, report, _keys = load_split(sub.path, sub.split, "train", kind, sub, encoder, **parse_kwargs)
                own.append(report)
                if not train:
                    raise DataError(no_examples_message(sub.path, kind, report))
                part = Prepared(train, [], own, encoder)
            else:
                part = prepare_in_memory(kind, sub, encoder, seed, False, own, **parse_kwargs)
        except DataError:
            reports.extend(own)  # the run still writes what was read
            raise
        trains.append(part)
        evals.extend(part.eval)
    weights = [s.weight for s in cfg.mix]
    total = sum(len(p.train) for p in trains)
    counts = allocate(weights, total)
    mixed: List[Dict[str, Any]] = []
    for i, (src, part, p, k) in enumerate(zip(cfg.mix, trains, shares(weights), counts)):
        n = len(part.train)
        picked = draw(n, k, random.Random(f"alignkit.mix:{seed}:{i}"))
        mixed += [part.train[j] for j in picked]
        info = {"weight": src.weight, "share": p, "examples_available": n, "examples_drawn": k, "passes": k / n,
                "seed": seed}
        reports.append(MixReport.of(part.reports[0], info))
        reports.extend(part.reports[1:])  # its held-out side
    eval_items: List[Dict[str, Any]] = list(evals)
    if cfg.eval_path:
        where = eval_source(source_config(cfg, cfg.mix[0]))
        if where is not None:
            eval_items, ereport, _keys = load_split(where[0], where[1], "eval", kind, cfg, encoder, **parse_kwargs)
            reports.append(ereport)
            if not eval_items:
                raise DataError(f"{where[0]}: no usable {kind} examples for evaluation")
            ereport.overlap_with_train = count_overlap(mixed, eval_items)
    if require_eval and not eval_items:
        raise DataError("this command needs held-out data: set data.eval_path, data.eval_split or data.eval_fraction")
    return Prepared(mixed, eval_items, reports, encoder)
