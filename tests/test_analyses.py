"""Aggregation over pairs: means and 95% intervals against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.patching_report import by_cell, by_layer


def _frame(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for pair in range(5):
        for layer in range(3):
            for position in range(4):
                rows.append({"clean_id": f"p{pair}", "site": "resid_pre", "layer": layer, "position": position,
                             "position_from_end": position - 3, "head": None, "value": rng.normal()})
    return pd.DataFrame(rows)


def test_cell_and_layer_aggregates_match_numpy() -> None:
    frame = _frame(np.random.default_rng(0))
    cells = by_cell(frame)
    values = frame[(frame.layer == 1) & (frame.position_from_end == -2)]["value"].to_numpy()
    row = cells[(cells.layer == 1) & (cells.position_from_end == -2)].iloc[0]
    sem = values.std(ddof=1) / np.sqrt(len(values))
    assert np.isclose(row["mean"], values.mean()) and np.isclose(row["ci_high"], values.mean() + 1.96 * sem)
    layers = by_layer(frame)
    best = frame[frame.layer == 2].groupby("clean_id")["value"].max().to_numpy()
    last = frame[(frame.layer == 2) & (frame.position_from_end == 0)]["value"].to_numpy()
    row = layers[layers.layer == 2].iloc[0]
    assert np.isclose(row["mean_best_position"], best.mean()) and np.isclose(row["mean_last"], last.mean())
    assert row["n_last"] == 5
