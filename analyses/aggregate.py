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
  prompts are right: the interesting failures), ``hop_failed`` (two-hop wrong and a hop wrong), ``no_hop_prompts``;
- ``control``: a matched control entity (another item's bridge of the same kind) scored on the two-hop prompt
  exactly like the bridge; every bridge headline (a maximum over layers included) is given beside the same
  statistic of the control and the paired difference bridge - control over prompts, with its interval;
- ``bridge_is_output``: the bridge is the model's own top token at the last layer (rank 0): there the bridge
  "surfacing" is the output, not a latent step; the bridge-minus-control best layer, the "surfaces best"
  table and every comparison between outcome groups (their bridge rates, ``failures_vs_correct``) leave these
  prompts out (counted): a correct prompt's output is the answer, so keeping them would raise the failures'
  rates by definition;
- ``unambiguous``: prompts whose bridge and control rows have no ``target_flags`` (first token shared by several
  entities, shared by bridge and answer, or of at most 2 characters); every headline is repeated on them;
- ``contrast_peak_layer``: the layer where ``log10(control rank + 1) - log10(bridge rank + 1)`` is largest
  (the bridge most ahead of its control; ties: earlier layer), ``contrast_at_peak`` that value.

Intervals (:mod:`analyses.stats`): rates with exact Clopper-Pearson intervals, paired differences with BCa
bootstrap intervals and an exact sign test, n beside each; no interval below 3 prompts. A "best layer" is a
maximum over layers: its rate is biased upward, the control's at the same layer is not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bridgeprobe.analyses.stats import (fisher_test, paired_difference, proportion_interval, proportion_intervals,
                                        sign_test)

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
    table["top10_ci_low"], table["top10_ci_high"] = proportion_intervals(
        (table["top10_rate"] * table["n"]).round(), table["n"])
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
    out["bridge_is_output"] = out["bridge_final_rank"] == 0
    control = _ranks(last, "two_hop", "control").reindex(index=out.index, columns=bridge.columns)
    if control.notna().any().any():
        out["control_best_rank"] = control.min(axis=1)
        out["control_final_rank"] = control[final]
        contrast = np.log10(control + 1) - np.log10(bridge + 1)
        out["contrast_peak_layer"] = contrast.idxmax(axis=1, skipna=True).where(contrast.notna().any(axis=1))
        out["contrast_at_peak"] = contrast.max(axis=1)
    flags = _flags(last)
    if flags is not None:
        out["bridge_flags"] = flags.get("bridge", pd.Series(dtype=str)).reindex(out.index).fillna("")
        out["control_flags"] = flags.get("control", pd.Series(dtype=str)).reindex(out.index).fillna("")
        out["unambiguous"] = (out["bridge_flags"] == "") & (out["control_flags"] == "")
    return out.reset_index()


def _flags(last: pd.DataFrame) -> dict[str, pd.Series] | None:
    """prompt_id -> ``target_flags`` of its two-hop bridge and control rows; None for a lens.csv without flags."""
    if "target_flags" not in last:
        return None
    rows = last[last["prompt_kind"] == "two_hop"]
    return {t: rows[rows["target"] == t].groupby("prompt_id")["target_flags"].first().fillna("").astype(str)
            for t in ("bridge", "control")}


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


def _rate(hits: pd.Series | np.ndarray) -> dict[str, Any]:
    """A rate of 0/1 (NaN = missing) with its exact interval: ``{value, ci_low, ci_high, n}`` (JSON-ready)."""
    values = pd.Series(hits, dtype=float).dropna()
    interval = proportion_interval(int(values.sum()), len(values))
    return _json(interval.estimate, interval.low, interval.high, interval.n, interval.reason)


def _json(value: float, low: float, high: float, n: int, reason: str = "", **extra: Any) -> dict[str, Any]:
    out = {"value": _round(value), "ci_low": _round(low), "ci_high": _round(high), "n": int(n)}
    if reason:
        out["reason"] = reason
    return out | extra


def _round(x: float) -> float | None:
    return None if x is None or pd.isna(x) else round(float(x), 4)


