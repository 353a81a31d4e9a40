"""Evaluation metrics: pure functions on Python lists (or 1-D tensors / arrays).

Every function accepts plain lists; sequences of numbers may also be 1-D ``torch.Tensor`` or
``numpy.ndarray`` (anything with ``.tolist()``). Results are Python floats / dicts, never tensors,
so they can go straight into ``metrics.jsonl``. Empty inputs give ``nan`` (or ``0.0`` where the
docstring says so) instead of raising, because evaluation often runs on a handful of samples.

Text metrics tokenize on whitespace (``str.split()``): cheap, tokenizer-independent and
comparable across models, which is what diversity and repetition measures need.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Dict, List, Sequence, Tuple

__all__ = [
    "calibration",
    "distinct_n",
    "eos_rate",
    "length_stats",
    "pairwise_accuracy",
    "pearson",
    "repetition_rate",
    "reward_length_correlation",
    "self_similarity",
    "sequence_kl_stats",
    "win_rate",
]

NAN = float("nan")


def _as_floats(values: Any) -> List[float]:
    """Turn a list / 1-D tensor / array of numbers into a list of Python floats."""
    if hasattr(values, "tolist"):  # torch.Tensor, numpy.ndarray
        values = values.tolist()
    if isinstance(values, (int, float)):
        return [float(values)]
    return [float(v) for v in values]


def _ngrams(tokens: Sequence[str], n: int) -> List[Tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _check_same_length(a: Sequence[Any], b: Sequence[Any], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} and {len(b)} values; they must pair up one to one")


def distinct_n(texts: List[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all ``texts``.

    N-grams are taken over whitespace tokens within each text (never across two texts) and
    pooled, so the ratio measures diversity across the whole set of samples. 1.0 means no n-gram
    occurs twice; values near 0 mean the samples keep repeating the same phrases.
    Example: distinct-1 of ["a b a", "b c"] = 3 unique {a, b, c} / 5 tokens = 0.6.
    Returns 0.0 when there are no n-grams (all texts shorter than ``n`` tokens).
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    total = 0
    unique = set()
    for text in texts:
        grams = _ngrams(text.split(), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _jaccard_bigrams(a: str, b: str) -> float:
    ta, tb = a.split(), b.split()
    ga, gb = set(_ngrams(ta, 2)), set(_ngrams(tb, 2))
    if not ga and not gb:  # both shorter than two words: fall back to exact token equality
        return 1.0 if ta == tb else 0.0
    return len(ga & gb) / len(ga | gb)


def self_similarity(texts: List[str]) -> float:
    """Mean pairwise similarity of several samples for ONE prompt (a mode-collapse measure).

    Similarity of two texts is the Jaccard index of their sets of word bigrams (whitespace
    tokens): |A ∩ B| / |A ∪ B|. 1.0 = the same bigrams (e.g. identical texts), 0.0 = no bigram in
    common. Two texts that both have fewer than two words count as 1.0 if their tokens are equal
    and 0.0 otherwise. The result averages over all n(n-1)/2 pairs; it rises towards 1.0 as a
    policy collapses onto one answer. Returns nan for fewer than 2 texts.
    """
    if len(texts) < 2:
        return NAN
    sims = [_jaccard_bigrams(a, b) for a, b in combinations(texts, 2)]
    return sum(sims) / len(sims)


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of the n-grams of ``text`` that repeat an n-gram seen earlier in the same text.

    Example (n=2): "a b a b a b" has bigrams ab, ba, ab, ba, ab; the last three repeat an earlier
    one, so 3 / 5 = 0.6. Degenerate looping generations approach 1.0. Returns 0.0 when the text
    has fewer than ``n`` tokens.
    """
    if n < 1:
        raise ValueError(f"repetition_rate needs n >= 1, got {n}")
    grams = _ngrams(text.split(), n)
    seen = set()
    repeats = 0
    for g in grams:
        if g in seen:
            repeats += 1
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient of two equally long sequences.

    Returns nan when there are fewer than two points or either sequence is constant (the
    correlation is undefined there, and 0.0 would wrongly read as "uncorrelated").
    """
    xs, ys = _as_floats(x), _as_floats(y)
    _check_same_length(xs, ys, "pearson")
    n = len(xs)
    if n < 2:
        return NAN
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    if sxx == 0.0 or syy == 0.0:
        return NAN
    r = sxy / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))  # rounding can step just outside [-1, 1]


def reward_length_correlation(rewards: Sequence[float], lengths: Sequence[float]) -> float:
    """Pearson correlation between per-sample rewards and completion lengths (in tokens).

    A strongly positive value means the reward model pays for length, the usual first sign of
    verbosity reward hacking. nan when either input is constant.
    """
    return pearson(rewards, lengths)


def _percentile(sorted_xs: List[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of an already sorted list."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    frac = pos - lo
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * frac


def length_stats(lengths: Sequence[float]) -> Dict[str, float]:
    """Summary of completion lengths: ``mean``, ``std``, ``min``, ``max``, ``p50``, ``p90``.

    ``std`` is the population standard deviation (ddof=0, as numpy's default); percentiles use
    linear interpolation (numpy's default). Example: [1, 2, 3, 4] -> mean 2.5,
    std sqrt(1.25) = 1.118, p50 2.5, p90 = 3 + 0.7 * (4 - 3) = 3.7. All nan when empty.
    """
    xs = sorted(_as_floats(lengths))
    if not xs:
        return {k: NAN for k in ("mean", "std", "min", "max", "p50", "p90")}
    mean = sum(xs) / len(xs)
    var = sum((v - mean) ** 2 for v in xs) / len(xs)
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "min": xs[0],
        "max": xs[-1],
        "p50": _percentile(xs, 0.5),
        "p90": _percentile(xs, 0.9),
    }


def _pairwise_wins(a: Sequence[float], b: Sequence[float], what: str) -> float:
    xs, ys = _as_floats(a), _as_floats(b)
    _check_same_length(xs, ys, what)
    if not xs:
        return NAN
    score = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in zip(xs, ys))
    return score / len(xs)


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """Fraction of prompts where the policy's score beats the reference's (ties count 0.5).

    ``policy_scores[i]`` and ``reference_scores[i]`` score the two completions for prompt i
    (gold reward, judge score, ...). Example: [3, 1, 2] vs [1, 1, 5] -> (1 + 0.5 + 0) / 3 = 0.5.
    nan when empty.
    """
    return _pairwise_wins(policy_scores, reference_scores, "win_rate")


def eos_rate(ended: Sequence[bool]) -> float:
    """Fraction of generations that ended with EOS (rather than hitting the length limit).

    A falling EOS rate during RL usually means completions are growing into the max length.
    nan when empty.
    """
    flags = ended.tolist() if hasattr(ended, "tolist") else list(ended)
    if not flags:
        return NAN
    return sum(1.0 for e in flags if e) / len(flags)


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Reward-model accuracy: fraction of pairs with r(chosen) > r(rejected); ties count 0.5.

    Example: chosen [2, 0, 1], rejected [1, 1, 1] -> (1 + 0 + 0.5) / 3 = 0.5. nan when empty.
    """
    return _pairwise_wins(chosen_scores, rejected_scores, "pairwise_accuracy")


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # stable for very negative z
    return e / (1.0 + e)


def calibration(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                n_bins: int = 10) -> Dict[str, Any]:
    """Calibration of a reward model's Bradley-Terry probabilities on preference pairs.

    For each pair the model predicts P(chosen preferred) = p = σ(r_c - r_r). A calibrated model's
    pairs predicted at 0.8 are right 80% of the time. Pairs are shown both ways so the result does
    not depend on an arbitrary order: (p, observed 1) for (chosen, rejected) and (1 - p,
    observed 0) for (rejected, chosen). These 2N predictions fall into ``n_bins`` equal bins of
    [0, 1] (p = 1.0 goes to the last bin).

    Returns ``{"ece", "n", "bins"}``: ``bins`` is a list of ``n_bins`` dicts with ``lo``, ``hi``,
    ``mean_predicted``, ``observed`` (fraction of label 1), ``count`` (nan means for an empty
    bin); ``ece`` is the expected calibration error Σ_b count_b / 2N · |mean_predicted_b -
    observed_b|; ``n`` is the number of pairs.
    Example: one pair with r_c - r_r = 2: p = σ(2) = 0.8808 in bin [0.8, 0.9) with observed 1,
    and 0.1192 in bin [0.1, 0.2) with observed 0; ece = 0.5·0.1192 + 0.5·0.1192 = 0.1192.
    """
    if n_bins < 1:
        raise ValueError(f"calibration needs n_bins >= 1, got {n_bins}")
    cs, rs = _as_floats(chosen_scores), _as_floats(rejected_scores)
    _check_same_length(cs, rs, "calibration")
    preds: List[Tuple[float, float]] = []  # (predicted probability, observed label)
    for c, r in zip(cs, rs):
        p = _sigmoid(c - r)
        preds += [(p, 1.0), (1.0 - p, 0.0)]
    sums = [[0.0, 0.0, 0] for _ in range(n_bins)]  # per bin: Σp, Σlabel, count
    for p, y in preds:
        b = min(int(p * n_bins), n_bins - 1)
        sums[b][0] += p
        sums[b][1] += y
        sums[b][2] += 1
    bins = []
    ece = 0.0
    for i, (sp, sy, cnt) in enumerate(sums):
        mean_p = sp / cnt if cnt else NAN
        obs = sy / cnt if cnt else NAN
        if cnt:
            ece += cnt / len(preds) * abs(mean_p - obs)
        bins.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "mean_predicted": mean_p,
                     "observed": obs, "count": cnt})
    return {"ece": ece if preds else NAN, "n": len(cs), "bins": bins}


