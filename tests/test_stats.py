"""analyses.stats against scipy and textbook formulas on known cases, interval coverage by simulation, and the
decision rule on planted effects (its full operating characteristics: tests/test_calibration.py)."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from bridgeprobe.analyses import stats


def test_t_interval_matches_scipy():
    x = np.array([0.3, 1.2, -0.4, 2.2, 0.9, 1.1, 0.0])
    interval = stats.mean_interval(x, "t")
    low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (interval.estimate, interval.n) == (pytest.approx(x.mean()), 7)
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))


def _textbook_bca(x: np.ndarray, resamples: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Efron & Tibshirani (1993), eqs. 14.9-14.15, written out: bias correction from the share of bootstrap means
    below the estimate, acceleration from the jackknife, adjusted percentiles of the bootstrap distribution."""
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)
    z0 = sps.norm.ppf((boot < x.mean()).mean())
    jack = np.array([np.delete(x, i).mean() for i in range(len(x))])
    d = jack.mean() - jack
    a = (d ** 3).sum() / (6 * ((d ** 2).sum()) ** 1.5)
    z = sps.norm.ppf([(1 - confidence) / 2, (1 + confidence) / 2])
    levels = sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
    return tuple(np.quantile(boot, levels))


def test_bca_interval_matches_a_textbook_computation():
    """Our BCa (scipy underneath) against an independent implementation of the formulas on its own resamples:
    equal up to the Monte Carlo error of 19,999 resamples (a few percent of the width), and clearly not the
    percentile interval on this skewed sample (BCa shifts it right)."""
    x = np.random.default_rng(3).exponential(size=40)
    interval = stats.mean_interval(x, "bca", n_resamples=19999, seed=5)
    low, high = _textbook_bca(x, 19999, seed=11)
    width = high - low
    assert abs(interval.low - low) < 0.03 * width and abs(interval.high - high) < 0.03 * width
    percentile = stats.mean_interval(x, "percentile", n_resamples=19999, seed=5)
    assert interval.high - percentile.high > 0.03 * width  # the skewness correction is there and is measurable


def test_exact_proportion_matches_binomtest_and_does_not_collapse_at_zero():
    interval = stats.proportion_interval(12, 120)
    ci = sps.binomtest(12, 120).proportion_ci(method="exact")
    assert (interval.low, interval.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    zero = stats.proportion_interval(0, 120)
    assert zero.low == 0 and zero.high == pytest.approx(1 - 0.025 ** (1 / 120))  # the closed form at 0 of n
    assert stats.mean_interval(np.r_[np.ones(12), np.zeros(108)], "exact").high == pytest.approx(ci.high)


@pytest.mark.parametrize("method", ["t", "bca", "percentile", "exact"])
def test_no_interval_below_three_values(method):
    for values in ([1.0], [0.0, 1.0], [np.nan, 1.0, np.nan, 0.0]):
        interval = stats.mean_interval(values, method)
        assert np.isnan(interval.low) and np.isnan(interval.high)
        assert interval.n == len([v for v in values if not np.isnan(v)])
        assert "n < 3" in interval.reason and "n < 3" in interval.text()
    assert stats.mean_interval([], method).n == 0


def test_paired_difference_drops_incomplete_pairs():
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    b = np.array([0.5, np.nan, 1.0, 3.0, 3.0])
    interval = stats.paired_difference(a, b, "t")
    d = np.array([0.5, 1.0, 2.0])
    assert interval.n == 3 and interval.estimate == pytest.approx(d.mean())
    assert interval.low == pytest.approx(sps.t.interval(0.95, 2, loc=d.mean(), scale=sps.sem(d))[0])


def test_column_and_group_intervals_report_n_and_reason():
    matrix = np.array([[1.0, np.nan], [2.0, 3.0], [3.0, np.nan], [4.0, np.nan]])
    table = stats.column_intervals(matrix, "t")
    assert table["n"].tolist() == [4, 1]
    assert np.isnan(table.loc[1, "ci_low"]) and table.loc[1, "reason"] == stats.TOO_FEW
    assert table.loc[0, "ci_low"] < 2.5 < table.loc[0, "ci_high"]


def test_column_intervals_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    matrix = np.c_[rng.normal(size=30), rng.integers(0, 2, 30), np.zeros(30), np.full(30, 2.0), rng.normal(size=30)]
    matrix[3:, 4] = np.nan
    matrix[::4, 0] = np.nan
    for method in ("auto", "t"):
        table = stats.column_intervals(matrix, method)
        for j in range(matrix.shape[1]):
            which = "exact" if method == "auto" and j in (1, 2) else "t"
            one = stats.mean_interval(matrix[:, j], which)
            assert table.loc[j, "n"] == one.n and table.loc[j, "reason"] == one.reason, (method, j)
            for got, want in ((table.loc[j, "ci_low"], one.low), (table.loc[j, "ci_high"], one.high)):
                assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want), (method, j)
    bca = stats.column_intervals(matrix[:, :1], "bca", n_resamples=999)
    assert bca.loc[0, "ci_low"] == pytest.approx(stats.mean_interval(matrix[:, 0], "bca", n_resamples=999).low)


