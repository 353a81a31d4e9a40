"""Hand-computed checks of alignkit.eval.metrics (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from alignkit.eval.metrics import (
    calibration,
    distinct_n,
    eos_rate,
    length_stats,
    pairwise_accuracy,
    pearson,
    repetition_rate,
    reward_length_correlation,
    self_similarity,
    sequence_kl_stats,
    win_rate,
)


def test_distinct_n():
    # distinct-1 of ["a b a", "b c"]: tokens a b a b c -> 3 unique {a, b, c} / 5 = 0.6
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(0.6)
    # distinct-2: bigrams (a b), (b a) from text 1 and (b c) from text 2; none crosses texts
    # -> 3 unique / 3 total = 1.0
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    # ["a b", "a b"]: bigrams (a b), (a b) -> 1 unique / 2 = 0.5
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    # no text has 3 tokens -> no trigrams -> 0.0
    assert distinct_n(["a b", "c"], 3) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_self_similarity():
    # identical texts: the same bigram sets -> Jaccard 1.0
    assert self_similarity(["the cat sat", "the cat sat"]) == pytest.approx(1.0)
    # "a b c" {ab, bc} vs "a b d" {ab, bd}: |∩| = 1, |∪| = 3 -> 1/3
    assert self_similarity(["a b c", "a b d"]) == pytest.approx(1 / 3)
    # three texts: pairs (1,2) = 1/3, (1,3) = 0 ({ab,bc} vs {xy}), (2,3) = 0 -> mean 1/9
    assert self_similarity(["a b c", "a b d", "x y"]) == pytest.approx(1 / 9)
    # single-word texts have no bigrams: equal tokens -> 1.0, different -> 0.0
    assert self_similarity(["yes", "yes"]) == 1.0
    assert self_similarity(["yes", "no"]) == 0.0
    assert math.isnan(self_similarity(["only one"]))
    assert math.isnan(self_similarity([]))


def test_repetition_rate():
    # n=2, "a b a b a b": bigrams ab ba ab ba ab; the last 3 repeat an earlier one -> 3/5 = 0.6
    assert repetition_rate("a b a b a b", n=2) == pytest.approx(0.6)
    # n=4 default: "a b c d a b c d" has 5 four-grams abcd bcda cdab dabc abcd -> 1 repeat / 5
    assert repetition_rate("a b c d a b c d") == pytest.approx(0.2)
    assert repetition_rate("one two three four five") == 0.0
    assert repetition_rate("too short") == 0.0  # fewer than 4 tokens -> no 4-grams


def test_pearson_and_reward_length_correlation():
    # y = 2x + 1 exactly -> r = 1; reversed -> r = -1
    assert pearson([1, 2, 3], [3, 5, 7]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [7, 5, 3]) == pytest.approx(-1.0)
    # x = [1,2,3], y = [1,3,2]: means 2, 2; Σdxdy = (-1)(-1) + 0 + (1)(0) = 1;
    # Σdx² = 2, Σdy² = 1 + 1 + 0 = 2 -> r = 1 / sqrt(2·2) = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # constant -> undefined
    assert math.isnan(pearson([1], [2]))
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert reward_length_correlation([0.1, 0.2, 0.3], [10, 20, 30]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_length_stats():
    # [4, 1, 3, 2] sorted 1 2 3 4: mean 10/4 = 2.5; var (2.25+0.25+0.25+2.25)/4 = 1.25;
    # p50 at position 0.5·3 = 1.5 -> 2.5; p90 at 0.9·3 = 2.7 -> 3 + 0.7·(4-3) = 3.7
    s = length_stats([4, 1, 3, 2])
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(1.25))
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert s["p50"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7)
    single = length_stats([7])
    assert single == {"mean": 7.0, "std": 0.0, "min": 7.0, "max": 7.0, "p50": 7.0, "p90": 7.0}
    assert all(math.isnan(v) for v in length_stats([]).values())


def test_win_rate_and_pairwise_accuracy():
    # [3, 1, 2] vs [1, 1, 5]: win, tie, loss -> (1 + 0.5 + 0) / 3 = 0.5
    assert win_rate([3, 1, 2], [1, 1, 5]) == pytest.approx(0.5)
    # [2, 2, 2, 0] vs [1, 1, 1, 1]: 3 wins, 1 loss -> 0.75
    assert win_rate([2, 2, 2, 0], [1, 1, 1, 1]) == pytest.approx(0.75)
    # chosen [2, 0, 1] vs rejected [1, 1, 1]: right, wrong, tie -> 1.5 / 3 = 0.5
    assert pairwise_accuracy([2, 0, 1], [1, 1, 1]) == pytest.approx(0.5)
    assert pairwise_accuracy(np.array([1.0, 2.0]), np.array([0.0, 0.0])) == 1.0
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_eos_rate():
    # 3 of 4 generations ended with EOS -> 0.75
    assert eos_rate([True, True, False, True]) == 0.75
    assert eos_rate(np.array([True, False])) == 0.5
    assert math.isnan(eos_rate([]))


def test_calibration_single_pair():
    # r_c - r_r = 2 -> p = σ(2) = 1 / (1 + e^-2) = 0.880797
    # both ways: (0.8808, 1) lands in bin 8 = [0.8, 0.9), (0.1192, 0) in bin 1 = [0.1, 0.2)
    # ece = 0.5·|0.8808 - 1| + 0.5·|0.1192 - 0| = 0.1192
    p = 1 / (1 + math.exp(-2))
    cal = calibration([2.0], [0.0])
    assert cal["n"] == 1
    assert cal["ece"] == pytest.approx(1 - p)
    assert len(cal["bins"]) == 10
    b8, b1 = cal["bins"][8], cal["bins"][1]
    assert (b8["count"], b8["mean_predicted"], b8["observed"]) == (1, pytest.approx(p), 1.0)
    assert (b1["count"], b1["mean_predicted"], b1["observed"]) == (1, pytest.approx(1 - p), 0.0)
    assert b8["lo"] == pytest.approx(0.8) and b8["hi"] == pytest.approx(0.9)
    assert cal["bins"][0]["count"] == 0 and math.isnan(cal["bins"][0]["observed"])


def test_calibration_two_pairs_and_ties():
    # pairs with r_c - r_r = +2 and -2 (one right, one wrong): predictions
    # (0.8808, 1), (0.1192, 0), (0.1192, 1), (0.8808, 0)
    # bin 8: mean 0.8808, observed 1/2; bin 1: mean 0.1192, observed 1/2
    # ece = 0.5·|0.8808 - 0.5| + 0.5·|0.1192 - 0.5| = 0.5·0.3808 + 0.5·0.3808 = 0.3808
    p = 1 / (1 + math.exp(-2))
    cal = calibration([2.0, 0.0], [0.0, 2.0])
    assert cal["ece"] == pytest.approx(p - 0.5)
    assert cal["bins"][8]["observed"] == 0.5 and cal["bins"][8]["count"] == 2
    # a tie predicts 0.5 both ways with observed 1 and 0 -> perfectly calibrated, ece 0
    tie = calibration([1.0], [1.0])
    assert tie["ece"] == pytest.approx(0.0) and tie["bins"][5]["count"] == 2
    # huge margins: p = 1.0 goes to the last bin, no overflow
    big = calibration([1000.0], [-1000.0], n_bins=4)
    assert big["bins"][3]["count"] == 1 and big["ece"] == pytest.approx(0.0)
    assert math.isnan(calibration([], [])["ece"])


def test_sequence_kl_stats():
    # [[0.1, 0.3], [0.2]]: sums 0.4 and 0.2; token mean 0.6 / 3 tokens = 0.2;
    # sequence mean (0.4 + 0.2) / 2 = 0.3; sequence max 0.4
    s = sequence_kl_stats([[0.1, 0.3], [0.2]])
    assert s["token_mean"] == pytest.approx(0.2)
    assert s["sequence_mean"] == pytest.approx(0.3)
    assert s["sequence_max"] == pytest.approx(0.4)
    assert (s["num_tokens"], s["num_sequences"]) == (3.0, 2.0)
    t = sequence_kl_stats([np.array([1.0, 1.0]), np.array([])])  # 1-D arrays or tensors
    # sums 2 and 0 over 2 tokens: token mean 1.0, sequence mean 1.0
    assert t["token_mean"] == pytest.approx(1.0) and t["sequence_mean"] == pytest.approx(1.0)
    empty = sequence_kl_stats([])
    assert math.isnan(empty["token_mean"]) and math.isnan(empty["sequence_mean"])
