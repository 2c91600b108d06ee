"""analyses.stats against scipy on known cases, interval coverage and family-wise error by simulation."""

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


def test_bca_interval_matches_scipy_bootstrap():
    x = np.random.default_rng(3).exponential(size=40)
    interval = stats.mean_interval(x, "bca", n_resamples=1999, seed=5)
    ref = sps.bootstrap((x,), np.mean, n_resamples=1999, method="BCa", rng=np.random.default_rng(5))
    assert interval.low == pytest.approx(ref.confidence_interval.low)
    assert interval.high == pytest.approx(ref.confidence_interval.high)
    assert interval.low < x.mean() < interval.high


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
    assert stats.fisher_test(12, 120, 0, 120, "greater") == pytest.approx(
        sps.fisher_exact([[12, 108], [0, 120]], alternative="greater").pvalue)


def test_maxt_statistics_match_scipy_t_and_detect_a_real_effect():
    rng = np.random.default_rng(4)
    m = rng.normal(0, 1, (60, 20))
    m[:, 3] += 1.0
    m[:7, 5] = np.nan
    table = stats.maxt_signflip(m, n_resamples=1999)
    assert table.loc[3, "t"] == pytest.approx(sps.ttest_1samp(m[:, 3], 0).statistic)
    assert table.loc[5, "t"] == pytest.approx(sps.ttest_1samp(m[7:, 5], 0).statistic)
    assert table.loc[5, "n"] == 53
    assert table.loc[3, "p_adjusted"] < 0.001
    assert (table.drop(index=3)["p_adjusted"] > 0.05).all()


def test_maxt_adjusted_p_is_never_below_the_single_column_p():
    m = np.random.default_rng(8).normal(0.2, 1, (30, 12))
    table = stats.maxt_signflip(m, n_resamples=1999)
    single = [stats.signflip_test(m[:, j], "greater", n_resamples=1999) for j in range(12)]
    assert (table["p_adjusted"].to_numpy() >= np.array(single) - 0.01).all()


def test_maxt_controls_family_wise_error_on_null_data():
    """200 null data sets of 20 items x 30 correlated columns: the share with any rejection at 5% stays near 5%
    (an uncorrected test per column would reject in most of them)."""
    rng = np.random.default_rng(21)
    any_max, any_raw = [], []
    for i in range(200):
        shared = rng.normal(size=(20, 1))
        m = 0.6 * shared + 0.8 * rng.normal(size=(20, 30))
        any_max.append((stats.maxt_signflip(m, n_resamples=499, seed=i)["p_adjusted"] < 0.05).any())
        any_raw.append((sps.ttest_1samp(m, 0, alternative="greater").pvalue < 0.05).any())
    assert 0.02 <= np.mean(any_max) <= 0.085, np.mean(any_max)
    assert np.mean(any_raw) > 0.3


def test_maxt_columns_with_too_few_values_take_no_part():
    m = np.random.default_rng(1).normal(1.0, 0.1, (10, 3))
    m[2:, 1] = np.nan
    table = stats.maxt_signflip(m, n_resamples=499)
    assert table.loc[1, "p_adjusted"] == 1.0 and table.loc[1, "n"] == 2
    assert table.loc[0, "p_adjusted"] < 0.01


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
