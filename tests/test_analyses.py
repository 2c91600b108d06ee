"""Aggregation over pairs: means and 95% intervals against a direct scipy/numpy computation; pair exclusion by
gap; the best position per direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bridgeprobe.analyses.patching_report import BEST, MIN_PAIR_GAP, by_cell, by_layer, exclusion_text, pair_gaps


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


# ------------------------------------------------------------------------------------------- lens headlines


def _lens_frame(n: int = 40, layers: int = 6, control: bool = True, flags: bool = True) -> pd.DataFrame:
    """Two-hop lens rows with known ranks: the bridge is in the top 10 at layer 3 for prompts 0-23, its control
    for prompts 0-5; prompts 0-3 answer with the bridge (rank 0 at the last layer); prompts 30-39 are flagged."""
    rows = []
    for p in range(n):
        for layer in range(layers):
            ranks = {"bridge": 3 if layer == 3 and p < 24 else 500, "answer": 0 if p % 2 else 50,
                     "control": 4 if layer == 3 and p < 6 else 800}
            if p < 4 and layer == layers - 1:
                ranks["bridge"] = 0
            for target, rank in ranks.items():
                if target == "control" and not control:
                    continue
                row = {"prompt_id": f"q{p:02d}", "prompt_kind": "two_hop", "target": target, "layer": layer,
                       "position": 4, "n_prompt_tokens": 5, "rank": rank, "prob": 1 / (rank + 2)}
                if flags:
                    row["target_flags"] = "short_token" if p >= 30 and target == "bridge" else ""
                rows.append(row)
    return pd.DataFrame(rows)


def _summary(frame: pd.DataFrame) -> dict:
    from bridgeprobe.analyses.aggregate import per_layer, per_prompt, summarize

    return summarize(frame, per_layer(frame), per_prompt(frame))


def test_headlines_stand_beside_their_matched_control_with_paired_intervals() -> None:
    summary = _summary(_lens_frame())
    bridge, control, diff = summary["bridge"], summary["control"], summary["bridge_minus_control"]
    assert bridge["top10_any_layer"] == pytest.approx(24 / 40) and bridge["top10_any_layer_n"] == 40
    ci = sps.binomtest(24, 40).proportion_ci(method="exact")
    assert (bridge["top10_any_layer_ci_low"], bridge["top10_any_layer_ci_high"]) == (
        pytest.approx(ci.low, abs=1e-4), pytest.approx(ci.high, abs=1e-4))
    assert control["measured"] and control["top10_any_layer"] == pytest.approx(6 / 40)
    assert control["top10_rate_at_bridge_best_layer"] == pytest.approx(6 / 40)
    assert diff["top10_any_layer"] == pytest.approx(18 / 40) and diff["top10_any_layer_n"] == 40
    assert 0 < diff["top10_any_layer_ci_low"] < 18 / 40 < diff["top10_any_layer_ci_high"]
    assert diff["top10_any_layer_sign_test_p"] == pytest.approx(sps.binomtest(18, 18).pvalue, rel=1e-3)
    # the prompts that answer with the bridge (0-3) are left out of the contrast: best layer 3 over 36 prompts
    assert bridge["n_bridge_is_output"] == 4
    assert diff["best_layer"] == 3 and diff["best_layer_top10_difference_n"] == 36
    assert diff["best_layer_top10_difference"] == pytest.approx((20 - 2) / 36)
    assert "4 left out" in diff["best_layer_note"] and "biased upward" in diff["best_layer_note"]


def test_unambiguous_subset_repeats_the_headlines() -> None:
    summary = _summary(_lens_frame())
    sub = summary["unambiguous"]
    assert sub["n_prompts"] == 30 and sub["n_flagged"] == 10
    assert sub["bridge"]["top10_any_layer"] == pytest.approx(24 / 30) and sub["bridge"]["top10_any_layer_n"] == 30
    assert sub["bridge_minus_control"]["top10_any_layer"] == pytest.approx(18 / 30)


def test_old_lens_csv_without_control_or_flags_says_so() -> None:
    summary = _summary(_lens_frame(control=False, flags=False))
    assert summary["bridge"]["top10_any_layer"] == pytest.approx(24 / 40)
    assert not summary["control"]["measured"] and "no control measured" in summary["control"]["note"]
    assert "no target flags" in summary["unambiguous"]["note"]


def test_fewer_than_three_prompts_get_no_interval() -> None:
    frame = _lens_frame(n=2)
    summary = _summary(frame)
    assert summary["bridge"]["top10_any_layer_ci_low"] is None and summary["bridge"]["top10_any_layer_n"] == 2
    assert "n < 3" in summary["bridge"]["top10_any_layer_reason"]