def sequence_kl_stats(per_token_kl: Sequence[Sequence[float]]) -> Dict[str, float]:
    """Summaries of per-token KL estimates (policy vs reference) over response tokens.

    ``per_token_kl[i]`` holds the KL estimate for each response token of sequence i (lists of
    different lengths, or 1-D tensors). Returns:
      - ``token_mean``: Σ over all tokens / number of tokens (nats per token),
      - ``sequence_mean``: mean over sequences of each sequence's sum (nats per sequence, the
        quantity a KL budget such as ``kl/ref`` is stated in),
      - ``sequence_max``: the largest per-sequence sum,
      - ``num_tokens`` and ``num_sequences``.
    Example: [[0.1, 0.3], [0.2]] -> token_mean 0.6 / 3 = 0.2, sequence_mean (0.4 + 0.2) / 2 = 0.3.
    """
    seqs = [_as_floats(s) for s in per_token_kl]
    sums = [sum(s) for s in seqs]
    n_tok = sum(len(s) for s in seqs)
    return {
        "token_mean": sum(sums) / n_tok if n_tok else NAN,
        "sequence_mean": sum(sums) / len(sums) if sums else NAN,
        "sequence_max": max(sums) if sums else NAN,
        "num_tokens": float(n_tok),
        "num_sequences": float(len(seqs)),
    }


def fmt_value(v: Any) -> str:
    """A metric value for a table: floats to 4 significant digits, anything else as its string."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
