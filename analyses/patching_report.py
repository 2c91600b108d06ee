"""Aggregate ``patching.csv`` over pairs and draw the heatmaps and per-layer curves.

Pairs differ in length, so positions are aligned from the end (``position_from_end``: 0 is the last token, where
the answer is predicted). Confidence intervals are mean ± 1.96 standard errors over pairs (normal approximation).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analyses.plots import save_figure  # noqa: E402
from probes.results import atomic_write_csv  # noqa: E402

Z95 = 1.96


def _mean_ci(grouped: pd.core.groupby.SeriesGroupBy) -> pd.DataFrame:
    table = pd.DataFrame({"mean": grouped.mean(), "sem": grouped.sem(), "n": grouped.count()})
    table["ci_low"] = table["mean"] - Z95 * table["sem"].fillna(0)
    table["ci_high"] = table["mean"] + Z95 * table["sem"].fillna(0)
    return table.reset_index()


def by_cell(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery and CI per (site, layer, position_from_end[, head]) over pairs."""
    keys = ["site", "layer", "position_from_end"] + (["head"] if frame["head"].notna().any() else [])
    return _mean_ci(frame.groupby(keys, dropna=False)["value"])


def by_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (site, layer): recovery at the last position, and the best position's recovery, mean and CI over pairs
    (head rows are summed over heads first)."""
    sites = frame[frame["site"] != "head"]
    last = _mean_ci(sites[sites["position_from_end"] == 0].groupby(["site", "layer"])["value"])
    best = _mean_ci(sites.groupby(["site", "layer", "clean_id"])["value"].max().groupby(["site", "layer"]))
    return last.merge(best, on=["site", "layer"], suffixes=("_last", "_best_position"))


def layer_curves(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Per-layer recovery (last position, and best position) with 95% CIs, one line per site."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, which, label in ((axes[0], "last", "at the last token"), (axes[1], "best_position", "at the best position")):
        for site, sub in layers.groupby("site"):
            ax.plot(sub["layer"], sub[f"mean_{which}"], label=site, lw=2)
            ax.fill_between(sub["layer"], sub[f"ci_low_{which}"], sub[f"ci_high_{which}"], alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="layer", title=f"Recovery {label}")
    axes[0].set_ylabel("normalized recovery (mean, 95% CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def heatmaps(frame: pd.DataFrame, site: str, path: Path, title: str) -> Path:
    """Layer x position heatmaps of one site: the first pair with its tokens, and the mean over all pairs."""
    sub = frame[frame["site"] == site]
    first = sub[sub["clean_id"] == sub["clean_id"].iloc[0]]
    example = first.pivot_table(index="layer", columns="position", values="value", aggfunc="first")
    tokens = first.drop_duplicates("position").sort_values("position")["token"].tolist()
    mean = sub.pivot_table(index="layer", columns="position_from_end", values="value", aggfunc="mean")
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    limit = max(1.0, float(np.nanmax(np.abs(mean.to_numpy()))), float(np.nanmax(np.abs(example.to_numpy()))))
    for ax, table, labels, name in (
        (axes[0], example, [repr(t)[1:-1] for t in tokens], f"pair {first['clean_id'].iloc[0]} / {first['corrupt_id'].iloc[0]}"),
        (axes[1], mean, [str(c) for c in mean.columns], f"mean over {sub['clean_id'].nunique()} pairs"),
    ):
        image = ax.imshow(table.to_numpy(), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="layer", title=name, xlabel="token" if ax is axes[0] else "position from the end")
    fig.colorbar(image, ax=axes, label="normalized recovery")
    fig.suptitle(title)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_patching_outputs(frame: pd.DataFrame, out_dir: Path, title: str, prefix: str = "patching") -> list[Path]:
    """Write ``PREFIX_cells.csv``, ``PREFIX_layers.csv``, a per-layer curve PNG and one heatmap PNG per site;
    return the PNG paths."""
    layers = by_layer(frame)
    atomic_write_csv(out_dir / f"{prefix}_cells.csv", by_cell(frame))
    atomic_write_csv(out_dir / f"{prefix}_layers.csv", layers)
    figures = [layer_curves(layers, out_dir / f"{prefix}_layers.png", title)] if len(layers) else []
    for site in sorted(frame["site"].unique()):
        if site != "head":
            figures.append(heatmaps(frame, site, out_dir / f"{prefix}_{site}.png", f"{title}: {site}"))
    return figures
