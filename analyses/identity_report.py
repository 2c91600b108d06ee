"""Tables, learning curves and the with/without-identity comparison page of ``bridgeprobe reproduce`` and
``bridgeprobe finetune``.

Inputs are the long tables those commands write: ``metrics.csv`` (one row per run and evaluated step), and, for
``reproduce``, ``alignment.csv`` / ``weights.csv`` / ``spectrum.csv``; for ``finetune``, the logit-lens and
patching tables of the base model and of each adapter. A run is identified by its configuration columns (``keys``,
e.g. init scale and weight decay), its ``condition`` (``identity`` / ``no_identity``) and its ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.plots import legend_below, save_figure  # noqa: E402
from bridgeprobe.analyses.stats import mean_interval, sign_test  # noqa: E402
from bridgeprobe.analyses.page import Figure, Section, render, table as page_table  # noqa: E402
from bridgeprobe.probes.results import atomic_write  # noqa: E402

CONDITIONS = ("no_identity", "identity")
COLORS = {"no_identity": "tab:gray", "identity": "tab:green", "base": "tab:blue"}
ACCURACIES = ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc")
NAMES = {"ood_two_hop_acc": "OOD two-hop", "id_two_hop_acc": "ID two-hop", "one_hop_acc": "one-hop",
         "alignment_top1": "mid-layer alignment"}


def _label(keys: Sequence[str], values: Any) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "all runs"


def comparison_table(results: pd.DataFrame, keys: Sequence[str],
                     metrics: Sequence[str] = ACCURACIES) -> pd.DataFrame:
    """One row per configuration: for each metric, mean and standard deviation over seeds without and with
    identity, the paired difference (identity minus no_identity, same seed) and in how many seeds identity is
    higher; the difference's 95% t interval over seeds (none below 3 seeds) and an exact sign test. ``results``:
    one row per run with ``keys``, ``condition``, ``seed`` and the ``metrics``."""
    rows = []
    groups = results.groupby(list(keys), sort=True) if keys else [((), results)]
    for values, group in groups:
        wide = group.pivot_table(index="seed", columns="condition", values=list(metrics), dropna=False)
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = int(group["seed"].nunique())
        for metric in metrics:
            for condition in CONDITIONS:
                column = wide.get((metric, condition))
                row[f"{metric} {condition} mean"] = float(column.mean()) if column is not None else np.nan
                several = column is not None and len(column) > 1
                row[f"{metric} {condition} std"] = float(column.std(ddof=1)) if several else np.nan
            if all((metric, c) in wide for c in CONDITIONS):
                delta = (wide[(metric, "identity")] - wide[(metric, "no_identity")]).dropna()
                row[f"{metric} delta mean"] = float(delta.mean())
                row[f"{metric} delta std"] = float(delta.std(ddof=1)) if len(delta) > 1 else np.nan
                interval = mean_interval(delta.to_numpy(), "t")  # paired over seeds; none below 3 seeds
                row[f"{metric} delta ci_low"], row[f"{metric} delta ci_high"] = interval.low, interval.high
                row[f"{metric} delta n"] = interval.n
                row[f"{metric} identity higher"] = f"{int((delta > 0).sum())}/{len(delta)}"
                row[f"{metric} sign test p"] = sign_test(delta.to_numpy())[0]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str] = ACCURACIES) -> str:
    """The comparison as a Markdown table: ``mean ± std`` per condition, and the paired difference."""
    header = [*keys, "seeds"]
    for metric in metrics:
        header += [f"{NAMES[metric]} without", f"{NAMES[metric]} with", f"{NAMES[metric]} Δ (higher)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in keys] + [str(row["seeds"])]
        for metric in metrics:
            for condition in CONDITIONS:
                cells.append(_pm(row[f"{metric} {condition} mean"], row[f"{metric} {condition} std"]))
            cells.append(f"{_delta(row, metric)} ({row.get(f'{metric} identity higher', '')})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _delta(row: dict[str, Any], metric: str) -> str:
    """The paired difference identity - no_identity over seeds with its 95% t interval, or why there is none."""
    mean = row.get(f"{metric} delta mean")
    if mean is None or pd.isna(mean):
        return "–"
    low, high, n = row.get(f"{metric} delta ci_low"), row.get(f"{metric} delta ci_high"), row.get(f"{metric} delta n")
    if low is None or pd.isna(low):
        return f"{mean:+.3f} (n = {n} seeds: no interval below 3)"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n = {n})"


def _pm(mean: float | None, std: float | None, sign: bool = False) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text + (f" ± {std:.3f}" if std is not None and not pd.isna(std) else "")


def seed_band(ax: plt.Axes, rows: pd.DataFrame, column: str) -> None:
    """Per condition, ``column`` against the step: the mean over seeds as a line, the seeds' range as a band."""
    for condition, part in rows.groupby("condition"):
        stats = part.groupby("step")[column].agg(["mean", "min", "max"]).dropna()
        if stats.empty:
            continue
        ax.plot(stats.index, stats["mean"], color=COLORS.get(condition), label=condition)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=COLORS.get(condition), alpha=0.15)