@pytest.mark.parametrize("method,resamples", [("t", 0), ("bca", 999), ("percentile", 999)])
def test_95_percent_intervals_cover_the_true_mean(method, resamples):
    rng = np.random.default_rng(11)
    kwargs = {"n_resamples": resamples} if resamples else {}
    hits = [stats.mean_interval(rng.normal(0.7, 2.0, 40), method, seed=i, **kwargs) for i in range(300)]
    coverage = np.mean([i.low <= 0.7 <= i.high for i in hits])
    assert 0.92 <= coverage <= 0.98, coverage


def test_exact_rate_intervals_cover_at_least_nominal():
    rng = np.random.default_rng(12)
    coverage = np.mean([(lambda i: i.low <= 0.1 <= i.high)(stats.proportion_interval(int(rng.binomial(60, 0.1)), 60))
                        for _ in range(400)])
    assert 0.94 <= coverage <= 0.995, coverage


def test_sign_test_and_signflip_match_exact_references():
    d = np.array([0.4, 1.1, -0.2, 0.8, 0.0, 1.5, 0.3, -0.1, 0.9])
    p, n = stats.sign_test(d, "greater")
    assert n == 8 and p == pytest.approx(sps.binomtest(6, 8, 0.5, alternative="greater").pvalue)
    x = d[d != 0]
    flips = np.array(list(itertools.product((-1, 1), repeat=len(x))))
    exact = np.mean((flips * x).mean(1) >= x.mean() - 1e-12)
    assert stats.signflip_test(x, "greater") == pytest.approx(exact)  # 2**8 < resamples: scipy enumerates
    assert [stats.signflip_test([0.3], a) for a in ("greater", "less", "two-sided")] == [0.5, 1.0, 1.0]
    assert stats.fisher_test(12, 120, 0, 120, "greater") == pytest.approx(
        sps.fisher_exact([[12, 108], [0, 120]], alternative="greater").pvalue)


def test_single_column_bounds_match_the_one_sided_t_bounds_for_large_normal_samples():
    """With one column there is no multiplicity: the bounds are the 95% one-sided bounds, which for 2,000 normal
    values the studentized sign-flip distribution and Student t agree on (independent: scipy's t)."""
    x = np.random.default_rng(5).normal(0.3, 1.0, 2000)
    row = stats.equivalence_decisions(x, 0.1, n_resamples=9999).iloc[0]
    se = sps.sem(x)
    assert row["upper"] == pytest.approx(x.mean() + sps.t.ppf(0.95, len(x) - 1) * se, abs=0.1 * se)
    assert row["lower"] == pytest.approx(x.mean() - sps.t.ppf(0.95, len(x) - 1) * se, abs=0.1 * se)
    assert row["holds"] and not row["rules_out"]


def test_decisions_use_the_estimate_near_the_threshold():
    """200 items, sd 0.3, minimum 0.1, 20 data sets: a true mean of 0.15 holds, 0 is ruled out and never holds,
    and 0.11 (just above the minimum) is never ruled out: the old power-only rule ruled a true 0.11 out in 22% of
    runs."""
    rng = np.random.default_rng(9)
    counts = np.zeros((3, 2), dtype=int)  # (0.15, 0, 0.11) x (holds, rules_out)
    for seed in range(20):
        m = np.column_stack([rng.normal(mu, 0.3, 200) for mu in (0.15, 0.0, 0.11)])
        table = stats.equivalence_decisions(m, 0.1, n_resamples=1999, seed=seed)
        counts += table[["holds", "rules_out"]].to_numpy()
    assert counts[0, 0] >= 15 and counts[0, 1] == 0
    assert counts[1, 1] >= 15 and counts[1, 0] == 0
    assert counts[2, 1] == 0


