"""eval/stats.py against values from statistical tables and hand computation."""

import math

import pytest

from alignkit.eval.stats import (binomial_interval, bootstrap_interval, mean_interval,
                                 paired_comparison, t_quantile, t_sf_two_sided)


@pytest.mark.parametrize("p,df,expected", [
    (0.975, 1, 12.706205), (0.975, 3, 3.182446), (0.975, 10, 2.228139),
    (0.975, 30, 2.042272), (0.95, 5, 2.015048), (0.025, 3, -3.182446), (0.975, 1e6, 1.959966),
])
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-5)


def test_t_two_sided_tail_matches_tables():
    assert t_sf_two_sided(2.0, 10) == pytest.approx(0.073388, abs=1e-5)
    assert t_sf_two_sided(-2.0, 10) == pytest.approx(0.073388, abs=1e-5)
    assert t_sf_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-9)      # Cauchy: P(|T|>1) = 1/2
    assert t_sf_two_sided(0.0, 7) == pytest.approx(1.0)


def test_mean_interval_by_hand_and_by_group():
    iv = mean_interval([1, 2, 3, 4])
    # mean 2.5, s = sqrt(5/3), se = s/2 = 0.645497, t(3) = 3.182446
    assert (iv.mean, iv.n) == (2.5, 4)
    assert iv.se == pytest.approx(0.645497, abs=1e-6)
    assert iv.hi - iv.mean == pytest.approx(3.182446 * 0.645497, abs=1e-5)
    # two prompts with 2 samples each: the interval rests on the 2 prompt means (1.5 and 3.5)
    g = mean_interval([1, 2, 3, 4], groups=["a", "a", "b", "b"])
    assert (g.mean, g.n) == (2.5, 2)
    assert g.se == pytest.approx(1.0)
    assert g.hi == pytest.approx(2.5 + 12.706205, abs=1e-4)
    one = mean_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.lo)


def test_wilson_interval_by_hand():
    iv = binomial_interval(8, 10)
    assert iv.mean == 0.8
    assert (iv.lo, iv.hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    zero = binomial_interval(0, 20)
    assert zero.lo == pytest.approx(0.0, abs=1e-12) and zero.hi == pytest.approx(0.1611, abs=1e-4)


def test_paired_comparison_removes_shared_prompt_variance():
    # prompts differ a lot (0, 10, 20, 30), b is a + 1 on each with small noise: clearly better
    a = [0.0, 10.0, 20.0, 30.0]
    b = [1.1, 10.9, 21.0, 31.0]
    pc = paired_comparison(a, b)
    assert pc.verdict == "better" and pc.diff.mean == pytest.approx(1.0)
    assert pc.p_value < 0.001
    # unpaired intervals overlap completely: the pairing is what decides
    assert mean_interval(b).lo < mean_interval(a).hi
    flat = paired_comparison([1, 2, 3], [1.5, 1.5, 3.0])
    assert flat.verdict == "not distinguishable"
    worse = paired_comparison(b, a)
    assert worse.verdict == "worse"


def test_paired_comparison_with_several_samples_per_prompt():
    a = [0, 0, 1, 1, 2, 2]
    ga = ["p", "p", "q", "q", "r", "r"]
    b = [1, 2, 3, 1, 2, 3]           # per prompt: p 1, q 2, r 3 -> diffs 1, 1, 1
    gb = ["p", "q", "r", "p", "q", "r"]
    pc = paired_comparison(a, b, ga, gb)
    assert pc.diff.mean == pytest.approx(1.0) and pc.diff.n == 3
    assert pc.diff.se == 0.0 and pc.verdict == "better" and pc.p_value == 0.0


def test_bootstrap_interval_covers_and_is_seeded():
    data = [0.1 * i for i in range(20)]
    stat = lambda idx: sum(data[i] for i in idx) / len(idx)
    iv = bootstrap_interval(stat, len(data), seed=3)
    assert iv.mean == pytest.approx(0.95)
    t = mean_interval(data)
    assert iv.lo == pytest.approx(t.lo, abs=0.08) and iv.hi == pytest.approx(t.hi, abs=0.08)
    assert bootstrap_interval(stat, len(data), seed=3) == iv
