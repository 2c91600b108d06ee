"""Aggregate ``patching.csv`` over pairs and draw the heatmaps and per-layer curves.

Pairs differ in length, so positions are aligned from the end (``position_from_end``: 0 is the last token, where
the answer is predicted). Intervals: 95% Student t intervals over pairs (:mod:`analyses.stats`), none below 3
pairs. Pairs whose unpatched gap ``clean_metric - corrupt_metric`` (logit difference) is below
:data:`MIN_PAIR_GAP` are left out and counted (:func:`pair_gaps`): the recovery divides by that gap, so a tiny or
negative one lets a single pair dominate a mean.

The "best position" curve takes, per pair and layer, the position where patching matters most: the maximum
recovery in ``denoise`` mode (a maximum of noisy values, so biased upward) and the minimum in ``noise`` mode
(where 0 means the site alone destroys the clean behaviour; biased downward).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.page import Figure, Section, num  # noqa: E402
from bridgeprobe.analyses.plots import legend_below, save_figure  # noqa: E402
from bridgeprobe.analyses.stats import group_intervals  # noqa: E402
from bridgeprobe.probes.io.results import atomic_write_csv  # noqa: E402

MIN_PAIR_GAP = 1.0  # logits: pairs whose clean - corrupted logit difference is smaller are left out
BEST = {"denoise": ("max", "max over positions per pair: biased upward"),
        "noise": ("min", "min over positions per pair: biased downward")}
SITE_COLORS = {"resid_pre": "tab:blue", "resid_post": "tab:cyan", "attn_out": "tab:orange",
               "mlp_out": "tab:green"}
SITE_NAMES = {"resid_pre": "the residual stream before the block", "resid_post": "the residual stream after the block",
              "attn_out": "the attention output", "mlp_out": "the MLP output", "head": "one attention head's output"}


def pair_gaps(frame: pd.DataFrame, min_gap: float = MIN_PAIR_GAP) -> pd.DataFrame:
    """One row per pair: ``clean_metric``, ``corrupt_metric``, ``gap`` (clean - corrupted) and ``excluded`` (""
    or the reason: ``negative gap`` or ``gap below MIN``). Frames without the metric columns keep every pair."""
    keys = ["clean_id", "corrupt_id"] if "corrupt_id" in frame else ["clean_id"]
    if not {"clean_metric", "corrupt_metric"} <= set(frame.columns):
        return frame[keys].drop_duplicates().assign(gap=np.nan, excluded="").reset_index(drop=True)
    pairs = frame.groupby(keys, as_index=False)[["clean_metric", "corrupt_metric"]].first()
    pairs["gap"] = pairs["clean_metric"] - pairs["corrupt_metric"]
    pairs["excluded"] = np.where(pairs["gap"] < 0, "negative gap",
                                 np.where(pairs["gap"] < min_gap, f"gap below {min_gap:g}", ""))
    return pairs


def kept_pairs(frame: pd.DataFrame, min_gap: float = MIN_PAIR_GAP) -> pd.DataFrame:
    """The rows of the pairs :func:`pair_gaps` keeps."""
    gaps = pair_gaps(frame, min_gap)
    return frame[frame["clean_id"].isin(gaps.loc[gaps["excluded"] == "", "clean_id"])]


def exclusion_text(frame: pd.DataFrame, min_gap: float = MIN_PAIR_GAP) -> str:
    """One sentence: how many pairs are kept and why the others are not."""
    gaps = pair_gaps(frame, min_gap)
    out = gaps[gaps["excluded"] != ""]
    negative = int((out["excluded"] == "negative gap").sum())
    return (f"{len(gaps) - len(out)} of {len(gaps)} pairs kept; {len(out)} left out because the unpatched logit "
            f"difference clean - corrupted is below {min_gap:g} ({negative} of them negative).")


def _intervals(grouped: pd.core.groupby.SeriesGroupBy) -> pd.DataFrame:
    return group_intervals(grouped, "t").drop(columns="reason")


def by_cell(frame: pd.DataFrame, min_gap: float = MIN_PAIR_GAP) -> pd.DataFrame:
    """Mean recovery, 95% t interval and n per (site, layer, position_from_end[, head]) over the kept pairs
    (``n_excluded``: pairs left out for their gap)."""
    kept = kept_pairs(frame, min_gap)
    keys = ["site", "layer", "position_from_end"] + (["head"] if frame["head"].notna().any() else [])
    table = _intervals(kept.groupby(keys, dropna=False)["value"])
    return table.assign(n_excluded=int((pair_gaps(frame, min_gap)["excluded"] != "").sum()))


def by_layer(frame: pd.DataFrame, direction: str = "denoise", min_gap: float = MIN_PAIR_GAP) -> pd.DataFrame:
    """Per (site, layer) over the kept pairs: recovery at the last position, and at each pair's best position
    (:data:`BEST`: max in ``denoise``, min in ``noise``), mean, 95% t interval and n (head rows are left out)."""
    how, rule = BEST[direction]
    kept = kept_pairs(frame, min_gap)
    sites = kept[kept["site"] != "head"]
    last = _intervals(sites[sites["position_from_end"] == 0].groupby(["site", "layer"])["value"])
    best = _intervals(sites.groupby(["site", "layer", "clean_id"])["value"].agg(how).groupby(["site", "layer"]))
    table = last.merge(best, on=["site", "layer"], suffixes=("_last", "_best_position"))
    return table.assign(best_position_rule=rule, n_excluded=int((pair_gaps(frame, min_gap)["excluded"] != "").sum()))


def layer_curves(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Per-layer recovery (last position, and best position) with 95% CIs, one line per site."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    rule = layers["best_position_rule"].iloc[0] if "best_position_rule" in layers and len(layers) else ""
    n = int(layers["n_last"].max()) if "n_last" in layers and len(layers) else 0
    for ax, which, label in ((axes[0], "last", f"at the last token (n = {n} pairs)"),
                             (axes[1], "best_position", f"at the best position\n({rule})")):
        for site, sub in layers.groupby("site"):
            color = SITE_COLORS.get(site)
            ax.plot(sub["layer"], sub[f"mean_{which}"], label=site, lw=2, color=color)
            ax.fill_between(sub["layer"], sub[f"ci_low_{which}"], sub[f"ci_high_{which}"], alpha=0.2, color=color)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="layer", title=f"Recovery {label}")
        legend_below(ax, ncol=4, title="shaded: 95% CI over pairs", title_fontsize=8)
    axes[0].set_ylabel("normalized recovery (mean, 95% CI)")
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


def write_patching_outputs(frame: pd.DataFrame, out_dir: Path, title: str, prefix: str = "patching",
                           direction: str = "denoise") -> list[Path]:
    """Write ``PREFIX_pairs.csv`` (per pair: gap, exclusion), ``PREFIX_cells.csv``, ``PREFIX_layers.csv``, a
    per-layer curve PNG and one heatmap PNG per site (kept pairs only); return the PNG paths."""
    layers = by_layer(frame, direction)
    atomic_write_csv(out_dir / f"{prefix}_pairs.csv", pair_gaps(frame))
    atomic_write_csv(out_dir / f"{prefix}_cells.csv", by_cell(frame))
    atomic_write_csv(out_dir / f"{prefix}_layers.csv", layers)
    frame = kept_pairs(frame)
    if frame.empty:
        return []
    figures = [layer_curves(layers, out_dir / f"{prefix}_layers.png", title)] if len(layers) else []
    for site in sorted(frame["site"].unique()):
        if site != "head":
            figures.append(heatmaps(frame, site, out_dir / f"{prefix}_{site}.png",
                                    f"{title}: {SITE_NAMES.get(site, site)} ({site})"))
    return figures


def attribution_section(frame: pd.DataFrame, out_dir: Path, model: str) -> Section:
    """Write the attribution tables and plots and return the report's section, opening with what it found."""
    figures = write_patching_outputs(frame, out_dir, f"Attribution patching, {model}", prefix="attribution")
    layers = by_layer(frame)
    n = frame["clean_id"].nunique()
    findings = f"Attribution patching on {n} counterfactual pair{'s' if n != 1 else ''}; {exclusion_text(frame)}"
    if len(layers):
        peaks = layers.loc[layers.groupby("site")["mean_last"].idxmax()]
        top = peaks.loc[peaks["mean_last"].idxmax()]
        findings += (f" At the last token, the site and layer that carry the most of the logit difference is "
                     f"{top['site']} at layer {int(top['layer'])}: {num(top['mean_last'])} "
                     f"[{num(top['ci_low_last'])}, {num(top['ci_high_last'])}] (1 = restores the clean answer alone).")
        resid = layers[layers["site"] == "resid_pre"].sort_values("layer")
        carried = resid[resid["ci_low_last"] > 0.5]
        if len(carried):
            findings += (f" The last token's residual stream recovers more than half of it (95% CI above 0.5) from "
                         f"layer {int(carried['layer'].iloc[0])} on" +
                         ("" if carried["layer"].diff().fillna(1).eq(1).all() else " (not at every later layer)")
                         + ": before that, the difference sits at earlier positions.")
        else:
            findings += " The last token's residual stream never carries more than half of it with confidence."
    body = ("<p>First-order (attribution) estimate of how much each site carries of the logit difference between "
            "an item's answer and its counterfactual partner's (denoising: clean activations into the corrupted "
            "run). attribution.csv has every cell, attribution_layers.csv the curves. Attribution is a screen: "
            "confirm with <code>bridgeprobe patch --method exact</code>.</p>")
    captions = {"layers": "Per-layer recovery, mean over pairs with its 95% CI (shaded; Student t, none "
                          "below 3 pairs): left at the last token, right at the position where each pair recovers most (a maximum: biased upward)."}
    return Section("Per-layer attribution", findings, body,
                   [Figure(f, captions["layers"] if f.name.endswith("_layers.png")
                           else site_caption(f.stem.removeprefix("attribution_"))) for f in figures])


def site_caption(site: str) -> str:
    """The caption of one site's heatmap, naming the site."""
    return (f"Site: {SITE_NAMES.get(site, site)} ({site}), at every layer and position. Layer × position map of the "
            f"normalized recovery when this site's clean activation is patched into the corrupted run: left one pair "
            f"with its tokens, right the mean over pairs (positions counted from the end); red = restores the clean "
            f"answer.")
