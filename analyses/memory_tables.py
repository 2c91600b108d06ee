"""The tables of the shared-memory report (:mod:`analyses.memory_report`) from ``memory.csv``
(:mod:`probes.memory.analysis`): per item, per cross-patch cell and per back-patch cell, and every per-layer curve
with its 95% confidence interval; and which items the normalized tests keep (:data:`MIN_GAP`).

Intervals (:mod:`analyses.stats`): 95% Student t intervals over prompts for means, exact (Clopper-Pearson)
intervals for rates, n beside each and none below 3 prompts; CKA's comes from the analysis itself (grouped
jackknife, :mod:`probes.memory.alignment`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bridgeprobe.analyses.stats import column_intervals

MIN_GAP = 1.0  # logits: items whose explicit reference moves the receiving prompt less are left out
TOP_K = 10
CURVE_COLUMNS = ("analysis", "curve", "layer", "mean", "ci_low", "ci_high", "n")


# --------------------------------------------------------------------------------------------------- statistics


def mean_intervals(matrix: np.ndarray) -> pd.DataFrame:
    """Mean over rows (items; NaN = missing) of each column with its 95% interval (exact for 0/1 columns, t
    otherwise; none below 3 items) and n."""
    return column_intervals(np.asarray(matrix, dtype=float), "auto").drop(columns="reason")


def _curve(matrix: pd.DataFrame, analysis: str, curve: str) -> pd.DataFrame:
    """Per-layer means with intervals of a prompt x layer matrix."""
    stats = mean_intervals(matrix.to_numpy())
    return stats.assign(analysis=analysis, curve=curve, layer=matrix.columns.astype(int))[list(CURVE_COLUMNS)]


def layer_matrix(rows: pd.DataFrame, value: str = "value", index: str = "prompt_id", columns: str = "source_layer") -> pd.DataFrame:
    return rows.pivot_table(index=index, columns=columns, values=value, aggfunc="first")


def select(frame: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in equal.items():
        mask &= (frame[column] == value).to_numpy()
    return frame[mask]


# --------------------------------------------------------------------------------------------------- tables


def item_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per analysed item: outcome group and correctness flags."""
    items = select(frame, analysis="item")
    flags = items[items["metric"] != "skipped"]
    table = flags.pivot_table(index="prompt_id", columns="metric", values="value", aggfunc="first")
    table["group"] = flags.groupby("prompt_id")["condition"].first()
    return table


def crosspatch_eligible(frame: pd.DataFrame, min_gap: float | None = None) -> pd.Index:
    """Items whose explicit bridge moves the partner's hop2 prompt by at least ``min_gap`` (default
    :data:`MIN_GAP`) logits."""
    min_gap = MIN_GAP if min_gap is None else min_gap
    rows = select(frame, analysis="crosspatch", condition="main")
    values = rows.pivot_table(index="prompt_id", columns="metric", values="value", aggfunc="first")
    if values.empty or "explicit_logit_diff" not in values:
        return pd.Index([])
    gap = values["explicit_logit_diff"] - values["baseline_logit_diff"]
    return gap.index[gap >= min_gap]




def transfer_eligible(frame: pd.DataFrame, min_gap: float | None = None) -> tuple[pd.Index, int]:
    """Items of the other-relation control whose explicit transfer (E's hop2 prompt over D's) is at least
    ``min_gap`` (default :data:`MIN_GAP`) logits, and how many items were left out for a smaller gap. A
    ``memory.csv`` without the ``transfer_gap`` rows keeps every item."""
    min_gap = MIN_GAP if min_gap is None else min_gap
    rows = select(frame, analysis="crosspatch", condition="other_relation", metric="transfer_gap")
    if rows.empty:
        ids = select(frame, analysis="crosspatch", condition="other_relation")["prompt_id"].unique()
        return pd.Index(ids), 0
    gap = rows.groupby("prompt_id")["value"].first()
    return gap.index[gap >= min_gap], int((gap < min_gap).sum())


