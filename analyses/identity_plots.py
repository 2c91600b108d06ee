"""The figures of the identity runs' pages: learning curves with a band over seeds, the alignment of the hop-1
state with the bridge over training and against OOD accuracy, weight spectra and nuclear norms, and the lens and
patching layer profiles of a fine-tuned model before and after."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.identity_report import COLORS, alignment_subset, run_label  # noqa: E402
from bridgeprobe.analyses.plots import legend_below, save_figure  # noqa: E402

def seed_band(ax: plt.Axes, rows: pd.DataFrame, column: str) -> None:
    """Per condition, ``column`` against the step: the mean over seeds as a line, the seeds' range as a band."""
    for condition, part in rows.groupby("condition"):
        stats = part.groupby("step")[column].agg(["mean", "min", "max"]).dropna()
        if stats.empty:
            continue
        ax.plot(stats.index, stats["mean"], color=COLORS.get(condition), label=condition)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=COLORS.get(condition), alpha=0.15)


CURVE_NAMES = {"ood_two_hop_acc": "OOD two-hop accuracy", "id_two_hop_acc": "ID two-hop accuracy",
               "one_hop_acc": "one-hop accuracy", "train_loss": "training loss", "identity_acc": "identity accuracy",
               "train_two_hop_acc": "trained two-hop accuracy", "reverse_test_acc": "never-seen reversals",
               "reverse_train_acc": "trained reversals", "forward_acc": "forward facts"}


def _curve_name(column: str) -> str:
    return CURVE_NAMES.get(column, column.removesuffix("_acc").replace("_", " ") + (" accuracy"
                                                                                     if column.endswith("_acc") else ""))