def learning_curves(metrics: pd.DataFrame, keys: Sequence[str], path: Path, title: str,
                    columns: Sequence[str] = ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc", "train_loss")) -> Path:
    """One row of panels per configuration, one panel per metric: the mean over seeds against the step for each
    condition, with the seeds' range as a band."""
    groups = list(metrics.groupby(list(keys), sort=True)) if keys else [((), metrics)]
    fig, axes = plt.subplots(len(groups), len(columns), figsize=(3.6 * len(columns), 2.8 * len(groups)),
                             squeeze=False)
    for r, (values, group) in enumerate(groups):
        for c, column in enumerate(columns):
            ax = axes[r][c]
            seed_band(ax, group, column)
            if column == "train_loss":
                ax.set_yscale("log")
            ax.set(xlabel="step", title=column if r == 0 else None)
            if c == 0:
                ax.set_ylabel(_label(keys, values), fontsize=8)
            if r == len(groups) - 1 and c == 0:
                legend_below(ax, ncol=3, title="shaded: the seeds' range (min to max)", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def final_alignment(alignment: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per run (``keys``, condition, seed): ``alignment_top1``, the share of (e1, r1) queries whose middle-layer state
    (query layer ``max // 2``: the only state of the Emb-MLP, layer 1 of a 2-layer GPT-2) is nearest to its own
    bridge's embedding-layer state, at the last evaluated step."""
    mid = int(alignment["query_layer"].max()) // 2
    last = alignment[alignment["step"] == alignment.groupby("run")["step"].transform("max")]
    last = last[(last["query_layer"] == mid) & (last["bridge_layer"] == 0)]
    return last[[*keys, "condition", "seed", "top1"]].rename(columns={"top1": "alignment_top1"})


def alignment_curves(alignment: pd.DataFrame, keys: Sequence[str], path: Path, title: str) -> Path:
    """Share of (e1, r1) queries whose nearest bridge state (bridge layer 0: how hop 2 reads an explicit bridge)
    is their own bridge, per query layer, over training; one panel per configuration and query layer."""
    sub = alignment[alignment["bridge_layer"] == 0]
    groups = list(sub.groupby(list(keys), sort=True)) if keys else [((), sub)]
    layers = sorted(sub["query_layer"].unique())
    fig, axes = plt.subplots(len(groups), len(layers), figsize=(3.4 * len(layers), 2.6 * len(groups)), squeeze=False)
    for r, (values, group) in enumerate(groups):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            seed_band(ax, group[group["query_layer"] == layer], "top1")
            ax.set(ylim=(-0.02, 1.02), xlabel="step", title=f"query layer {layer}" if r == 0 else None)
            if c == 0:
                ax.set_ylabel(_label(keys, values), fontsize=8)
            if r == len(groups) - 1 and c == 0:
                legend_below(ax, ncol=3, title="shaded: the seeds' range (min to max)", title_fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


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
            ax.set(yscale="log", xlabel="index", title=weight if r == 0 else None)
            if c == 0:
                ax.set_ylabel(_label(keys, values), fontsize=8)
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
        ax.set(xlabel="step", ylabel="sum of nuclear norms", title=_label(keys, values))
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


def write_page(path: Path, title: str, intro: str, facts: dict[str, str],
               sections: Sequence[tuple[str, str, Sequence[Path]]]) -> Path:
    """A self-contained HTML page: a title, an introduction, a key/value table and sections of (title, HTML,
    figures)."""
    atomic_write(path, render(title, [Section(heading, "", text, [Figure(f) for f in figures])
                                      for heading, text, figures in sections], intro=intro, facts=facts))
    return path


def comparison_html(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str] = ACCURACIES) -> str:
    """The comparison table as HTML: per configuration and metric, ``mean ± std`` without and with identity, and
    the paired difference."""
    shown = pd.DataFrame([{**{k: row[k] for k in keys}, "seeds": row["seeds"],
                           **{f"{NAMES[m]} {c}": _pm(row[f"{m} {c} mean"], row[f"{m} {c} std"])
                              for m in metrics for c in CONDITIONS},
                           **{f"{NAMES[m]} Δ": f"{_delta(row, m)} ({row.get(f'{m} identity higher', '')})"
                              for m in metrics}}
                          for row in table.to_dict("records")])
    return page_table(shown)


def html_table(frame: pd.DataFrame) -> str:
    """A table for the page, in the style of the lens report."""
    return page_table(frame)
