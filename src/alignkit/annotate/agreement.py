"""Aggregation and agreement statistics for rankings by several annotators (pure functions).

An answer is a rank vector ``ranks[i]`` (1 = best, equal numbers = tie) over an item's responses.
Everything pairwise works on *judgments*: for responses i < j, ``+1`` (i preferred), ``0`` (tie) or
``-1`` (j preferred).

- :func:`borda`: Borda count (de Borda 1781): a response scores one point per response ranked below it
  and half a point per tie; the consensus orders responses by the mean score over annotators.
- :func:`majority`: pairwise majority (Condorcet), consensus by Copeland score (wins + half ties of
  the pairwise majorities).
- :func:`pair_probabilities`: soft labels ``P(i over j) = (#i>j + 0.5 #ties) / #annotators``.
- :func:`krippendorff_alpha`: ``alpha = 1 - D_o / D_e`` with the coincidence matrix of Krippendorff
  (2011, "Computing Krippendorff's Alpha-Reliability"): ``o_ck = sum_u (pairs of c, k in unit u) /
  (m_u - 1)``, ``D_o = sum o_ck delta2(c, k) / n``, ``D_e = sum n_c n_k delta2(c, k) / (n (n - 1))``;
  units with fewer than two values are left out. Metric ``nominal`` (delta2 = [c != k]) or
  ``interval`` (delta2 = (c - k)^2).
- :func:`fleiss_kappa`: Fleiss (1971) ``kappa = (P_bar - P_e) / (1 - P_e)``, ``P_i = (sum_j n_ij^2 - n_i)
  / (n_i (n_i - 1))``, ``p_j = sum_i n_ij / sum_i n_i``, ``P_e = sum_j p_j^2``; units may have different
  rater counts (each ``P_i`` uses its own ``n_i``; with equal counts this is Fleiss' formula exactly).
- :func:`win_rate`: share of judgments won (ties half) with a normal-approximation 95% interval whose
  standard error treats items as the independent units (judgments of one item are averaged first).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

Ranks = Sequence[int]


def judgments(ranks: Ranks) -> Dict[Tuple[int, int], int]:
    """``{(i, j): +1 | 0 | -1}`` for every i < j: +1 when response i ranks above j."""
    return {(i, j): (ranks[i] < ranks[j]) - (ranks[i] > ranks[j]) for i, j in combinations(range(len(ranks)), 2)}


def borda_scores(ranks: Ranks) -> List[float]:
    """Per response: responses ranked below it, plus half the ones tied with it."""
    k = len(ranks)
    return [sum(1.0 if ranks[j] > ranks[i] else 0.5 if ranks[j] == ranks[i] else 0.0 for j in range(k) if j != i)
            for i in range(k)]


def ranks_from_scores(scores: Sequence[float], tol: float = 1e-9) -> List[int]:
    """Competition ranks (1 = highest score; equal scores share the better rank)."""
    return [1 + sum(1 for t in scores if t > s + tol) for s in scores]


def borda(answers: Sequence[Ranks]) -> Tuple[List[float], List[int]]:
    """(mean Borda score per response, consensus ranks)."""
    k = len(answers[0])
    mean = [sum(borda_scores(r)[i] for r in answers) / len(answers) for i in range(k)]
    return mean, ranks_from_scores(mean)


def pair_probabilities(answers: Sequence[Ranks]) -> Dict[Tuple[int, int], float]:
    """``{(i, j): P(i preferred over j)}`` for i < j over the annotators, ties counting half."""
    out: Dict[Tuple[int, int], float] = {}
    for r in answers:
        for key, v in judgments(r).items():
            out[key] = out.get(key, 0.0) + (1.0 if v > 0 else 0.5 if v == 0 else 0.0)
    return {key: v / len(answers) for key, v in out.items()}


def majority(answers: Sequence[Ranks]) -> Tuple[List[float], List[int]]:
    """(Copeland score per response from the pairwise majorities, consensus ranks)."""
    k = len(answers[0])
    score = [0.0] * k
    for (i, j), p in pair_probabilities(answers).items():
        if p > 0.5:
            score[i] += 1
        elif p < 0.5:
            score[j] += 1
        else:
            score[i] += 0.5
            score[j] += 0.5
    return score, ranks_from_scores(score)


AGGREGATORS = {"borda": borda, "majority": majority}


def _delta2(metric: str):
    if metric == "nominal":
        return lambda a, b: 0.0 if a == b else 1.0
    if metric == "interval":
        return lambda a, b: float(a - b) ** 2
    raise ValueError(f"unknown metric {metric!r} (nominal or interval)")


def krippendorff_alpha(units: Sequence[Sequence[float]], metric: str = "nominal") -> float:
    """Krippendorff's alpha over units (each the values the coders gave one unit; missing left out)."""
    d2 = _delta2(metric)
    o: Dict[Tuple[float, float], float] = {}
    for vals in units:
        m = len(vals)
        if m < 2:
            continue
        for a in range(m):
            for b in range(m):
                if a != b:
                    key = (vals[a], vals[b])
                    o[key] = o.get(key, 0.0) + 1.0 / (m - 1)
    n_c: Dict[float, float] = {}
    for (c, _), w in o.items():
        n_c[c] = n_c.get(c, 0.0) + w
    n = sum(n_c.values())
    if n <= 1:
        return float("nan")
    d_o = sum(w * d2(c, k) for (c, k), w in o.items()) / n
    d_e = sum(n_c[c] * n_c[k] * d2(c, k) for c in n_c for k in n_c) / (n * (n - 1))
    return float("nan") if d_e == 0 else 1.0 - d_o / d_e


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a units x categories table of rater counts (units with < 2 raters left out)."""
    rows = [r for r in counts if sum(r) >= 2]
    if not rows:
        return float("nan")
    p_units = [(sum(x * x for x in r) - sum(r)) / (sum(r) * (sum(r) - 1)) for r in rows]
    total = sum(sum(r) for r in rows)
    p_j = [sum(r[j] for r in rows) / total for j in range(len(rows[0]))]
    p_bar, p_e = sum(p_units) / len(p_units), sum(p * p for p in p_j)
    return float("nan") if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def percent_agreement(units: Sequence[Sequence[float]]) -> float:
    """Share of agreeing pairs among all pairs of coders of the same unit."""
    agree = total = 0
    for vals in units:
        for a, b in combinations(vals, 2):
            agree += a == b
            total += 1
    return agree / total if total else float("nan")


def win_rate(item_scores: Sequence[Sequence[float]], z: float = 1.959964) -> Dict[str, float]:
    """Win rate from per-item judgment scores (1 win, 0.5 tie, 0 loss); returns ``win_rate`` (mean over
    items of the item's mean), ``ci_low``/``ci_high`` (mean -+ z * sd / sqrt(n), clipped to [0, 1]), the
    counts of wins, ties and losses over all judgments, and ``items``."""
    means = [sum(s) / len(s) for s in item_scores if s]
    n = len(means)
    flat = [x for s in item_scores for x in s]
    out = {"items": float(n), "judgments": float(len(flat)), "wins": float(sum(x == 1.0 for x in flat)),
           "ties": float(sum(x == 0.5 for x in flat)), "losses": float(sum(x == 0.0 for x in flat))}
    if not n:
        return {**out, "win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = sum(means) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return {**out, "win_rate": mean, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half)}


def position_bias(answers: Sequence[Tuple[Ranks, Sequence[int]]]) -> Dict[str, float]:
    """From (ranks, display order) answers: ``first_shown_preferred`` = share of strict pairwise
    judgments won by the response shown earlier (0.5 = no bias), and ``best_at_position_1`` = share of
    answers whose best response (a strict best only) was shown first, with its chance level
    ``best_at_position_1_chance`` = mean 1/K over those answers."""
    earlier = strict = best1 = with_best = 0
    chance = 0.0
    for ranks, order in answers:
        pos = {resp: p for p, resp in enumerate(order)}  # response index -> display position
        for (i, j), v in judgments(ranks).items():
            if v:
                strict += 1
                winner, loser = (i, j) if v > 0 else (j, i)
                earlier += pos[winner] < pos[loser]
        top = [i for i, r in enumerate(ranks) if r == min(ranks)]
        if len(top) == 1:
            with_best += 1
            best1 += pos[top[0]] == 0
            chance += 1.0 / len(ranks)
    return {"first_shown_preferred": earlier / strict if strict else float("nan"),
            "best_at_position_1": best1 / with_best if with_best else float("nan"),
            "best_at_position_1_chance": chance / with_best if with_best else float("nan")}


def consensus_agreement(mine: Ranks, others: Sequence[Ranks]) -> Optional[Tuple[int, int]]:
    """(agreeing, compared) pairwise judgments of ``mine`` against the majority of ``others`` (pairs the
    others split evenly are left out); None when there are no others."""
    if not others:
        return None
    probs = pair_probabilities(others)
    agree = total = 0
    for key, v in judgments(mine).items():
        p = probs[key]
        if p == 0.5:
            continue
        total += 1
        agree += v == (1 if p > 0.5 else -1)
    return agree, total
