"""The statistics every report uses: intervals with their n, paired differences, exact tests, and a sign-flip
test with the max statistic that controls the family-wise error over many columns.

Rules (docs/statistics.md):
- every interval comes with the n it rests on; below :data:`MIN_N` values no interval is given (NaN bounds and a
  ``reason``), because a bootstrap or t interval from one or two values is not an interval;
- means of continuous values: BCa bootstrap (:func:`scipy.stats.bootstrap`, :data:`N_RESAMPLES` resamples,
  seeded) or a Student t interval (:func:`mean_interval`, ``method``); rates of 0/1 values: the exact
  Clopper-Pearson interval (:func:`scipy.stats.binomtest`), which does not collapse to [0, 0] at 0 of n the way a
  bootstrap does;
- paired differences (bridge minus its control on the same item) drop items missing either value
  (:func:`paired_difference`); exact tests: sign test (binomial), Fisher's exact test, and a paired sign-flip
  permutation test;
- many columns at once (layers x tests x positions), a decision per column that uses the estimate
  (:func:`equivalence_decisions`): family-wise simultaneous lower and upper bounds, each column calibrated on its own resampling distribution and the columns combined by the
  single-step min-p rule (Westfall & Young 1993, ch. 2), so a column with few items widens its own bounds only
  (one max-T critical value for all, the rule this replaced, let the columns with few items set it for all).
  "holds" needs the lower bound above 0 and the estimate at least the minimum effect; "ruled out" needs the upper
  bound below the minimum effect (an equivalence decision); anything else is undecided.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy import stats

MIN_N = 3
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0
TOO_FEW = f"n < {MIN_N}: no interval"
Method = Literal["bca", "percentile", "t", "exact"]


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval and the number of values behind it; ``reason`` says why bounds are NaN."""

    estimate: float
    low: float
    high: float
    n: int
    method: str
    reason: str = ""

    def as_dict(self, prefix: str = "") -> dict[str, float | int | str]:
        names = {"estimate": "mean", "low": "ci_low", "high": "ci_high"}
        return {f"{prefix}{names.get(k, k)}": v for k, v in asdict(self).items()}

    def text(self, pct: bool = False, digits: int = 2) -> str:
        """``0.12 [0.05, 0.20] (n = 40)``; without an interval, the reason."""
        f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.{digits}f}")
        if np.isnan(self.estimate):
            return f"n/a (n = {self.n})"
        if np.isnan(self.low):
            return f"{f(self.estimate)} (n = {self.n}; {self.reason})"
        return f"{f(self.estimate)} [{f(self.low)}, {f(self.high)}] (n = {self.n})"


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    return values[~np.isnan(values)]


def mean_interval(values: Sequence[float] | np.ndarray, method: Method = "bca", confidence: float = CONFIDENCE,
                  n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of the non-NaN ``values`` with a two-sided interval: ``bca`` / ``percentile`` bootstrap, ``t``
    (Student), or ``exact`` (Clopper-Pearson; the values must be 0/1). NaN bounds below :data:`MIN_N` values;
    a constant sample gets the degenerate interval [mean, mean] (a bootstrap cannot do better, and says so)."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return Interval(np.nan, np.nan, np.nan, 0, method, "no values")
    estimate = float(x.mean())
    if n < MIN_N:
        return Interval(estimate, np.nan, np.nan, n, method, TOO_FEW)
    if method == "exact":
        if not np.isin(x, (0.0, 1.0)).all():
            raise ValueError("exact intervals need 0/1 values")
        return proportion_interval(int(x.sum()), n, confidence)
    if np.ptp(x) == 0:
        return Interval(estimate, estimate, estimate, n, method, "all values equal")
    if method == "t":
        low, high = stats.t.interval(confidence, n - 1, loc=estimate, scale=stats.sem(x))
        return Interval(estimate, float(low), float(high), n, method)
    result = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method=method,
                             vectorized=True, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(estimate, float(low), float(high), n, method)


def proportion_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """A rate ``successes / n`` with its exact (Clopper-Pearson) interval; NaN bounds below :data:`MIN_N`."""
    if n == 0:
        return Interval(np.nan, np.nan, np.nan, 0, "exact", "no values")
    if n < MIN_N:
        return Interval(successes / n, np.nan, np.nan, n, "exact", TOO_FEW)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="exact")
    return Interval(successes / n, float(ci.low), float(ci.high), n, "exact")


