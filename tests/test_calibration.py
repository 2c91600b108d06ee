"""The decision rule's error rates on planted effects (analyses.calibration), at a size the default run can
afford: the full table in docs/statistics.md comes from tests/benchmarks/bench_decision_rule.py."""

import numpy as np
import pytest

from bridgeprobe.analyses import calibration

FAMILIES = 200


@pytest.fixture(scope="module")
def simulated():
    return calibration.operating_characteristics(FAMILIES, factors=(0.0, 1.1, 2.0), n_resamples=499, seed=7)


def test_false_holds_and_false_ruled_out_stay_within_target(simulated):
    """Targets: a false "holds" anywhere in a family with no effect, and a false "ruled out" anywhere in a family
    whose every column is 10% above the minimum effect, each at most 5%; the tolerance is the rate a true 5%
    stays under in 99% of simulations of this size."""
    _, families = simulated
    limit = calibration.tolerance(0.05, FAMILIES)
    by_factor = families.set_index("factor")
    assert by_factor.loc[0.0, "any_holds"] <= limit
    assert by_factor.loc[1.1, "any_ruled_out"] <= limit
    assert by_factor.loc[2.0, "any_ruled_out"] <= limit


def test_the_rule_has_power_where_the_items_allow_it(simulated):
    """With 100 continuous items (sd 3x the minimum effect) a null is ruled out and a doubled effect holds in most
    columns; with 5 items nothing is decided either way."""
    columns, _ = simulated
    at = columns.set_index(["factor", "kind", "n"])
    assert at.loc[(0.0, "continuous", 100), "ruled_out"] > 0.5
    assert at.loc[(2.0, "continuous", 100), "holds"] > 0.9
    assert at.loc[(2.0, "discrete", 100), "holds"] > 0.5
    for kind in calibration.KINDS:
        assert at.loc[(2.0, kind, 5), "holds"] < 0.05 and at.loc[(0.0, kind, 5), "ruled_out"] < 0.05


def test_planted_families_have_the_planted_mean_and_sizes():
    """The simulation plants what it says: column means near factor x minimum effect (over many families), NaN
    below each column's n, and discrete columns in {-1, 0, 1} with the stated share of non-zero values."""
    rng = np.random.default_rng(0)
    stack = np.stack([calibration.planted_family(rng, 1.5) for _ in range(400)])
    labels = calibration.column_labels()
    means = np.nanmean(stack, axis=(0, 1))
    np.testing.assert_allclose(means, 0.15, atol=0.02)
    for j, (kind, n) in enumerate(labels.itertuples(index=False)):
        assert np.isnan(stack[:, n:, j]).all() and not np.isnan(stack[:, :n, j]).any()
        if kind == "discrete":
            values = stack[:, :n, j]
            assert set(np.unique(values)) <= {-1.0, 0.0, 1.0}
            assert np.mean(values != 0) == pytest.approx(calibration.NONZERO, abs=0.05)
