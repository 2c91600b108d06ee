"""The figures of the shared-memory report (:mod:`analyses.memory_report`): per-layer curves with their 95%
intervals (``memory_layers.png``), and the source x target heatmaps of cross-patching (``memory_crosspatch.png``)
and of back-patching (``memory_backpatch.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.memory_tables import TOP_K, curve_rows  # noqa: E402
from bridgeprobe.analyses.plots import legend_below, save_figure  # noqa: E402


# --------------------------------------------------------------------------------------------------- plots


def _heat(ax: plt.Axes, cells: pd.DataFrame, column: str, title: str, limit: float, cmap: str) -> Any:
    """A source x target heatmap on the layer grid of the cells (the layers that have more than one partner layer;
    the full diagonal is drawn as curves in ``memory_layers.png``), each grid cell one block."""
    sources = sorted(l for l, n in cells.groupby("source_layer")["target_layer"].nunique().items() if n > 1)
    targets = sorted(l for l, n in cells.groupby("target_layer")["source_layer"].nunique().items() if n > 1)
    sources, targets = sources or sorted(cells["source_layer"].unique()), targets or sorted(cells["target_layer"].unique())
    grid = cells.pivot_table(index="target_layer", columns="source_layer", values=column, aggfunc="first")
    grid = grid.reindex(index=targets, columns=sources)
    image = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), origin="lower", cmap=cmap,
                      vmin=-limit if cmap == "RdBu_r" else 0, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(sources)), [str(int(l)) for l in sources], fontsize=7)
    ax.set_yticks(range(len(targets)), [str(int(l)) for l in targets], fontsize=7)
    ax.set(xlabel="source layer (two-hop prompt)", ylabel="target layer (hop2 prompt)", title=title)
    return image


def crosspatch_heatmaps(cells: pd.DataFrame, path: Path, title: str) -> Path:
    """Source x target maps: A's state (main), a random item's state, and their difference, at the last token and
    at e1's last token."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for row, position in enumerate(("last", "e1_last")):
        main = cells[(cells["condition"] == "main") & (cells["source_position"] == position)]
        rand = cells[(cells["condition"] == "random") & (cells["source_position"] == position)]
        for ax, sub, column, name, cmap, limit in (
            (axes[row, 0], main, "value", "A's state", "RdBu_r", 1.0),
            (axes[row, 1], rand, "value", "random item's state", "RdBu_r", 1.0),
            (axes[row, 2], main, "specific", "bridge-specific: A - random", "RdBu_r", 0.5),
        ):
            if sub.empty or column not in sub:
                ax.axis("off")
                continue
            image = _heat(ax, sub, column, f"{name}, source at {position}", limit, cmap)
            fig.colorbar(image, ax=ax, label="normalized effect (1 = bridge written out)")
    fig.suptitle(title)
    return save_figure(fig, path)


def _band(ax: plt.Axes, summary: dict[str, Any]) -> None:
    if summary.get("band"):
        ax.axvspan(summary["band"][0] - 0.5, summary["band"][1] + 0.5, color="gold", alpha=0.2)
    if summary.get("answer_rise_layer") is not None:
        ax.axvline(summary["answer_rise_layer"], color="tab:red", ls=":", lw=1)


