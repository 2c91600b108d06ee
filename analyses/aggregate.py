"""Aggregate ``lens.csv`` into per-layer and per-prompt tables and a JSON-ready summary.

Definitions (all on the last prompt position):
- a prompt is answered correctly when its target's first token has rank 0 at the last layer (the model's own
  greedy next token): ``two_hop_correct`` (answer on the two-hop prompt), ``hop1_correct`` (bridge on hop1),
  ``hop2_correct`` (answer on hop2);
- ``bridge_peak_layer``: the layer where the bridge's rank on the two-hop prompt is lowest (ties: higher
  probability, then earlier layer);
- ``answer_rise_layer``: the first layer from which the answer stays in the top ``TOP_K`` through the last layer
  (empty when it ends outside the top ``TOP_K``);
- ``group``: ``correct`` (two-hop right), ``hops_ok_composition_failed`` (two-hop wrong though both one-hop
  prompts are right: the interesting failures), ``hop_failed`` (two-hop wrong and a hop wrong), ``no_hop_prompts``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

TOP_K = 10
TOPK_RATES = (1, 5, 10)
GROUPS = ("correct", "hops_ok_composition_failed", "hop_failed", "no_hop_prompts")


def last_position(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the rows read at each prompt's last token."""
    return frame[frame["position"] == frame["n_prompt_tokens"] - 1]


def per_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (prompt_kind, target, layer): median and quartile ranks, top-k rates, mean probability, count."""
    last = last_position(frame)
    grouped = last.groupby(["prompt_kind", "target", "layer"])["rank"]
    table = pd.DataFrame({
        "median_rank": grouped.median(),
        "q25_rank": grouped.quantile(0.25),
        "q75_rank": grouped.quantile(0.75),
        **{f"top{k}_rate": grouped.apply(lambda r, k=k: float((r < k).mean())) for k in TOPK_RATES},
        "mean_prob": last.groupby(["prompt_kind", "target", "layer"])["prob"].mean(),
        "n": grouped.size(),
    })
    return table.reset_index()


def _ranks(last: pd.DataFrame, kind: str, target: str) -> pd.DataFrame:
    """prompt_id x layer matrix of ranks for one probe."""
    sub = last[(last["prompt_kind"] == kind) & (last["target"] == target)]
    return sub.pivot(index="prompt_id", columns="layer", values="rank")


def per_prompt(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: correctness, bridge peak and answer rise layers, best bridge rank, group."""
    last = last_position(frame)
    bridge = _ranks(last, "two_hop", "bridge")
    answer = _ranks(last, "two_hop", "answer")
    bridge_prob = last[(last["prompt_kind"] == "two_hop") & (last["target"] == "bridge")].pivot(
        index="prompt_id", columns="layer", values="prob")
    final = bridge.columns.max()
    out = pd.DataFrame(index=bridge.index)
    out["two_hop_correct"] = answer[final] == 0
    for kind, target in (("hop1", "bridge"), ("hop2", "answer")):
        ranks = _ranks(last, kind, target)
        out[f"{kind}_correct"] = (ranks[final] == 0).reindex(out.index) if len(ranks) else np.nan
    out["bridge_best_rank"] = bridge.min(axis=1)
    out["bridge_peak_layer"] = [_peak(bridge.loc[p], bridge_prob.loc[p]) for p in out.index]
    out["bridge_final_rank"] = bridge[final]
    out["answer_final_rank"] = answer[final]
    out["answer_rise_layer"] = [_rise(answer.loc[p]) for p in out.index]
    out["group"] = [_group(row) for row in out.itertuples()]
    return out.reset_index()


def _peak(ranks: pd.Series, probs: pd.Series) -> int:
    order = np.lexsort((ranks.index.to_numpy(), -probs.to_numpy(), ranks.to_numpy()))  # last key sorts first
    return int(ranks.index[order[0]])


def _rise(ranks: pd.Series) -> float:
    inside = (ranks < TOP_K).to_numpy()
    if not inside[-1]:
        return np.nan
    outside = np.flatnonzero(~inside)
    return float(ranks.index[outside[-1] + 1] if len(outside) else ranks.index[0])


def _group(row: Any) -> str:
    if row.two_hop_correct:
        return "correct"
    if pd.isna(row.hop1_correct) or pd.isna(row.hop2_correct):
        return "no_hop_prompts"
    return "hops_ok_composition_failed" if row.hop1_correct and row.hop2_correct else "hop_failed"


def _median(series: pd.Series) -> float | None:
    series = series.dropna()
    return round(float(series.median()), 2) if len(series) else None


def summarize(frame: pd.DataFrame, layers: pd.DataFrame, prompts: pd.DataFrame) -> dict[str, Any]:
    """Dataset-level figures for ``summary.json`` and the report."""
    bridge = layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "bridge")]
    answer = layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "answer")]
    best = bridge.loc[bridge["top10_rate"].idxmax()]
    groups = {}
    for name in GROUPS:
        sub = prompts[prompts["group"] == name]
        if len(sub):
            groups[name] = {
                "n": int(len(sub)),
                "median_bridge_peak_layer": _median(sub["bridge_peak_layer"]),
                "median_answer_rise_layer": _median(sub["answer_rise_layer"]),
                "bridge_top10_any_layer": round(float((sub["bridge_best_rank"] < 10).mean()), 3),
                "bridge_top1_any_layer": round(float((sub["bridge_best_rank"] == 0).mean()), 3),
            }
    return {
        "n_prompts": int(len(prompts)),
        "n_layers": int(frame["layer"].max() + 1),
        "accuracy": {
            "two_hop": round(float(prompts["two_hop_correct"].mean()), 3),
            "hop1": _rate(prompts["hop1_correct"]),
            "hop2": _rate(prompts["hop2_correct"]),
        },
        "bridge": {
            "top10_any_layer": round(float((prompts["bridge_best_rank"] < 10).mean()), 3),
            "top1_any_layer": round(float((prompts["bridge_best_rank"] == 0).mean()), 3),
            "median_peak_layer": _median(prompts["bridge_peak_layer"]),
            "best_layer_by_top10_rate": int(best["layer"]),
            "best_top10_rate": round(float(best["top10_rate"]), 3),
            "median_rank_by_layer": [float(x) for x in bridge["median_rank"]],
        },
        "answer": {
            "median_rise_layer": _median(prompts["answer_rise_layer"]),
            "median_rank_by_layer": [float(x) for x in answer["median_rank"]],
        },
        "groups": groups,
        "definitions": __doc__.split("Definitions (all on the last prompt position):")[1].strip(),
    }


def _rate(values: pd.Series) -> float | None:
    values = values.dropna()
    return round(float(values.astype(bool).mean()), 3) if len(values) else None