def _difference(bridge: pd.Series, control: pd.Series) -> dict[str, Any]:
    """Paired bridge - control over prompts: mean with its BCa interval, n and the exact sign-test p."""
    interval = paired_difference(bridge.to_numpy(dtype=float), control.to_numpy(dtype=float))
    p, _ = sign_test((bridge - control).to_numpy(dtype=float))
    return _json(interval.estimate, interval.low, interval.high, interval.n, interval.reason,
                 sign_test_p=float(f"{p:.3g}"))


def _flat(block: dict[str, Any]) -> dict[str, Any]:
    """``{key: {value, ci_low, ...}}`` -> ``{key: value, key_ci_low: ..., key_n: ...}``: the summary's layout,
    where a headline stays a plain number and its interval sits beside it."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        if isinstance(value, dict) and "value" in value:
            out[key] = value["value"]
            out |= {f"{key}_{k}": v for k, v in value.items() if k != "value"}
        else:
            out[key] = value
    return out


def headlines(frame: pd.DataFrame, prompts: pd.DataFrame) -> dict[str, Any]:
    """The bridge headlines of ``prompts`` (rows of :func:`per_prompt`) beside the same statistics of the matched
    control and their paired difference (module docstring); ``control.measured`` is False for a lens.csv
    without control rows, and the comparison says so."""
    last = last_position(frame)
    ids = prompts["prompt_id"]
    bridge = _ranks(last, "two_hop", "bridge").reindex(ids)
    top10, top1 = (prompts["bridge_best_rank"] < TOP_K).astype(float), (prompts["bridge_best_rank"] == 0).astype(float)
    rates = (bridge < TOP_K).mean()
    best = int(rates.idxmax()) if len(rates) else None
    out: dict[str, Any] = {"bridge": _flat({
        "top10_any_layer": _rate(top10), "top1_any_layer": _rate(top1),
        "best_layer_by_top10_rate": best,
        "best_top10_rate": _rate((bridge[best] < TOP_K).astype(float).where(bridge[best].notna()))
        if best is not None else None,
        "median_peak_layer": _median(prompts["bridge_peak_layer"]),
        "n_bridge_is_output": int(prompts["bridge_is_output"].sum()),
    })}
    if "control_best_rank" not in prompts:
        out["control"] = {"measured": False, "note": "no control measured (lens.csv has no control rows): the "
                          "bridge rates have no chance level here"}
        out["bridge_minus_control"] = {"measured": False, "note": "no control measured"}
        return out
    control = _ranks(last, "two_hop", "control").reindex(ids)
    c10, c1 = (prompts["control_best_rank"] < TOP_K).astype(float), (prompts["control_best_rank"] == 0).astype(float)
    has = prompts["control_best_rank"].notna().to_numpy()
    c10, c1 = c10.where(has), c1.where(has)
    control_rates = (control < TOP_K).mean()
    out["control"] = _flat({
        "measured": True, "top10_any_layer": _rate(c10), "top1_any_layer": _rate(c1),
        "top10_rate_at_bridge_best_layer": _rate((control[best] < TOP_K).astype(float).where(control[best].notna())),
        "best_layer_by_top10_rate": int(control_rates.idxmax()),
        "best_top10_rate": _rate((control[int(control_rates.idxmax())] < TOP_K).astype(float)
                                 .where(control[int(control_rates.idxmax())].notna())),
        "median_rank_by_layer": [float(x) for x in control.median()],
    })
    latent = ~prompts["bridge_is_output"].to_numpy()  # prompts whose bridge is not simply the output
    diff = ((bridge < TOP_K).astype(float) - (control < TOP_K).astype(float)).where(control.notna())
    by_layer = diff[latent].mean()
    # no layer where the bridge beats its control on average: no best layer to name
    contrast_layer = int(by_layer.idxmax()) if by_layer.notna().any() and by_layer.max() > 0 else None
    out["bridge_minus_control"] = _flat({
        "measured": True,
        "top10_any_layer": _difference(top10.where(has), c10),
        "top1_any_layer": _difference(top1.where(has), c1),
        "best_layer": contrast_layer,
        "best_layer_top10_difference": (_difference((bridge[contrast_layer] < TOP_K).astype(float)[latent],
                                                    (control[contrast_layer] < TOP_K).astype(float)
                                                    .where(control[contrast_layer].notna())[latent])
                                        if contrast_layer is not None else None),
        "best_layer_note": (f"no layer where the bridge's top-{TOP_K} rate exceeds its control's"
                            if contrast_layer is None else
                            f"the layer where the bridge's top-{TOP_K} rate exceeds its control's most, over the "
                            f"{int(latent.sum())} prompts whose bridge is not the model's output at the last layer "
                            f"({int((~latent).sum())} left out); a maximum over layers, so biased upward"),
        "median_contrast_peak_layer": _median(prompts["contrast_peak_layer"][latent]),
    })
    return out


def _failures_vs_correct(prompts: pd.DataFrame) -> dict[str, Any] | None:
    """The composition failures (``hops_ok_composition_failed``) against the correct prompts: the bridge in the
    top 1 and top ``TOP_K`` at some layer, Fisher's exact test, both groups without the prompts whose bridge is
    the output (a correct prompt cannot have it: keeping them makes the failures' rate higher by definition)."""
    latent = prompts[~prompts["bridge_is_output"]]
    failed, correct = (latent[latent["group"] == g] for g in ("hops_ok_composition_failed", "correct"))
    if failed.empty or correct.empty:
        return None
    out: dict[str, Any] = {"n_failures": int(len(failed)), "n_correct": int(len(correct)),
                           "n_bridge_is_output_left_out": int(prompts["bridge_is_output"].sum())}
    for name, hit in (("top1", lambda f: f["bridge_best_rank"] == 0), (f"top{TOP_K}", lambda f: f["bridge_best_rank"] < TOP_K)):
        a, b = int(hit(failed).sum()), int(hit(correct).sum())
        out[f"bridge_{name}_any_layer_fisher_p"] = float(f"{fisher_test(a, len(failed), b, len(correct)):.3g}")
    return out


def summarize(frame: pd.DataFrame, layers: pd.DataFrame, prompts: pd.DataFrame) -> dict[str, Any]:
    """Dataset-level figures for ``summary.json`` and the report: every rate with its interval and n, the bridge
    beside its matched control, all of it again on the unambiguous prompts."""
    bridge = layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "bridge")]
    answer = layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "answer")]
    groups = {}
    for name in GROUPS:
        sub = prompts[prompts["group"] == name]
        if len(sub):
            latent = sub[~sub["bridge_is_output"]]  # a correct prompt's output is the answer, never the bridge
            groups[name] = _flat({
                "n": int(len(sub)),
                "median_bridge_peak_layer": _median(sub["bridge_peak_layer"]),
                "median_answer_rise_layer": _median(sub["answer_rise_layer"]),
                "n_bridge_is_output": int(sub["bridge_is_output"].sum()),
                "bridge_top10_any_layer": _rate((latent["bridge_best_rank"] < TOP_K).astype(float)),
                "bridge_top1_any_layer": _rate((latent["bridge_best_rank"] == 0).astype(float)),
            })
    lead = headlines(frame, prompts)
    lead["bridge"]["median_rank_by_layer"] = [float(x) for x in bridge["median_rank"]]
    if "unambiguous" in prompts:
        subset = prompts[prompts["unambiguous"]]
        unambiguous = {"n_prompts": int(len(subset)), "n_flagged": int(len(prompts) - len(subset)),
                       **(headlines(frame, subset) if len(subset) else {"note": "no unambiguous prompt"})}
    else:
        unambiguous = {"n_prompts": None, "note": "no target flags measured (lens.csv has no target_flags column)"}
    return {
        "n_prompts": int(len(prompts)),
        "n_layers": int(frame["layer"].max() + 1),
        "accuracy": _flat({
            "two_hop": _rate(prompts["two_hop_correct"].astype(float)),
            "hop1": _rate(prompts["hop1_correct"].astype(float)),
            "hop2": _rate(prompts["hop2_correct"].astype(float)),
        }),
        **lead,
        "answer": {
            "median_rise_layer": _median(prompts["answer_rise_layer"]),
            "median_rank_by_layer": [float(x) for x in answer["median_rank"]],
        },
        "unambiguous": unambiguous,
        "groups": groups,
        "failures_vs_correct": _failures_vs_correct(prompts),
        "definitions": __doc__.split("Definitions (all on the last prompt position):")[1].strip(),
    }