# Colours: blue = the latent state at the last token, purple = at e1's last token, green = the explicit bridge,
# grey = the control (random item's state, partner's bridge, chance), orange = the logit lens, black = a difference.
LAYER_PANELS = [
    ("Cross-patching (source = target layer)", "normalized effect", [
        ("crosspatch", "main_last", "A's state (last token)", "tab:blue", "-"),
        ("crosspatch", "random_last", "random item's state (control)", "tab:gray", "-"),
        ("crosspatch", "specific_last", "bridge-specific (A - random)", "black", "-"),
        ("crosspatch", "specific_e1_last", "bridge-specific, e1's last token", "tab:purple", "--"),
        ("crosspatch", "specific_transfer_last", "other relation: toward the bridge's value there, A - random",
         "tab:brown", ":"),
    ]),
    ("Decoding at the last token (bridge in top 10)", "fraction of prompts", [
        ("decoding", f"latent_last_fixed_bridge_top{TOP_K}", "decoded (fixed target layer)", "tab:blue", "-"),
        ("decoding", f"latent_last_same_bridge_top{TOP_K}", "decoded (same layer)", "tab:blue", "--"),
        ("decoding", f"latent_last_fixed_partner_top{TOP_K}", "chance: partner's bridge decoded", "tab:gray", "-"),
        ("lens", f"latent_last_bridge_top{TOP_K}", "logit lens on the same state", "tab:orange", "-"),
    ]),
    ("Decoding at e1 and of the explicit bridge", "fraction of prompts", [
        ("decoding", f"latent_e1_last_fixed_bridge_top{TOP_K}", "decoded, latent at e1's last token", "tab:purple", "-"),
        ("decoding", f"latent_e1_last_fixed_partner_top{TOP_K}", "chance at e1's last token", "tab:gray", ":"),
        ("decoding", f"explicit_bridge_fixed_bridge_top{TOP_K}", "decoded, explicit bridge", "tab:green", "-"),
        ("lens", f"explicit_bridge_bridge_top{TOP_K}", "logit lens, explicit bridge", "tab:orange", ":"),
    ]),
    ("Alignment of latent and explicit states", "similarity", [
        ("alignment", "cosine_centered_matched", "centered cosine, same item", "tab:blue", "-"),
        ("alignment", "cosine_centered_mismatched", "centered cosine, partner (control)", "tab:gray", "-"),
        ("alignment", "cka_matched", "linear CKA, matched", "tab:blue", "--"),
        ("alignment", "cka_mismatched", "linear CKA, partners (control)", "tab:gray", "--"),
        ("alignment", "cosine_centered_gap_e1_last", "centered cosine gap (same - partner) at e1", "tab:purple", ":"),
    ]),
    ("Linear probe for the bridge", "accuracy", [
        ("alignment", "probe_latent", "trained on explicit, tested on latent", "tab:blue", "-"),
        ("alignment", "probe_latent_templates", "trained on templates, tested on latent", "tab:blue", ":"),
        ("alignment", "probe_latent_e1_last", "trained on explicit, tested on latent at e1", "tab:purple", "-"),
        ("alignment", "probe_explicit_heldout", "trained on templates, tested on hop2 (held out)", "tab:green", "-"),
    ]),
]


def layer_curves(table: pd.DataFrame, summary: dict[str, Any], path: Path, title: str) -> Path:
    """Per-layer curves with 95% CIs (at most five per panel, legends under the panels): cross-patching on the
    diagonal, decoding beside the logit lens, alignment (cosine, CKA) and the probe; the last panel explains the
    shading, the band and the answer's rise."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(3, 2, figsize=(14, 14))
    for ax, (name, ylabel, lines) in zip(axes.flat, LAYER_PANELS):
        for analysis, curve, label, color, style in lines:
            rows = curve_rows(table, analysis, curve)
            if rows.empty:
                continue
            ax.plot(rows.index, rows["mean"], style, color=color, label=label, lw=1.8)
            if rows["ci_low"].notna().any():
                ax.fill_between(rows.index, rows["ci_low"], rows["ci_high"], color=color, alpha=0.15)
        if name.startswith("Linear probe") and summary.get("probe_chance") is not None:
            ax.axhline(summary["probe_chance"], color="tab:gray", ls="--", lw=1, label="chance (majority bridge)")
        _band(ax, summary)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="layer", ylabel=ylabel, title=name)
        legend_below(ax, ncol=1)
    key = axes.flat[-1]
    key.axis("off")
    key.legend(handles=[Patch(color="tab:blue", alpha=0.15, label="shaded: 95% CI of the curve of the same colour"),
                        Patch(color="gold", alpha=0.2, label="the band (all four tests hold)"),
                        Line2D([], [], color="tab:red", ls=":", label="layer where the answer rises (median)")],
               loc="center", fontsize=10, frameon=False, title="Key", title_fontsize=10)
    fig.suptitle(title)
    return save_figure(fig, path)


def backpatch_heatmaps(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Fraction of failures fixed and of correct prompts broken, per (source, target) layer."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, group, column, name in ((axes[0], "hops_ok_composition_failed", "top1_rate", "failures fixed"),
                                    (axes[1], "correct", "broken", "correct prompts broken")):
        sub = table[table["group"] == group].assign(broken=lambda f: 1 - f["top1_rate"])
        if sub.empty:
            ax.axis("off")
            continue
        image = _heat(ax, sub, column, f"{name} (n={int(sub['n'].max())})", 1.0, "viridis")
        ax.set(xlabel="source layer (later)", ylabel="target layer (earlier)")
        fig.colorbar(image, ax=ax, label="fraction of prompts")
    fig.suptitle(title)
    return save_figure(fig, path)
