"""PNG plots of the lens results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from analyses.aggregate import last_position  # noqa: E402

_PROBES = {
    ("two_hop", "bridge"): ("bridge on two-hop prompt", "tab:blue", "-"),
    ("two_hop", "answer"): ("answer on two-hop prompt", "tab:red", "-"),
    ("hop1", "bridge"): ("bridge on hop-1 prompt (control)", "tab:blue", ":"),
    ("hop2", "answer"): ("answer on hop-2 prompt (control)", "tab:red", ":"),
}


def save_figure(fig: plt.Figure, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "layer":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def rank_curves(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Median rank (log scale, interquartile band) and top-10 rate per layer, for each probe."""
    fig, (ax_rank, ax_top) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (kind, target), (label, color, style) in _PROBES.items():
        sub = layers[(layers["prompt_kind"] == kind) & (layers["target"] == target)]
        if sub.empty:
            continue
        ax_rank.plot(sub["layer"], sub["median_rank"] + 1, style, color=color, label=label, lw=2)
        if style == "-":
            ax_rank.fill_between(sub["layer"], sub["q25_rank"] + 1, sub["q75_rank"] + 1, color=color, alpha=0.15)
        ax_top.plot(sub["layer"], sub["top10_rate"], style, color=color, label=label, lw=2)
    ax_rank.set_yscale("log")
    ax_rank.invert_yaxis()
    ax_rank.set(xlabel="layer", ylabel="median rank + 1 (log; up is better)", title="Rank of target token")
    ax_top.set(xlabel="layer", ylabel="fraction of prompts", ylim=(-0.02, 1.02), title="Target in top 10")
    ax_top.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return save_figure(fig, path)


def group_curves(frame: pd.DataFrame, prompts: pd.DataFrame, path: Path, title: str) -> Path:
    """Median bridge and answer rank per layer on the two-hop prompt, split by the prompt's outcome group."""
    last = last_position(frame)
    last = last[last["prompt_kind"] == "two_hop"].merge(prompts[["prompt_id", "group"]], on="prompt_id")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(sorted(last["group"].unique()), plt.cm.tab10.colors))
    for (group, target), sub in last.groupby(["group", "target"]):
        med = sub.groupby("layer")["rank"].median() + 1
        n = sub["prompt_id"].nunique()
        ax.plot(med.index, med.values, "-" if target == "bridge" else "--", color=colors[group],
                label=f"{target}, {group} (n={n})")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="layer", ylabel="median rank + 1 (log)", title=title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def bridge_heatmap(frame: pd.DataFrame, prompts: pd.DataFrame, path: Path, title: str, max_rows: int = 1000) -> Path:
    """Prompts x layers heatmap of the bridge's log rank on the two-hop prompt, ordered by group and peak layer."""
    last = last_position(frame)
    sub = last[(last["prompt_kind"] == "two_hop") & (last["target"] == "bridge")]
    matrix = sub.pivot(index="prompt_id", columns="layer", values="rank")
    order = prompts.sort_values(["group", "bridge_peak_layer", "bridge_best_rank"])["prompt_id"]
    matrix = matrix.loc[[p for p in order if p in matrix.index][:max_rows]]
    fig, ax = plt.subplots(figsize=(8, max(4, min(14, 0.03 * len(matrix) + 2))))
    image = ax.imshow(np.log10(matrix.to_numpy() + 1), aspect="auto", cmap="viridis_r", interpolation="nearest")
    ax.set(xlabel="layer", ylabel=f"prompt ({len(matrix)}, by group then peak layer)", title=title)
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, label="log10(bridge rank + 1); bright = readable")
    return save_figure(fig, path)
