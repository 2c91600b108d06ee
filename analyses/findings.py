"""The finding of a run in one or two plain sentences, from its summary's numbers: what the evidence says, with its
key number, interval and control, and what it does not show. Each page opens with it, the terminal summary
prints it first, and summary.json carries it (``finding``), so the three never disagree."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from bridgeprobe.analyses.aggregate import TOP_K
from bridgeprobe.analyses.page import p_number

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


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _over_seeds(row: Mapping[str, Any], prefix: str, digits: int = 2) -> str:
    low, high = row.get(f"{prefix} ci_low"), row.get(f"{prefix} ci_high")
    if low is None or low != low:  # NaN: fewer than 3 seeds
        return f"{row[prefix]:+.{digits}f} (no interval below 3 seeds)"
    if low == high:
        return f"{row[prefix]:+.{digits}f} (every seed the same)"
    return f"{row[prefix]:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def reproduce_finding(table: Any, chance: float, labels: Sequence[str] = ()) -> str:
    """The from-scratch comparison (:func:`analyses.identity_report.comparison_table` rows): per configuration,
    OOD two-hop accuracy with and without identity against chance, the difference over seeds with its interval,
    the seeds where identity is higher and the one-sided sign-flip p; ID two-hop beside it. ``labels`` name the
    configurations when there are several."""
    sentences = []
    for n, row in enumerate(table.to_dict("records")):
        ood, idd = "ood_two_hop_acc", "id_two_hop_acc"
        interval = _over_seeds({"delta": row[f"{ood} delta mean"], "delta ci_low": row[f"{ood} delta ci_low"],
                                "delta ci_high": row[f"{ood} delta ci_high"]}, "delta")
        shown = row[f"{ood} delta ci_low"] > 0 if row[f"{ood} delta ci_low"] == row[f"{ood} delta ci_low"] else None
        verdict = {True: "identity helps", False: "no difference shown", None: "too few seeds to tell"}[shown]
        prefix = f"{labels[n]}: " if len(labels) > n and len(table) > 1 else ""
        sentences.append(
            f"{prefix}With identity supervision OOD two-hop accuracy is {row[f'{ood} identity mean']:.2f} against "
            f"{row[f'{ood} no_identity mean']:.2f} without (chance {chance:.2f}): {verdict}, difference {interval} "
            f"over {_seeds(row['seeds'])}, identity higher in {row[f'{ood} identity higher']}"
            + (f" (one-sided sign-flip p = {p_number(row[f'{ood} signflip p'])})"
               if row[f"{ood} signflip p"] == row[f"{ood} signflip p"] else "")
            + f"; in-distribution two-hop {row[f'{idd} no_identity mean']:.2f} without, "
            f"{row[f'{idd} identity mean']:.2f} with.")
    return " ".join(sentences)


def finetune_finding(comparison: Any, task: str) -> str:
    """The LoRA comparison (:func:`analyses.identity_report.item_comparison`) on the split that tests the claim:
    never-seen reversals (``reversal``) or OOD two-hop queries (``two_hop``), identity vs none, over seeds."""
    split, name = (("reverse_test", "never-seen reversed questions") if task == "reversal"
                   else ("ood_two_hop", "OOD two-hop queries"))
    rows = comparison[comparison["split"] == split].to_dict("records")
    if not rows or "delta" not in rows[0]:
        return f"No comparison of identity and no identity on the {name} (one condition only)."
    row = rows[0]
    low = row["delta ci_low"]
    shown = None if low != low else low > 0 or row["delta ci_high"] < 0
    verdict = {True: "a difference", False: "no difference shown", None: "too few seeds to tell"}[shown]
    return (f"On {row['items']} {name}, the adapter trained with identity sentences answers {row['identity acc']:.1%} "
            f"and the one without {row['no_identity acc']:.1%} (base model {row.get('base acc', float('nan')):.1%}): "
            f"{verdict}, difference {_over_seeds(row, 'delta', 3)} over {_seeds(row['seeds'])} (identity higher in "
            f"{row['seeds identity higher']}).")


POSITION_NAMES = {"last": "at the last token", "e1_last": "at the last token of e1 (the first entity of the two-hop prompt)"}
TEST_NAMES = {"crosspatch": "cross-patching", "other_relation": "the other-relation control",
              "decoding": "decoding", "probe": "the linear probe"}


def _layers(text: str) -> str:
    return f"layer{'s' if ('-' in text or ',' in text) else ''} {text}"


def memory_finding(summary: Mapping[str, Any]) -> str:
    """The shared-memory decision per position in words (:func:`analyses.memory_band.decide` statuses): a band of
    layers where every test holds, none (ruled out at every layer), or not decided, with where the tests that
    hold do and, when undecided, the items that would decide the hardest layer as the estimates stand."""
    parts = []
    for position, part in summary["positions"].items():
        where = POSITION_NAMES.get(position, position)
        holding = {TEST_NAMES.get(t, t): layers for t, layers in part["layers_by_evidence"].items()
                   if t in TEST_NAMES and layers != "none"}
        held = "; ".join(f"{name} holds at {_layers(layers)}" for name, layers in holding.items()) or "no test holds"
        if part["status"] == "band":
            first, last = part["band"]
            band = f"layer {first}" if first == last else f"layers {first}-{last}"
            parts.append(f"{where}, a shared latent memory band at {band}: every test holds there ({held})")
        elif part["status"] == "none":
            parts.append(f"{where}, no band: at every layer some test is ruled out ({held})")
        else:
            need = part.get("to_decide") or {}
            more = (f"; as the estimates stand, layer {need['layer']} needs about {need['items']:,} items for "
                    f"{TEST_NAMES.get(need['test'], need['test'])}" if need.get("items") else "")
            parts.append(f"{where}, not decided ({held}{more})")
    text = f"{summary['model']}: " + ". ".join(p[0].upper() + p[1:] for p in parts) + "."
    command = str((summary.get("provenance") or {}).get("command", ""))
    if command.startswith("bridgeprobe run") and any(p["status"] == "undecided" for p in summary["positions"].values()):
        text += (f" This section of the main job is a preview on {summary['n_items']} items; `bridgeprobe memory` "
                 "on the whole prompt set decides (docs/memory.md).")
    return text
