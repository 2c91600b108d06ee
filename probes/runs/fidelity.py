"""Quantized fidelity: how far a lower-precision copy of a model moves the probe results of a reference copy.

The same prompts and pairs are probed with the model in a reference dtype (fp32/bf16) and in each variant
(bitsandbytes 8-bit / 4-bit nf4, or another dtype); :func:`compare_lens` and :func:`compare_patching` join the two
runs' long tables row for row and say how much the numbers a conclusion rests on move:

- lens: Spearman correlation of the target's rank; max and mean absolute difference of its log-probability and
  of ``log10(1 + rank)``; agreement on whether the target is top-1 and top-10; agreement on the layer where each
  query's target ranks best (its "peak layer"). Over all rows, and per layer.
- patching: Spearman correlation of the normalized recovery ``value`` over all cells and over the cells that
  carry at least a tenth of the effect in the reference (``|value| >= 0.1``: most cells are near 0, where the
  order is noise), and its Pearson correlation; its max and mean absolute difference, and the raw metric's
  (logit difference); agreement on the top cell (largest recovery) of each pair and site. Over all rows, and
  per site.

Spearman is the Pearson correlation of average ranks (ties share their mean rank).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

LENS_KEYS = ["prompt_id", "prompt_kind", "target", "layer", "position"]
PATCH_KEYS = ["clean_id", "site", "layer", "position", "head"]
COLUMNS = ("variant", "probe", "site", "layer", "statistic", "value", "n_rows")
LARGE = 0.1  # a patching cell that recovers at least this much of the logit difference


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation of two aligned series (NaN when either is constant)."""
    a, b = pd.Series(np.asarray(a, dtype=float)), pd.Series(np.asarray(b, dtype=float))
    return float(a.rank().corr(b.rank()))


def _join(reference: pd.DataFrame, variant: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of both runs side by side (``_ref`` / ``_var`` suffixes); an error when the keys differ."""
    def keyed(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        if "head" in keys:
            frame["head"] = frame["head"].fillna(-1)  # site cells have no head
        return frame
    joined = keyed(reference).merge(keyed(variant), on=list(keys), how="outer", suffixes=("_ref", "_var"),
                                    indicator=True, validate="one_to_one")
    unmatched = int((joined["_merge"] != "both").sum())
    if unmatched:
        raise ValueError(f"the two runs do not cover the same rows: {unmatched} rows are in only one of them")
    return joined.drop(columns="_merge")


def _lens_stats(rows: pd.DataFrame) -> dict[str, float]:
    rank_ref, rank_var = rows["rank_ref"], rows["rank_var"]
    logprob = (rows["logprob_ref"] - rows["logprob_var"]).abs()
    log_rank = (np.log10(1 + rank_ref) - np.log10(1 + rank_var)).abs()
    return {
        "rank_spearman": spearman(rank_ref, rank_var),
        "logprob_max_abs_diff": float(logprob.max()),
        "logprob_mean_abs_diff": float(logprob.mean()),
        "log10_rank_max_abs_diff": float(log_rank.max()),
        "log10_rank_mean_abs_diff": float(log_rank.mean()),
        "top1_agreement": float(((rank_ref == 0) == (rank_var == 0)).mean()),
        "top10_agreement": float(((rank_ref < 10) == (rank_var < 10)).mean()),
    }


def compare_lens(reference: pd.DataFrame, variant: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of :data:`COLUMNS` (without ``variant``) comparing two ``lens.csv`` tables of the same queries."""
    joined = _join(reference, variant, LENS_KEYS)
    out = [{"probe": "lens", "site": None, "layer": None, "statistic": name, "value": value, "n_rows": len(joined)}
           for name, value in _lens_stats(joined).items()]
    query = [k for k in LENS_KEYS if k != "layer"]
    peak = joined.sort_values("layer", kind="stable").groupby(query)
    agree = (joined.loc[peak["rank_ref"].idxmin(), "layer"].to_numpy()
             == joined.loc[peak["rank_var"].idxmin(), "layer"].to_numpy())
    out.append({"probe": "lens", "site": None, "layer": None, "statistic": "peak_layer_agreement",
                "value": float(agree.mean()), "n_rows": int(agree.size)})
    for layer, rows in joined.groupby("layer"):
        out += [{"probe": "lens", "site": None, "layer": int(layer), "statistic": name, "value": value,
                 "n_rows": len(rows)} for name, value in _lens_stats(rows).items()]
    return out


def _patch_stats(rows: pd.DataFrame) -> dict[str, float]:
    value = (rows["value_ref"] - rows["value_var"]).abs()
    metric = (rows["metric_ref"] - rows["metric_var"]).abs()
    best = rows.groupby(["clean_id", "site"])
    top = (rows.loc[best["value_ref"].idxmax(), ["layer", "position", "head"]].to_numpy()
           == rows.loc[best["value_var"].idxmax(), ["layer", "position", "head"]].to_numpy()).all(axis=1)
    large = rows["value_ref"].abs() >= LARGE
    return {
        "value_spearman": spearman(rows["value_ref"], rows["value_var"]),
        "value_spearman_large": spearman(rows["value_ref"][large], rows["value_var"][large]),
        "value_pearson": float(rows["value_ref"].corr(rows["value_var"])),
        "value_max_abs_diff": float(value.max()),
        "value_mean_abs_diff": float(value.mean()),
        "metric_max_abs_diff": float(metric.max()),
        "metric_mean_abs_diff": float(metric.mean()),
        "top_cell_agreement": float(top.mean()),
    }


def compare_patching(reference: pd.DataFrame, variant: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of :data:`COLUMNS` (without ``variant``) comparing two ``patching.csv`` tables of the same pairs."""
    joined = _join(reference, variant, PATCH_KEYS)
    out = [{"probe": "patching", "site": None, "layer": None, "statistic": name, "value": value,
            "n_rows": len(joined)} for name, value in _patch_stats(joined).items()]
    for site, rows in joined.groupby("site"):
        out += [{"probe": "patching", "site": site, "layer": None, "statistic": name, "value": value,
                 "n_rows": len(rows)} for name, value in _patch_stats(rows).items()]
    return out


def summary(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {probe: {statistic: value}}}`` from the rows over all layers and sites of a fidelity table."""
    overall = table[table["layer"].isna() & table["site"].isna()]
    return {variant: {probe: dict(zip(g["statistic"], g["value"])) for probe, g in rows.groupby("probe")}
            for variant, rows in overall.groupby("variant", sort=False)}