def test_columns_with_few_items_widen_only_their_own_bounds():
    """The failure of one max-T critical value: identical null data in 40 columns of 200 items gave "undecided"
    with 5 extra items in some columns and "no band" with 2. Now the big columns' bounds barely move with the
    small columns, and the small columns decide nothing."""
    rng = np.random.default_rng(2)
    big = rng.normal(0, 0.2, (200, 40))
    small = np.full((200, 10), np.nan)
    small[:5] = rng.normal(0, 0.2, (5, 10))
    with_five = stats.equivalence_decisions(np.hstack([big, small]), 0.1, n_resamples=4999)
    with_two = stats.equivalence_decisions(np.hstack([big, np.where(np.arange(200)[:, None] < 2, small, np.nan)]),
                                           0.1, n_resamples=4999)
    np.testing.assert_allclose(with_five["upper"][:40], with_two["upper"][:40], rtol=0.05)
    assert with_five["rules_out"][:40].all() and with_two["rules_out"][:40].all()
    assert not with_five["rules_out"][40:].any() and not with_five["holds"][40:].any()
    assert with_two["n"][40:].eq(2).all() and with_two["upper"][40:].isna().all()


def test_constant_columns_are_not_precise_below_the_items_that_make_them_so():
    """A column of equal values (no item decodes either entity) has the standard error of one item in n
    differing by 1: 100 zeros rule an effect of 0.1 out, 5 zeros do not."""
    m = np.full((100, 2), 0.0)
    m[5:, 1] = np.nan
    table = stats.equivalence_decisions(m, 0.1, n_resamples=1999)
    assert table.loc[0, "rules_out"] and table.loc[0, "se"] == pytest.approx(0.01)
    assert not table.loc[1, "rules_out"] and table.loc[1, "upper"] > 0.1


def test_n_to_decide_is_the_size_at_which_the_bound_clears():
    """An undecided column with mean 0.05 and sd 0.3 among 30 items: the predicted n would put its upper bound at
    the minimum (normal approximation at the family's level), checked by deciding a sample of that size."""
    x = np.random.default_rng(4).normal(0, 1, 30)
    x = 0.05 + 0.3 * (x - x.mean()) / x.std(ddof=1)
    row = stats.equivalence_decisions(x, 0.1, n_resamples=9999).iloc[0]
    assert not row["rules_out"] and not row["holds"]
    needed = int(row["n_to_decide"])
    assert needed == pytest.approx((sps.norm.ppf(0.95) * 0.3 / 0.05) ** 2, rel=0.1)
    y = np.random.default_rng(5).normal(0, 1, needed + 40)
    y = 0.05 + 0.3 * (y - y.mean()) / y.std(ddof=1)
    assert stats.equivalence_decisions(y, 0.1, n_resamples=9999).iloc[0]["rules_out"]


def test_grouped_t_intervals_equal_one_at_a_time():
    import pandas as pd

    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"g": rng.integers(0, 6, 80), "v": rng.normal(size=80)})
    frame.loc[frame["g"] == 5, "v"] = 1.0  # constant group
    frame = pd.concat([frame, pd.DataFrame({"g": [9, 9], "v": [0.0, 1.0]})])  # two values: no interval
    table = stats.group_intervals(frame.groupby("g")["v"], "t").set_index("g")
    for g, values in frame.groupby("g")["v"]:
        one = stats.mean_interval(values.to_numpy(), "t")
        assert table.loc[g, "n"] == one.n and table.loc[g, "mean"] == pytest.approx(one.estimate)
        assert table.loc[g, "reason"] == one.reason
        if np.isnan(one.low):
            assert np.isnan(table.loc[g, "ci_low"])
        else:
            assert (table.loc[g, "ci_low"], table.loc[g, "ci_high"]) == (pytest.approx(one.low), pytest.approx(one.high))


def test_vectorized_proportion_intervals_equal_binomtest():
    k, n = np.array([0, 3, 12, 60, 1]), np.array([120, 10, 120, 60, 2])
    low, high = stats.proportion_intervals(k, n)
    for i in range(4):
        one = stats.proportion_interval(int(k[i]), int(n[i]))
        assert (low[i], high[i]) == (pytest.approx(one.low), pytest.approx(one.high))
    assert np.isnan(low[4]) and np.isnan(high[4])
