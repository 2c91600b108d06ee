"""Operating characteristics of the decision rule (:func:`analyses.stats.equivalence_decisions`) on planted
effects: how often it says "holds" or "ruled out" when the truth is known.

A *family* imitates the band test's matrix of paired differences (items x tests x layers): one column per
(kind, n, layer), every column with the same planted mean ``factor x min_effect``. Kinds: ``continuous``
(normal, standard deviation :data:`SD`, like the cross-patch differences) and ``discrete`` (values in {-1, 0, 1},
:data:`NONZERO` of them non-zero, like the decoding and probe differences: one 0/1 outcome minus its control's).
Columns of one family have unequal n (:data:`SIZES`: a column with fewer items has NaN below them) and are
correlated within an item (the layers of one test share a per-item component, correlation :data:`RHO`), as in
``memory.csv``.

Rates, per planted factor (``factor`` = true mean / minimum effect):

- per column and (kind, n): the share of columns that hold, and the share ruled out (``holds`` at factor >= 1.1
  and ``ruled out`` at factor 0 are power);
- per family: ``any holds`` (at factor 0: a false "holds" somewhere in the family, the family-wise error the rule
  controls) and ``any ruled out`` (at factor >= 1.1: a layer with a true effect above the minimum falsely ruled
  out somewhere in the family).

Targets (docs/statistics.md): ``any holds`` at factor 0 and ``any ruled out`` at factor >= 1.1 each at most 5%.
``tests/test_calibration.py`` checks them on a smaller simulation; ``tests/benchmarks/bench_decision_rule.py``
runs the full one and writes the table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from bridgeprobe.analyses.stats import equivalence_decisions

FACTORS = (0.0, 0.5, 1.0, 1.1, 1.5, 2.0)
SIZES = (5, 20, 100)
KINDS = ("continuous", "discrete")
MIN_EFFECT = 0.1
SD = 0.3  # standard deviation of a continuous column (3x the minimum effect)
NONZERO = 0.3  # share of non-zero values in a discrete column (the planted mean must not exceed it)
RHO = 0.6  # correlation of one item's values across the layers of a column group
LAYERS = 5  # columns per (kind, n)


def planted_family(rng: np.random.Generator, factor: float, *, sizes: tuple[int, ...] = SIZES,
                   kinds: tuple[str, ...] = KINDS, layers: int = LAYERS, min_effect: float = MIN_EFFECT) -> np.ndarray:
    """One items x columns matrix (``max(sizes)`` rows; columns ordered kind, size, layer) whose every column has
    true mean ``factor * min_effect``; a column of size ``n`` holds values in its first ``n`` rows only."""
    items = max(sizes)
    effect = factor * min_effect
    if effect > NONZERO:
        raise ValueError(f"a discrete column cannot have mean {effect} with {NONZERO:.0%} non-zero values")
    blocks = []
    for kind in kinds:
        for size in sizes:
            shared = rng.normal(size=(items, 1))
            z = RHO * shared + np.sqrt(1 - RHO ** 2) * rng.normal(size=(items, layers))
            if kind == "continuous":
                block = effect + SD * z
            else:
                u = stats.norm.cdf(z)
                minus, plus = (NONZERO - effect) / 2, (NONZERO + effect) / 2
                block = np.where(u < minus, -1.0, np.where(u > 1 - plus, 1.0, 0.0))
            block[size:] = np.nan
            blocks.append(block)
    return np.concatenate(blocks, axis=1)


def column_labels(sizes: tuple[int, ...] = SIZES, kinds: tuple[str, ...] = KINDS, layers: int = LAYERS) -> pd.DataFrame:
    """The (kind, n) of each column of :func:`planted_family`."""
    return pd.DataFrame([(kind, size) for kind in kinds for size in sizes for _ in range(layers)],
                        columns=["kind", "n"])


def operating_characteristics(families: int, *, factors: tuple[float, ...] = FACTORS, n_resamples: int = 1999,
                              alpha: float = 0.05, seed: int = 0, sizes: tuple[int, ...] = SIZES,
                              progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulate ``families`` planted families per factor and decide each with the rule. Returns the per-column
    rates (factor, kind, n, holds, ruled_out, columns) and the family-wise rates (factor, families, any_holds,
    any_ruled_out, with their exact 95% upper bounds)."""
    from tqdm.auto import tqdm

    labels = column_labels(sizes)
    per_column, per_family = [], []
    total = len(factors) * families
    with tqdm(total=total, desc="simulated families", disable=not progress) as bar:
        for f_index, factor in enumerate(factors):
            rng = np.random.default_rng([seed, f_index])
            holds = np.zeros(len(labels))
            ruled = np.zeros(len(labels))
            any_holds = any_ruled = 0
            for family in range(families):
                matrix = planted_family(rng, factor, sizes=sizes)
                table = equivalence_decisions(matrix, MIN_EFFECT, alpha, n_resamples=n_resamples,
                                              seed=int(rng.integers(2**31)))
                holds += table["holds"].to_numpy()
                ruled += table["rules_out"].to_numpy()
                any_holds += bool(table["holds"].any())
                any_ruled += bool(table["rules_out"].any())
                bar.update(1)
            frame = labels.assign(holds=holds / families, ruled_out=ruled / families)
            grouped = frame.groupby(["kind", "n"], sort=False).mean().reset_index()
            per_column.append(grouped.assign(factor=factor, columns=families * LAYERS))
            per_family.append({"factor": factor, "families": families, "any_holds": any_holds / families,
                               "any_holds_upper": _upper(any_holds, families),
                               "any_ruled_out": any_ruled / families, "any_ruled_out_upper": _upper(any_ruled, families)})
    columns = pd.concat(per_column, ignore_index=True)[["factor", "kind", "n", "columns", "holds", "ruled_out"]]
    return columns, pd.DataFrame(per_family)


def _upper(count: int, n: int) -> float:
    """The exact one-sided 95% upper bound of a rate (Clopper-Pearson)."""
    return 1.0 if count == n else float(stats.beta.ppf(0.95, count + 1, n - count))


def tolerance(target: float, families: int, z: float = 2.33) -> float:
    """The largest observed rate that a true rate of ``target`` produces in ``families`` simulated families with
    99% probability (normal approximation to the binomial): what a simulation of that size can assert."""
    return target + z * float(np.sqrt(target * (1 - target) / families))


def markdown(columns: pd.DataFrame, families: pd.DataFrame) -> str:
    """The two tables as Markdown (docs/statistics.md)."""
    lines = ["| true mean / minimum effect | families | any column holds | any column ruled out |", "|---|---|---|---|"]
    for row in families.itertuples():
        lines.append(f"| {row.factor:g} | {row.families} | {row.any_holds:.1%} (≤ {row.any_holds_upper:.1%}) | "
                     f"{row.any_ruled_out:.1%} (≤ {row.any_ruled_out_upper:.1%}) |")
    lines += ["", "| true mean / minimum effect | kind | n | holds | ruled out |", "|---|---|---|---|---|"]
    for row in columns.itertuples():
        lines.append(f"| {row.factor:g} | {row.kind} | {row.n} | {row.holds:.1%} | {row.ruled_out:.1%} |")
    return "\n".join(lines) + "\n"