def learning_curves(metrics: pd.DataFrame, keys: Sequence[str], path: Path, title: str,
                    columns: Sequence[str] = ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc", "train_loss"),
                    chance: float | None = None) -> Path:
    """One row of panels per configuration, one panel per metric (titled in words): the mean over seeds against
    the step for each condition, with the seeds' range as a band; ``chance`` as a dotted line on the two-hop
    accuracy panels."""
    groups = list(metrics.groupby(list(keys), sort=True)) if keys else [((), metrics)]
    fig, axes = plt.subplots(len(groups), len(columns), figsize=(3.6 * len(columns), 3.0 * len(groups)),
                             squeeze=False)
    for r, (values, group) in enumerate(groups):
        for c, column in enumerate(columns):
            ax = axes[r][c]
            seed_band(ax, group, column)
            if chance is not None and "two_hop" in column:
                ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
            if column == "train_loss":
                ax.set_yscale("log")
            heading = _curve_name(column) + (f"\n{run_label(keys, values)}" if keys else "")
            ax.set(xlabel="step", title=heading if r == 0 or keys else None)
            ax.title.set_fontsize(9)
            if c == 0:
                ax.set_ylabel("accuracy (mean over seeds)" if column.endswith("_acc") else "", fontsize=8)
            if r == len(groups) - 1 and c == 0:
                legend_below(ax, ncol=2, title="band: the seeds' range (min to max)", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def alignment_vs_accuracy(metrics: pd.DataFrame, alignment: pd.DataFrame, path: Path, title: str) -> Path:
    """The mechanism against the behaviour: at every evaluated step of every run, the middle-layer alignment of the
    hop-1 state with the explicit bridge (:func:`final_alignment`'s measure, at that step) against OOD two-hop
    accuracy; one colour per condition."""
    subset, which = alignment_subset(alignment)
    mid = int(subset["query_layer"].max()) // 2
    points = subset[(subset["query_layer"] == mid) & (subset["bridge_layer"] == 0)][["run", "step", "condition", "top1"]]
    points = points.merge(metrics[["run", "step", "ood_two_hop_acc"]], on=["run", "step"])
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for condition, part in points.groupby("condition"):
        ax.scatter(part["top1"], part["ood_two_hop_acc"], s=10, alpha=0.6, color=COLORS.get(condition),
                   label=condition)
    ax.set(xlabel=f"alignment (nearest bridge is its own), {which}", ylabel="OOD two-hop accuracy",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    legend_below(ax, ncol=2, title="one point per run and evaluated step", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def alignment_curves(alignment: pd.DataFrame, keys: Sequence[str], path: Path, title: str) -> Path:
    """Share of (e1, r1) queries (through OOD bridges where there are) whose nearest bridge state (bridge layer 0:
    how hop 2 reads an explicit bridge) is their own bridge, per query layer, over training; one panel per
    configuration and query layer."""
    sub = alignment_subset(alignment)[0]
    sub = sub[sub["bridge_layer"] == 0]
    groups = list(sub.groupby(list(keys), sort=True)) if keys else [((), sub)]
    layers = sorted(sub["query_layer"].unique())
    fig, axes = plt.subplots(len(groups), len(layers), figsize=(3.4 * len(layers), 2.6 * len(groups)), squeeze=False)
    for r, (values, group) in enumerate(groups):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            seed_band(ax, group[group["query_layer"] == layer], "top1")
            heading = f"query layer {layer}" + (f"\n{run_label(keys, values)}" if keys else "")
            ax.set(ylim=(-0.02, 1.02), xlabel="step", title=heading if r == 0 or keys else None)
            ax.title.set_fontsize(9)
            if c == 0:
                ax.set_ylabel("share nearest its own bridge", fontsize=8)
            if r == len(groups) - 1 and c == 0:
                legend_below(ax, ncol=2, title="band: the seeds' range (min to max)", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def weight_name(name: str) -> str:
    """A weight matrix's parameter name in words: "transformer.h.0.mlp.c_fc.weight" -> "block 0 MLP input"."""
    parts = {"wte": "token embedding", "embed": "embedding", "unembed": "unembedding", "lm_head": "unembedding",
             "c_fc": "MLP input", "mlp.0": "MLP input", "c_proj": "projection", "mlp.2": "MLP output",
             "c_attn": "attention QKV"}
    block = re.search(r"\.h\.(\d+)\.", name)
    what = next((words for key, words in parts.items() if key in name), name.removesuffix(".weight"))
    if block and "mlp.c_proj" in name:
        what = "MLP output"
    elif block and "attn.c_proj" in name:
        what = "attention output"
    return f"block {block.group(1)} {what}" if block else what


def spectrum_plot(spectrum: pd.DataFrame, keys: Sequence[str], path: Path, title: str,
                  weights: Sequence[str] | None = None) -> Path:
    """Final normalized singular values (largest = 1) of a few weight matrices, per condition (mean over seeds)."""
    weights = list(weights or sorted(spectrum["weight"].unique())[:4])
    groups = list(spectrum.groupby(list(keys), sort=True)) if keys else [((), spectrum)]
    fig, axes = plt.subplots(len(groups), len(weights), figsize=(3.4 * len(weights), 2.6 * len(groups)), squeeze=False)
    for r, (values, group) in enumerate(groups):
        for c, weight in enumerate(weights):
            ax = axes[r][c]
            for condition, part in group[group["weight"] == weight].groupby("condition"):
                largest = part.groupby("seed")["singular_value"].transform("max")
                part = part.assign(norm=part["singular_value"] / largest)
                curve = part.groupby("index")["norm"].mean()
                ax.plot(curve.index, curve.values, color=COLORS.get(condition), label=condition)
            heading = weight_name(weight) + (f"\n{run_label(keys, values)}" if keys else "")
            ax.set(yscale="log", xlabel="singular value index", title=heading if r == 0 or keys else None)
            ax.title.set_fontsize(9)
            if c == 0:
                ax.set_ylabel("singular value / largest", fontsize=8)
            if r == len(groups) - 1 and c == 0:
                legend_below(ax, ncol=3)
    fig.suptitle(title)
    return save_figure(fig, path)


def nuclear_norm_curves(weights: pd.DataFrame, keys: Sequence[str], path: Path, title: str) -> Path:
    """The nuclear norm summed over all weight matrices, against the step, per condition (mean over seeds, band:
    the seeds' range); one panel per configuration."""
    total = weights.groupby([*keys, "condition", "seed", "step"], as_index=False)["nuclear_norm"].sum()
    groups = list(total.groupby(list(keys), sort=True)) if keys else [((), total)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (values, group) in zip(axes[0], groups):
        seed_band(ax, group, "nuclear_norm")
        ax.set(xlabel="step", ylabel="sum of nuclear norms", title=run_label(keys, values))
        legend_below(ax, ncol=3, title="shaded: the seeds' range (min to max)", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def lens_layer_plot(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Median rank of the bridge and of the answer on the two-hop prompt per layer, one line per model state (base,
    each adapter); one panel per split and target. ``layers``: :func:`analyses.aggregate.per_layer` rows with
    ``state`` and ``split`` columns."""
    splits = sorted(layers["split"].unique())
    targets = ["bridge", "answer"]
    fig, axes = plt.subplots(len(targets), len(splits), figsize=(6 * len(splits), 3.6 * len(targets)), squeeze=False,
                             sharex=True)
    for c, split in enumerate(splits):
        for r, target in enumerate(targets):
            ax = axes[r][c]
            part = layers[(layers["split"] == split) & (layers["prompt_kind"] == "two_hop") & (layers["target"] == target)]
            for state, sub in part.groupby("state"):
                ax.plot(sub["layer"], sub["median_rank"] + 1, color=COLORS.get(state), label=state)
            ax.set_yscale("log")
            ax.invert_yaxis()
            ax.set(ylabel="median rank + 1 (log; up is better)", title=f"{target}, {split} two-hop prompts",
                   xlabel="layer" if r == len(targets) - 1 else "")
    legend_below(axes[-1][0], ncol=3)
    fig.suptitle(title)
    return save_figure(fig, path)


def patching_layer_plot(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """Per-layer recovery of the residual stream at the last position (mean and 95% CI over pairs) for each model
    state. ``layers``: :func:`analyses.patching_report.by_layer` rows with a ``state`` column."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for state, sub in layers.groupby("state"):
        ax.plot(sub["layer"], sub["mean_last"], color=COLORS.get(state), label=state)
        ax.fill_between(sub["layer"], sub["ci_low_last"], sub["ci_high_last"], color=COLORS.get(state), alpha=0.15)
    ax.set(xlabel="layer", ylabel="recovery at the last token", title=title)
    legend_below(ax, ncol=3, title="shaded: 95% CI over pairs", title_fontsize=7)
    return save_figure(fig, path)
