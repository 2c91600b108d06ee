"""Aggregation over pairs: means and 95% intervals against a direct scipy/numpy computation; pair exclusion by
gap; the best position per direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses.patching_report import BEST, MIN_PAIR_GAP, by_cell, by_layer, exclusion_text, pair_gaps


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
    high = values.mean() + sps.t.ppf(0.975, len(values) - 1) * sem
    assert np.isclose(row["mean"], values.mean()) and np.isclose(row["ci_high"], high) and row["n"] == 5
    layers = by_layer(frame)
    best = frame[frame.layer == 2].groupby("clean_id")["value"].max().to_numpy()
    last = frame[(frame.layer == 2) & (frame.position_from_end == 0)]["value"].to_numpy()
    row = layers[layers.layer == 2].iloc[0]
    assert np.isclose(row["mean_best_position"], best.mean()) and np.isclose(row["mean_last"], last.mean())
    assert row["n_last"] == 5


def test_noise_direction_takes_the_minimum_over_positions_and_labels_the_bias() -> None:
    frame = _frame(np.random.default_rng(1))
    denoise, noise = by_layer(frame, "denoise"), by_layer(frame, "noise")
    lowest = frame[frame.layer == 1].groupby("clean_id")["value"].min().to_numpy()
    assert np.isclose(noise[noise.layer == 1]["mean_best_position"].iloc[0], lowest.mean())
    assert (noise["mean_best_position"] < denoise["mean_best_position"]).all()
    assert "biased upward" in denoise["best_position_rule"].iloc[0] == BEST["denoise"][1]
    assert "min" in noise["best_position_rule"].iloc[0]
    with pytest.raises(KeyError):
        by_layer(frame, "sideways")


def test_pairs_with_small_or_negative_gaps_are_left_out_and_counted() -> None:
    frame = _frame(np.random.default_rng(2))
    gaps = {"p0": 3.0, "p1": 0.2, "p2": -2.0, "p3": 1.5, "p4": 4.0}
    frame["clean_metric"] = frame["clean_id"].map(gaps)
    frame["corrupt_metric"] = 0.0
    frame.loc[frame.clean_id == "p1", "value"] = 50.0  # what a tiny gap does to a recovery
    table = pair_gaps(frame).set_index("clean_id")
    assert table.loc["p1", "excluded"] == f"gap below {MIN_PAIR_GAP:g}" and table.loc["p2", "excluded"] == "negative gap"
    assert (table.loc[["p0", "p3", "p4"], "excluded"] == "").all()
    layers = by_layer(frame)
    assert (layers["n_last"] == 3).all() and (layers["n_excluded"] == 2).all()
    kept = frame[frame.clean_id.isin(["p0", "p3", "p4"]) & (frame.layer == 0) & (frame.position_from_end == 0)]
    assert np.isclose(layers[layers.layer == 0]["mean_last"].iloc[0], kept["value"].mean())
    assert by_cell(frame)["n"].max() == 3
    assert exclusion_text(frame).startswith("3 of 5 pairs kept; 2 left out") and "(1 of them negative)" in exclusion_text(frame)


def test_no_interval_below_three_pairs() -> None:
    frame = _frame(np.random.default_rng(3))
    frame = frame[frame.clean_id.isin(["p0", "p1"])]
    layers = by_layer(frame)
    assert layers["ci_low_last"].isna().all() and (layers["n_last"] == 2).all()