def proportion_intervals(successes: np.ndarray | pd.Series, n: np.ndarray | pd.Series,
                         confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson bounds for many rates at once (the beta quantiles :func:`proportion_interval` uses);
    NaN where ``n`` is below :data:`MIN_N`."""
    k, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    alpha = 1 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    few = n < MIN_N
    return np.where(few, np.nan, low), np.where(few, np.nan, high)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, method: Method = "bca",
                      **kwargs: float) -> Interval:
    """Mean of ``a - b`` over the pairs where both are present, with its interval (``method`` as
    :func:`mean_interval`; ``exact`` is not defined for differences and falls back to ``bca``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return mean_interval(a - b, "bca" if method == "exact" else method, **kwargs)


def column_intervals(matrix: np.ndarray | pd.DataFrame, method: Method | Literal["auto"] = "auto",
                     **kwargs: float) -> pd.DataFrame:
    """:func:`mean_interval` of every column of an items x columns matrix (NaN = missing): a table with
    ``mean``, ``ci_low``, ``ci_high``, ``n``, ``reason``, one row per column. ``auto``: ``exact`` for a column of
    0/1 values, ``t`` otherwise; ``t``, ``exact`` and ``auto`` are computed for all columns at once (the same
    numbers as one at a time), the bootstrap column by column."""
    values = np.asarray(matrix, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if method in ("t", "exact", "auto"):
        table = _vector_intervals(values, method, kwargs.get("confidence", CONFIDENCE))
    else:
        table = pd.DataFrame([mean_interval(values[:, j], method, **kwargs).as_dict() for j in range(values.shape[1])],
                             columns=["mean", "ci_low", "ci_high", "n", "method", "reason"]).drop(columns="method")
    if isinstance(matrix, pd.DataFrame):
        table.index = matrix.columns
    return table


def _vector_intervals(values: np.ndarray, method: str, confidence: float) -> pd.DataFrame:
    valid = ~np.isnan(values)
    filled = np.where(valid, values, 0.0)
    n = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(0) / n
        sd = np.sqrt(((filled - mean) ** 2 * valid).sum(0) / (n - 1))
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
    binary = ((filled == 0) | (filled == 1)).all(0)
    if method == "exact" and not binary[n > 0].all():
        raise ValueError("exact intervals need 0/1 values")
    exact = binary if method == "auto" else np.full(len(n), method == "exact")
    k_low, k_high = proportion_intervals(np.round(filled.sum(0)), n, confidence)
    equal = ~exact & (np.nan_to_num(sd) == 0)
    low = np.where(exact, k_low, np.where(equal, mean, mean - half))
    high = np.where(exact, k_high, np.where(equal, mean, mean + half))
    few = n < MIN_N
    reason = np.where(n == 0, "no values", np.where(few, TOO_FEW, np.where(equal & ~few, "all values equal", "")))
    return pd.DataFrame({"mean": np.where(n > 0, mean, np.nan), "ci_low": np.where(few, np.nan, low),
                         "ci_high": np.where(few, np.nan, high), "n": n, "reason": reason})


def group_intervals(grouped: pd.core.groupby.SeriesGroupBy, method: Method = "t", **kwargs: float) -> pd.DataFrame:
    """:func:`mean_interval` per group of a grouped Series: the group keys as columns, then ``mean``, ``ci_low``,
    ``ci_high``, ``n``, ``reason`` (``t``: computed for all groups at once, the same numbers)."""
    if method == "t":
        table = pd.DataFrame({"mean": grouped.mean(), "sem": grouped.sem(), "n": grouped.count()})
        half = stats.t.ppf(0.5 + kwargs.get("confidence", CONFIDENCE) / 2, table["n"] - 1) * table["sem"]
        enough = table["n"] >= MIN_N
        half = half.where(enough).where(table["sem"] > 0, 0.0).where(enough)
        table["ci_low"], table["ci_high"] = table["mean"] - half, table["mean"] + half
        table["reason"] = np.where(table["n"] == 0, "no values", np.where(enough, np.where(
            table["sem"] > 0, "", "all values equal"), TOO_FEW))
        return table.drop(columns="sem").reset_index()
    rows = []
    for key, values in grouped:
        key = key if isinstance(key, tuple) else (key,)
        interval = mean_interval(values.to_numpy(), method, **kwargs)
        rows.append((*key, interval.estimate, interval.low, interval.high, interval.n, interval.reason))
    names = list(grouped.keys) if isinstance(grouped.keys, list) else [grouped.keys]
    return pd.DataFrame(rows, columns=[*names, "mean", "ci_low", "ci_high", "n", "reason"])


# --------------------------------------------------------------------------------------------------- tests


def sign_test(differences: Sequence[float] | np.ndarray, alternative: str = "two-sided") -> tuple[float, int]:
    """Exact sign test (binomial, p = 1/2) on the non-zero, non-NaN paired differences: ``(p, n used)``."""
    x = _clean(differences)
    x = x[x != 0]
    if len(x) == 0:
        return 1.0, 0
    return float(stats.binomtest(int((x > 0).sum()), len(x), 0.5, alternative=alternative).pvalue), len(x)


def fisher_test(successes_a: int, n_a: int, successes_b: int, n_b: int, alternative: str = "two-sided") -> float:
    """Fisher's exact test of two independent rates ``successes / n``."""
    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    return float(stats.fisher_exact(table, alternative=alternative).pvalue)


def signflip_test(differences: Sequence[float] | np.ndarray, alternative: str = "greater",
                  n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float:
    """Paired permutation (sign-flip) test of mean difference 0 (:func:`scipy.stats.permutation_test`, exact when
    ``2**n`` is at most ``n_resamples``)."""
    x = _clean(differences)
    if len(x) == 0:
        return 1.0
    if len(x) == 1:  # two sign patterns (scipy needs two values): the observed one and its flip
        extreme = {"greater": x[0] > 0, "less": x[0] < 0, "two-sided": False}[alternative]
        return 0.5 if extreme else 1.0
    result = stats.permutation_test((x,), np.mean, permutation_type="samples", alternative=alternative,
                                    n_resamples=n_resamples, vectorized=True, rng=np.random.default_rng(seed))
    return float(result.pvalue)


def _studentized(centered: np.ndarray, squares: np.ndarray, n: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Studentized means of the sign-flipped centered columns (``[resamples, columns]``), the standard error
    floored at ``1/n`` as in :func:`equivalence_decisions`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (signs @ centered) / n
        se = np.sqrt(np.maximum(squares - n * mean ** 2, 0.0) / (n - 1) / n)
        return mean / np.maximum(se, 1 / n)


def _tail_probabilities(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per column, the share of the column's resampled statistics (``ordered``, sorted ascending) at least as large
    as each of ``values`` (``[k, columns]``)."""
    resamples = ordered.shape[0]
    return np.stack([(resamples - np.searchsorted(ordered[:, j], values[:, j], side="left")) / resamples
                     for j in range(ordered.shape[1])], axis=1)


def _minp_level(minima: np.ndarray, alpha: float) -> float:
    """The per-column tail level of the single-step min-p rule: just below the smallest value of ``minima`` (each
    resample's smallest tail probability over the columns) that more than a share ``alpha`` of the resamples
    reach, so that at most that share of them has a column beyond its critical value; never above ``alpha``
    itself (one column alone is tested at ``alpha``)."""
    ordered = np.sort(minima)
    allowed = int(np.floor(alpha * len(ordered)))
    if allowed >= len(ordered):
        return alpha
    return float(min(np.nextafter(ordered[allowed], 0.0), alpha))


def _critical_values(ordered: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ``1 - level`` quantile of its resampled statistics (``ordered``, sorted ascending): at most
    a share ``level`` of them lie strictly above it, so a statistic above it has a tail probability of at most
    ``level`` (and the min-p rule bounds the chance of that happening in any column)."""
    resamples = ordered.shape[0]
    return ordered[min(max(int(np.ceil(resamples * (1 - level) - 1e-9)) - 1, 0), resamples - 1)]


def equivalence_decisions(matrix: np.ndarray | pd.DataFrame, min_effect: float | Sequence[float], alpha: float = 0.05,
                          n_resamples: int = N_RESAMPLES, seed: int = SEED, chunk: int = 1000) -> pd.DataFrame:
    """Decide every column of an items x columns matrix of paired differences (NaN = the item has no value there):
    does its mean reach ``min_effect`` (one per column, or one for all), is it ruled out, or can the items not
    tell?

    Per column: ``mean``, ``n``, ``se`` (the standard error, at least ``1/n``: a column of equal values, e.g. 11
    items none of which decodes either entity, carries at least the uncertainty of one item differing by 1),
    family-wise one-sided bounds ``lower`` and ``upper``, ``p_adjusted`` (of a mean of 0 or less), then ``holds``
    (``lower > 0`` and ``mean >= min_effect``), ``rules_out`` (``upper < min_effect``, an equivalence decision)
    and, for an undecided column, ``n_to_decide``: the items at which the bound that could decide it would clear
    its threshold if the mean and spread stayed as they are (normal approximation at the family's per-column
    level).

    Bounds: the distribution of each column's studentized mean is approximated by flipping the signs of each
    item's centered row, all columns at once (which keeps their dependence; a wild bootstrap with Rademacher
    weights), ``n_resamples`` times. Each column gets critical values from its own distribution, at one per-column
    tail level chosen by the single-step min-p rule (Westfall & Young 1993) so that the chance of *any* lower bound
    lying above its column's true mean is at most ``alpha``; the same, separately, for the upper bounds. A column
    with few items thus widens its own bounds only, not everyone's (as one max-T critical value would). Columns
    with fewer than :data:`MIN_N` values decide nothing. Operating characteristics on planted effects:
    :mod:`analyses.calibration` and docs/statistics.md."""
    values = np.asarray(matrix, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    columns = values.shape[1]
    effect = np.broadcast_to(np.asarray(min_effect, dtype=float), (columns,))
    valid = ~np.isnan(values)
    n = valid.sum(0)
    usable = np.flatnonzero(n >= MIN_N)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, values, 0.0).sum(0) / n
        centered = np.where(valid, values - mean, 0.0)
        squares = (centered ** 2).sum(0)
        se = np.maximum(np.sqrt(squares / (n - 1) / n), 1 / n)
    lower, upper, p_adjusted = np.full(columns, np.nan), np.full(columns, np.nan), np.ones(columns)
    c_low, c_high = np.full(columns, np.nan), np.full(columns, np.nan)
    z_low = z_high = np.nan  # the normal quantiles of the per-column levels: n_to_decide extrapolates with them
    if len(usable):
        rng = np.random.default_rng(seed)
        pivots = np.empty((n_resamples, len(usable)))
        for start in range(0, n_resamples, chunk):
            signs = rng.choice((-1.0, 1.0), size=(min(chunk, n_resamples - start), values.shape[0]))
            pivots[start : start + len(signs)] = _studentized(centered[:, usable], squares[usable], n[usable], signs)
        for sign, critical in ((1.0, c_high), (-1.0, c_low)):
            ordered = np.sort(sign * pivots, axis=0)
            minima = _tail_probabilities(ordered, sign * pivots).min(axis=1)
            level = _minp_level(minima, alpha)
            # never below Student t's critical value at the same level: the sign-flip distribution of a skewed,
            # discrete column of a few dozen items is too short-tailed on one side (docs/statistics.md)
            critical[usable] = np.maximum(_critical_values(ordered, level),
                                          stats.t.isf(level, n[usable] - 1) if level > 0 else np.inf)
            z = float(stats.norm.isf(level)) if level > 0 else np.inf
            z_high, z_low = (z, z_low) if sign > 0 else (z_high, z)
            if sign > 0:  # adjusted p of "mean <= 0": share of resamples whose smallest tail probability reaches it
                own = _tail_probabilities(ordered, (mean[usable] / se[usable])[None])[0]
                p_adjusted[usable] = (1 + np.searchsorted(np.sort(minima), own, side="right")) / (1 + n_resamples)
        lower[usable] = mean[usable] - c_high[usable] * se[usable]
        upper[usable] = mean[usable] + c_low[usable] * se[usable]
    decides = n >= MIN_N
    holds = decides & (lower > 0) & (mean >= effect)
    rules_out = decides & (upper < effect)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        reaching = mean >= effect  # it can only hold; otherwise it can only be ruled out
        gap = np.where(reaching, mean, effect - mean)
        needed = np.ceil((np.where(reaching, z_high, z_low) * se * np.sqrt(n) / gap) ** 2)
    undecided = decides & ~holds & ~rules_out & np.isfinite(needed) & (gap > 0)
    table = pd.DataFrame({"mean": mean, "n": n, "se": np.where(n > 0, se, np.nan), "lower": lower, "upper": upper,
                          "p_adjusted": p_adjusted, "min_effect": effect, "holds": holds, "rules_out": rules_out,
                          "n_to_decide": np.where(undecided, np.maximum(needed, n + 1), np.nan)})
    if isinstance(matrix, pd.DataFrame):
        table.index = matrix.columns
    return table