def crosspatch_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, source position, source layer, target layer): the mean normalized effect over eligible
    items, the rate at which ``Y_A`` becomes the top token, and, for ``main``, the paired bridge-specific effect
    ``main - random``."""
    rows = select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    rows = rows[rows["condition"].isin(["main", "random"])]
    if rows.empty:
        return pd.DataFrame()
    eligible = crosspatch_eligible(frame)
    keys = ["condition", "source_position", "source_layer", "target_layer"]
    value = rows[(rows["metric"] == "value") & rows["prompt_id"].isin(eligible)]
    top1 = rows[rows["metric"] == "rank"].assign(value=lambda f: (f["value"] == 0).astype(float))
    table = value.groupby(keys)["value"].agg(value="mean", n_value="count").join(
        top1.groupby(keys)["value"].agg(top1_rate="mean", n="count"), how="outer")
    paired = value.pivot_table(index=["prompt_id", "source_position", "source_layer", "target_layer"],
                               columns="condition", values="value", aggfunc="first")
    if {"main", "random"} <= set(paired.columns):
        diff = (paired["main"] - paired["random"]).unstack(["source_position", "source_layer", "target_layer"])
        stats = mean_intervals(diff.to_numpy())
        stats.index = diff.columns
        specific = stats[["mean", "ci_low", "ci_high"]].add_prefix("specific_").rename(
            columns={"specific_mean": "specific"})
        table = table.join(pd.concat({"main": specific}, names=["condition"]), how="left")
    return table.reset_index()


def best_targets(cells: pd.DataFrame, position: str = "last") -> pd.DataFrame:
    """Per source layer of the grid: the target layer where A's state has the largest bridge-specific effect,
    with its CI (a maximum over targets: read it as "readable somewhere", not as an unbiased size)."""
    if "specific" not in cells:
        return pd.DataFrame()
    main = cells[(cells["condition"] == "main") & (cells["source_position"] == position)].dropna(subset=["specific"])
    if main.empty:
        return pd.DataFrame()
    grid = main.groupby("source_layer")["target_layer"].transform("nunique") > 1
    best = main[grid].loc[lambda f: f.groupby("source_layer")["specific"].idxmax()]
    return best[["source_layer", "target_layer", "specific", "specific_ci_low", "specific_ci_high"]].reset_index(drop=True)


def curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Every per-layer curve with its 95% CI (long table, :data:`CURVE_COLUMNS`)."""
    parts = []
    eligible = crosspatch_eligible(frame)
    transfer_ok, _ = transfer_eligible(frame)
    cross = select(frame, analysis="crosspatch").dropna(subset=["source_layer"])
    diagonal = cross[cross["source_layer"] == cross["target_layer"]]
    for position in ("last", "e1_last"):
        values = {c: layer_matrix(select(diagonal, condition=c, source_position=position, metric="value")
                             .pipe(lambda f: f[f["prompt_id"].isin(eligible)])) for c in ("main", "random")}
        for condition, matrix in values.items():
            if not matrix.empty:
                parts.append(_curve(matrix, "crosspatch", f"{condition}_{position}"))
        if not values["main"].empty and not values["random"].empty:
            parts.append(_curve(values["main"] - values["random"], "crosspatch", f"specific_{position}"))
        for condition in ("main", "random"):
            ranks = layer_matrix(select(diagonal, condition=condition, source_position=position, metric="rank"))
            if not ranks.empty:
                parts.append(_curve((ranks == 0).astype(float).where(ranks.notna()), "crosspatch",
                                    f"top1_{condition}_{position}"))
        transfer = {}
        for condition, name in (("other_relation", ""), ("other_relation_random", "random_")):
            other = {m: layer_matrix(select(diagonal, condition=condition, source_position=position, metric=m)
                                .pipe(lambda f: f[f["prompt_id"].isin(transfer_ok)]))
                     for m in ("transfer_value", "answer_value")}
            if other["transfer_value"].empty:
                continue
            transfer[condition] = other["transfer_value"]
            parts += [_curve(other["transfer_value"], "crosspatch", f"{name}transfer_{position}"),
                      _curve(other["answer_value"], "crosspatch", f"{name}answer_{position}")]
        if len(transfer) == 2:
            parts.append(_curve(transfer["other_relation"] - transfer["other_relation_random"], "crosspatch",
                                f"specific_transfer_{position}"))
    decoded = select(frame, analysis="decoding")
    if not decoded.empty:
        fixed_layer = int(decoded.loc[decoded["source_layer"] != decoded["target_layer"], "target_layer"].mode().iloc[0]) \
            if (decoded["source_layer"] != decoded["target_layer"]).any() else None
        for mode in ("same", "fixed"):
            sub = (decoded[decoded["source_layer"] == decoded["target_layer"]] if mode == "same"
                   else decoded[decoded["target_layer"] == fixed_layer])
            for (condition, position), rows in sub.groupby(["condition", "source_position"]):
                for metric, name in (("rank", "bridge"), ("partner_rank", "partner")):
                    ranks = layer_matrix(select(rows, metric=metric))
                    if ranks.empty:
                        continue
                    for k in (1, TOP_K):
                        parts.append(_curve((ranks < k).astype(float).where(ranks.notna()), "decoding",
                                            f"{condition}_{position}_{mode}_{name}_top{k}"))
    lens = select(frame, analysis="lens")
    for (condition, position, metric), rows in lens.groupby(["condition", "source_position", "metric"]):
        ranks = layer_matrix(rows)
        for k in (1, TOP_K):
            parts.append(_curve((ranks < k).astype(float), "lens",
                                f"{condition}_{position}_{metric.removesuffix('_rank')}_top{k}"))
    align = select(frame, analysis="alignment")
    set_level = align["prompt_id"].fillna("") == ""  # rows about the whole set (CKA, counts) have no prompt id
    per_item = align[~set_level]
    suffix = {"last": "", "e1_last": "_e1_last"}  # the explicit held-out probe has no position: ""
    for (position, metric), rows in per_item.groupby([per_item["source_position"].fillna(""), "metric"]):
        parts.append(_curve(layer_matrix(rows), "alignment", metric + suffix.get(position, "")))
    for position, end in suffix.items():
        for kind in ("cosine", "cosine_centered"):
            matched, mismatched = (layer_matrix(select(per_item, source_position=position, metric=f"{kind}_{m}"))
                                   for m in ("matched", "mismatched"))
            if not matched.empty and not mismatched.empty:
                parts.append(_curve(matched - mismatched, "alignment", f"{kind}_gap{end}"))
        dataset = align[set_level & align["source_layer"].notna() & (align["source_position"] == position)]
        for kind in ("matched", "mismatched"):
            rows = dataset[dataset["metric"].str.startswith(f"cka_{kind}")]
            if rows.empty:
                continue
            table = rows.pivot_table(index="source_layer", columns="metric", values="value")
            parts.append(pd.DataFrame({"analysis": "alignment", "curve": f"cka_{kind}{end}",
                                       "layer": table.index.astype(int), "mean": table[f"cka_{kind}"],
                                       "ci_low": table.get(f"cka_{kind}_ci_low"),
                                       "ci_high": table.get(f"cka_{kind}_ci_high"), "n": np.nan}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(CURVE_COLUMNS))


def curve_rows(table: pd.DataFrame, analysis: str, curve: str) -> pd.DataFrame:
    return table[(table["analysis"] == analysis) & (table["curve"] == curve)].set_index("layer")




def backpatch_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (group, source layer, target layer): the rate at which the answer's first token is the top token after
    the patch (for failures: fixed; for the correct prompts, 1 - rate: broken), with its CI."""
    rows = select(frame, analysis="backpatch", metric="rank").dropna(subset=["source_layer"])
    parts = []
    for group, sub in rows.groupby("condition"):
        top = (sub.assign(cell=list(zip(sub["source_layer"].astype(int), sub["target_layer"].astype(int))))
               .pivot_table(index="prompt_id", columns="cell", values="value", aggfunc="first"))
        stats = mean_intervals((top == 0).astype(float).where(top.notna()).to_numpy())
        stats["group"] = group
        stats["source_layer"] = [c[0] for c in top.columns]
        stats["target_layer"] = [c[1] for c in top.columns]
        parts.append(stats)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True).rename(columns={"mean": "top1_rate"})
    return table[["group", "source_layer", "target_layer", "top1_rate", "ci_low", "ci_high", "n"]]
