"""The finding of a run in one or two plain sentences, from its summary's numbers: what the evidence says, with its
key number, interval and control, and what it does not show. Each page opens with it, the terminal summary
prints it first, and summary.json carries it (``finding``), so the three never disagree."""

from __future__ import annotations

from typing import Any, Mapping

from bridgeprobe.analyses.aggregate import TOP_K

LAST_LAYERS = 3  # a best layer among the model's last three blocks counts as "at the output"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _points(block: Mapping[str, Any], key: str) -> str:
    low, high = block.get(f"{key}_ci_low"), block.get(f"{key}_ci_high")
    interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None and high is not None else ""
    return f"{100 * block[key]:+.1f} points{interval}"


def lens_finding(summary: Mapping[str, Any]) -> str:
    """Where the logit lens reads the bridge entity: against its matched control when the run has one (no more
    readable than the control / readable mostly at the output / a latent stage before the output), else the
    bridge's own rate and best layer, said to lack a control."""
    bridge, n_layers = summary["bridge"], summary["n_layers"]
    control, diff = summary.get("control") or {}, summary.get("bridge_minus_control") or {}
    rate = (f"the bridge entity is in the top {TOP_K} at some layer for {_pct(bridge['top10_any_layer'])} of "
            f"{summary['n_prompts']:,} two-hop prompts")
    if not control.get("measured") or "top10_any_layer" not in diff:
        return (f"Through the logit lens {rate}, most often at layer {bridge['best_layer_by_top10_rate']} of "
                f"0–{n_layers - 1}; this run has no matched control, so the rate is not compared with chance.")
    against = f"a matched control {_pct(control['top10_any_layer'])}, difference {_points(diff, 'top10_any_layer')}"
    if diff.get("top10_any_layer_ci_low") is None or diff["top10_any_layer_ci_low"] <= 0:
        return (f"Through the logit lens {rate} ({against}): the bridge is not more readable than an unrelated "
                f"entity, so the lens shows no bridge stage.")
    best = diff.get("best_layer")
    if best is None:
        return f"Through the logit lens {rate} ({against}); no layer stands out over the control."
    mid = n_layers // 2
    bridge_mid, control_mid = bridge["median_rank_by_layer"][mid], control["median_rank_by_layer"][mid]
    middle = (f"at the middle layer {mid} its median rank is {bridge_mid:,.0f}, the control's {control_mid:,.0f}")
    if best >= n_layers - LAST_LAYERS:
        where = "the output" if best == n_layers - 1 else "near the output"
        text = (f"Through the logit lens {rate} ({against}), most over its control at layer {best} of "
                f"0–{n_layers - 1}, {where}; {middle}.")
        if bridge_mid >= 0.5 * control_mid:  # not even twice as close to the top as an unrelated entity
            text += " No separate latent bridge stage is visible through the lens."
        return text
    return (f"Through the logit lens {rate} ({against}), most over its control at layer {best} of "
            f"0–{n_layers - 1}, before the output ({middle}): a latent bridge stage is visible there.")
