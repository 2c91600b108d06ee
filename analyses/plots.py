"""PNG plots of the lens results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.aggregate import GROUPS, last_position  # noqa: E402

# One colour per target on every plot of the reports: bridge blue, answer red, matched control grey.
TARGET_COLORS = {"bridge": "tab:blue", "answer": "tab:red", "control": "tab:gray"}
_PROBES = {
    ("two_hop", "bridge"): ("bridge on two-hop prompt", "-"),
    ("two_hop", "answer"): ("answer on two-hop prompt", "-"),
    ("two_hop", "control"): ("control entity on two-hop prompt", "-"),
    ("hop1", "bridge"): ("bridge on hop-1 prompt (control)", ":"),
    ("hop2", "answer"): ("answer on hop-2 prompt (control)", ":"),
}


def legend_below(ax: plt.Axes, ncol: int = 2, **kwargs: object) -> None:
    """The axes' legend under the plot, outside the data and below the x-axis label."""
    if ax.get_legend_handles_labels()[0]:
        from matplotlib.transforms import offset_copy

        # a fixed distance in points below the axes (tick labels, then the x label), whatever the axes' height
        below = offset_copy(ax.transAxes, fig=ax.figure, y=-(34 if ax.get_xlabel() else 20), units="points")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=ncol, fontsize=8,
                  frameon=False, **kwargs)


def overlapping_text(fig: plt.Figure) -> list[tuple[str, str]]:
    """Pairs of the figure's visible texts (titles, axis labels, tick labels' axes, legends) whose drawn boxes
    overlap by more than a pixel: what a reader would see printed over each other."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            if text.get_text() and text.get_visible():
                boxes.append((text.get_text(), text.get_window_extent(renderer)))
        legend = ax.get_legend()
        if legend is not None:
            boxes.append((f"legend of {ax.get_title() or 'an axes'}", legend.get_window_extent(renderer)))
    if fig._suptitle is not None:  # noqa: SLF001 (matplotlib keeps the suptitle there)
        boxes.append((fig._suptitle.get_text(), fig._suptitle.get_window_extent(renderer)))  # noqa: SLF001
    found = []
    for i, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[i + 1:]:
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1:
                found.append((name_a, name_b))
    return found


def lay_out(fig: plt.Figure) -> None:
    """The final layout of every figure: whole-number layer ticks, then matplotlib's tight layout."""
    for ax in fig.axes:
        if ax.get_xlabel() == "layer":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()


def save_figure(fig: plt.Figure, path: Path) -> Path:
    lay_out(fig)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def rank_curves(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Median rank (log scale; interquartile band on the two-hop prompt) and top-10 rate per layer, for each probe."""
    fig, (ax_rank, ax_top) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (kind, target), (label, style) in _PROBES.items():
        sub = layers[(layers["prompt_kind"] == kind) & (layers["target"] == target)]
        if sub.empty:
            continue
        color = TARGET_COLORS[target]
        ax_rank.plot(sub["layer"], sub["median_rank"] + 1, style, color=color, label=label, lw=2)
        if kind == "two_hop" and target != "control":
            ax_rank.fill_between(sub["layer"], sub["q25_rank"] + 1, sub["q75_rank"] + 1, color=color, alpha=0.15,
                                 label=f"{target}: interquartile range over prompts")
        ax_top.plot(sub["layer"], sub["top10_rate"], style, color=color, label=label, lw=2)
    ax_rank.set_yscale("log")
    ax_rank.invert_yaxis()
    ax_rank.set(xlabel="layer", ylabel="median rank + 1 (log; up is better)", title="Rank of target token")
    ax_top.set(xlabel="layer", ylabel="fraction of prompts", ylim=(-0.02, 1.02), title="Target in top 10")
    legend_below(ax_rank)
    legend_below(ax_top)
    fig.suptitle(title)
    return save_figure(fig, path)


def group_curves(frame: pd.DataFrame, prompts: pd.DataFrame, path: Path, title: str) -> Path:
    """Median bridge and answer rank per layer on the two-hop prompt, one panel per outcome group."""
    last = last_position(frame)
    last = last[(last["prompt_kind"] == "two_hop") & last["target"].isin(["bridge", "answer"])]
    last = last.merge(prompts[["prompt_id", "group"]], on="prompt_id")
    groups = [g for g in GROUPS if g in set(last["group"])]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(3.6 * max(1, len(groups)) + 1, 4), sharey=True,
                             squeeze=False)
    for ax, group in zip(axes[0], groups):
        sub = last[last["group"] == group]
        for target, rows in sub.groupby("target"):
            med = rows.groupby("layer")["rank"].median() + 1
            ax.plot(med.index, med.values, color=TARGET_COLORS[target], label=target, lw=2)
        ax.set(xlabel="layer", title=f"{group.replace('_', ' ')}\n(n = {sub['prompt_id'].nunique():,})")
        ax.title.set_fontsize(9)
    axes[0, 0].set_yscale("log")
    axes[0, 0].invert_yaxis()
    axes[0, 0].set_ylabel("median rank + 1 (log; up is better)")
    legend_below(axes[0, 0])
    fig.suptitle(title)
    return save_figure(fig, path)


def bridge_heatmap(frame: pd.DataFrame, prompts: pd.DataFrame, path: Path, title: str, max_rows: int = 1000) -> Path:
    """Prompts x layers heatmap of the bridge's log rank on the two-hop prompt, ordered by group and peak layer,
    with a line between groups and each group's name and size on the left."""
    last = last_position(frame)
    sub = last[(last["prompt_kind"] == "two_hop") & (last["target"] == "bridge")]
    matrix = sub.pivot(index="prompt_id", columns="layer", values="rank")
    ordered = prompts.assign(_g=prompts["group"].map({g: i for i, g in enumerate(GROUPS)}))
    ordered = ordered.sort_values(["_g", "bridge_peak_layer", "bridge_best_rank"])
    ordered = ordered[ordered["prompt_id"].isin(matrix.index)].head(max_rows)
    matrix = matrix.loc[ordered["prompt_id"]]
    fig, ax = plt.subplots(figsize=(9, max(4, min(14, 0.03 * len(matrix) + 2))))
    image = ax.imshow(np.log10(matrix.to_numpy() + 1), aspect="auto", cmap="viridis_r", interpolation="nearest")
    ticks, labels, start = [], [], 0
    for group, size in ordered["group"].value_counts(sort=False).reindex(ordered["group"].unique()).items():
        if start:
            ax.axhline(start - 0.5, color="white", lw=2)
        ticks.append(start + size / 2 - 0.5)
        labels.append(f"{group.replace('_', ' ')}\n(n = {size:,})")
        start += size
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set(xlabel="layer", ylabel=f"prompt ({len(matrix):,}, by group then peak layer)", title=title)
    fig.colorbar(image, ax=ax, label="log10(bridge rank + 1); bright = readable")
    return save_figure(fig, path)
