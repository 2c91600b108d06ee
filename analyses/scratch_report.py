"""Tables of ``bridgeprobe scratch-analysis``: the identity dose as a within-model contrast and Sec. 4.1's
cross-prompt patch, identity vs no identity, with the seed as the unit of inference.

Inputs are the long tables :mod:`probes.identity.scratch_analysis` produces: ``ood_items.csv`` (one row per model and OOD
query) and ``crosspatch.csv`` (one row per model, split, source layer and target layer). A model is named by its
``cell`` (the run directory), grid knobs, ``condition`` and ``seed``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from bridgeprobe.analyses.page import p_number
from bridgeprobe.analyses.stats import mean_interval, signflip_test

CONDITIONS = ("no_identity", "identity")
MODEL_KEYS = ("cell", "identity_coverage", "model", "init_scale", "weight_decay", "identity_repeat")


def _over_seeds(per_seed: pd.Series, prefix: str) -> dict[str, Any]:
    """Mean of per-seed values with its Student t interval over seeds (none below 3 seeds), the exact two-sided
    sign-flip p over seeds and the seeds above zero."""
    interval = mean_interval(per_seed.to_numpy(), "t")
    return {f"{prefix}": interval.estimate, f"{prefix} ci_low": interval.low, f"{prefix} ci_high": interval.high,
            f"{prefix} signflip p": signflip_test(per_seed.to_numpy(), "two-sided") if len(per_seed) else np.nan,
            f"{prefix} seeds above 0": f"{int((per_seed > 0).sum())}/{len(per_seed)}"}


def coverage_table(items: pd.DataFrame) -> pd.DataFrame:
    """Per cell and condition: OOD two-hop accuracy (mean over seeds), accuracy through covered and through
    uncovered bridges, and their within-model contrast (covered minus uncovered, per seed, then over seeds). The
    no-identity rows carry the same draw of covered bridges: their contrast is a placebo (expected 0 on average;
    in one draw the covered bridges may be easier or harder). The identity rows also carry the difference in
    differences: per seed, the identity model's contrast minus the no-identity model's on the same items, which
    removes how hard the drawn bridges happen to be."""
    rows = []
    keys = [k for k in MODEL_KEYS if k in items]
    contrasts: dict[tuple, pd.Series] = {}
    for values, part in items.groupby([*keys, "condition"], sort=True, dropna=False):
        row = dict(zip([*keys, "condition"], values))
        per_seed = part.groupby("seed")["correct"].mean()
        by_cover = part.pivot_table(index="seed", columns="covered", values="correct", aggfunc="mean")
        row.update({"seeds": len(per_seed), "ood acc": float(per_seed.mean()),
                    "covered acc": float(by_cover[True].mean()) if True in by_cover else np.nan,
                    "uncovered acc": float(by_cover[False].mean()) if False in by_cover else np.nan})
        if True in by_cover and False in by_cover:
            contrasts[values] = (by_cover[True] - by_cover[False]).dropna()
            row.update(_over_seeds(contrasts[values], "contrast"))
        rows.append(row)
    for row in rows:
        cell = tuple(row[k] for k in keys)
        mine, placebo = contrasts.get((*cell, "identity")), contrasts.get((*cell, "no_identity"))
        if row["condition"] == "identity" and mine is not None and placebo is not None:
            row.update(_over_seeds((mine - placebo).dropna(), "did"))
    return pd.DataFrame(rows)


def patch_table(patch: pd.DataFrame) -> pd.DataFrame:
    """Per cell, split, source and target layer: the transfer and own rates per condition (mean over seeds) and
    identity minus no identity in transfer (same seed, then over seeds), with the items counted (mean per model)."""
    keys = [k for k in MODEL_KEYS if k in patch] + ["split", "source_layer", "target_layer"]
    rows = []
    for values, part in patch.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, values))
        wide = part.pivot_table(index="seed", columns="condition", values=["transfer", "own", "items"])
        for condition in CONDITIONS:
            for measure in ("transfer", "own", "items"):
                column = wide.get((measure, condition))
                row[f"{measure} {condition}"] = float(column.mean()) if column is not None else np.nan
        if all(("transfer", c) in wide for c in CONDITIONS):
            row.update(_over_seeds((wide[("transfer", "identity")] - wide[("transfer", "no_identity")]).dropna(),
                                   "transfer delta"))
        rows.append(row)
    return pd.DataFrame(rows)


def _ci(row: pd.Series, prefix: str) -> str:
    if pd.isna(row.get(prefix)):
        return "–"
    if pd.isna(row.get(f"{prefix} ci_low")):
        return f"{row[prefix]:+.3f} (n too small)"
    return f"{row[prefix]:+.3f} [{row[f'{prefix} ci_low']:+.3f}, {row[f'{prefix} ci_high']:+.3f}]"


def _text(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def coverage_markdown(table: pd.DataFrame) -> str:
    header = ("cell", "coverage", "condition", "seeds", "OOD acc", "covered", "uncovered",
              "covered - uncovered [95% t, seeds]", "sign-flip p", "seeds > 0",
              "minus the no-identity model's [95% t, seeds]", "sign-flip p")
    rows = [(str(r["cell"]), f"{r['identity_coverage']:g}", r["condition"], str(r["seeds"]), f"{r['ood acc']:.3f}",
             "–" if pd.isna(r["covered acc"]) else f"{r['covered acc']:.3f}",
             "–" if pd.isna(r["uncovered acc"]) else f"{r['uncovered acc']:.3f}", _ci(r, "contrast"),
             p_number(r.get("contrast signflip p")), _text(r.get("contrast seeds above 0")), _ci(r, "did"),
             p_number(r.get("did signflip p")))
            for _, r in table.iterrows()]
    return _markdown(header, rows)


def patch_markdown(table: pd.DataFrame) -> str:
    header = ("cell", "split", "source layer", "target layer", "items", "transfer, no identity",
              "transfer, identity", "identity - none [95% t, seeds]", "sign-flip p", "own, no identity",
              "own, identity")
    rows = [(str(r["cell"]), r["split"], str(r["source_layer"]), str(r["target_layer"]),
             f"{np.nanmean([r['items no_identity'], r['items identity']]):.0f}",
             f"{r['transfer no_identity']:.3f}", f"{r['transfer identity']:.3f}", _ci(r, "transfer delta"),
             p_number(r.get("transfer delta signflip p")), f"{r['own no_identity']:.3f}", f"{r['own identity']:.3f}")
            for _, r in table.iterrows()]
    return _markdown(header, rows)


def finding_lines(coverage: pd.DataFrame, patch: pd.DataFrame, n_layers: int | None) -> list[str]:
    """The opening sentences: the dose contrast of the identity models (where coverage is partial) and the
    last-layer-into-input patch (the paper's Sec. 4.1 test) on the OOD queries."""
    lines = []
    partial = coverage[(coverage["condition"] == "identity") & coverage["contrast"].notna()] \
        if "contrast" in coverage else coverage.iloc[0:0]
    for _, r in partial.iterrows():
        placebo = coverage[(coverage["cell"] == r["cell"]) & (coverage["condition"] == "no_identity")].iloc[0]
        lines.append(f"{r['cell']} (identity for {r['identity_coverage']:.0%} of the bridges): OOD accuracy "
                     f"{r['ood acc']:.2f}; through covered bridges minus uncovered {_ci(r, 'contrast')} over "
                     f"{r['seeds']} seeds (sign-flip p = {p_number(r['contrast signflip p'])}); the same draw in the "
                     f"no-identity models (placebo) {_ci(placebo, 'contrast')}; identity's contrast minus the "
                     f"placebo's, seed by seed, {_ci(r, 'did')} (p = {p_number(r.get('did signflip p'))}).")
    if n_layers is not None and len(patch):
        key = patch[(patch["split"] == "ood_test") & (patch["source_layer"] == n_layers) & (patch["target_layer"] == 0)]
        for _, r in key.iterrows():
            lines.append(f"{r['cell']}: the last-layer state of (a, r1) written in place of the bridge's input "
                         f"gives hop 2 of a's bridge on OOD queries in {r['transfer no_identity']:.0%} of items "
                         f"without identity and {r['transfer identity']:.0%} with (difference "
                         f"{_ci(r, 'transfer delta')}, p = {p_number(r['transfer delta signflip p'])}).")
    return lines
