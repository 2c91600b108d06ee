"""Aggregate ``memory.csv`` (:mod:`probes.memory.analysis`) into tables, per-layer curves with 95% confidence intervals,
heatmaps, and the statement of where the shared latent memory sits: the entry points the CLI calls
(:func:`write_memory_outputs`, :func:`memory_section`) and the page ``memory.html``. The tables are built in
:mod:`analyses.memory_tables`, the band test and the statement in :mod:`analyses.memory_band`, the figures in
:mod:`analyses.memory_plots`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from bridgeprobe.analyses.findings import memory_finding
from bridgeprobe.analyses.memory_band import ALPHA, MIN_EFFECTS, POSITIONS, TEST_NAMES, summarize
from bridgeprobe.analyses.memory_plots import backpatch_heatmaps, crosspatch_heatmaps, layer_curves
from bridgeprobe.analyses.memory_tables import MIN_GAP, backpatch_table, crosspatch_cells, curves, select
from bridgeprobe.analyses.page import Figure, Section, key_values, render
from bridgeprobe.analyses.provenance import provenance
from bridgeprobe.analyses.stats import N_RESAMPLES
from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv, atomic_write_json


# --------------------------------------------------------------------------------------------------- outputs


def write_memory_outputs(frame: pd.DataFrame, out_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """Write ``memory_cells.csv``, ``memory_layers.csv``, ``memory_backpatch.csv``, ``memory_summary.json``, the
    PNGs and ``memory.html``; return the summary (with ``figures``: the PNG paths)."""
    model, n_layers = run["model"], int(run["n_layers"])
    cells = crosspatch_cells(frame)
    table = curves(frame)
    backpatch = backpatch_table(frame)
    summary = summarize(frame, table, backpatch, model, n_layers, cells)
    chance = select(frame, analysis="alignment", metric="chance_majority")["value"]
    summary["probe_chance"] = float(chance.iloc[0]) if len(chance) else None
    summary["settings"] = run.get("memory", {}) | {k: run["settings"].get(k) for k in ("items", "stride", "map_items")
                                                    if k in run.get("settings", {})}
    summary["timings"] = {k: v for k, v in run.get("timings", {}).items() if k.startswith("memory")}
    atomic_write_csv(out_dir / "memory_cells.csv", cells)
    atomic_write_csv(out_dir / "memory_layers.csv", table)
    atomic_write_csv(out_dir / "memory_backpatch.csv", backpatch)
    figures = [layer_curves(table, summary, out_dir / "memory_layers.png", f"Shared latent memory, {model}")]
    if not cells.empty:
        figures.append(crosspatch_heatmaps(cells, out_dir / "memory_crosspatch.png",
                                           f"Cross-prompt patching into the partner's hop2 prompt, {model}"))
    if not backpatch.empty:
        figures.append(backpatch_heatmaps(backpatch, out_dir / "memory_backpatch.png",
                                          f"Back-patching later into earlier layers, {model}"))
    summary["figures"] = [f.name for f in figures]
    summary["provenance"] = provenance(run)
    summary = {"finding": memory_finding(summary), **summary}
    atomic_write_json(out_dir / "memory_summary.json", summary)
    section = memory_section(summary, figures)
    atomic_write(out_dir / "memory.html", render(f"{section.title}, {model}", [section],
                                                 provenance=summary["provenance"], finding=summary["finding"]))
    return summary


EVIDENCE_NAMES = {
    "layer": "layer", "crosspatch_difference": "cross-patch, bridge minus control (A - random item's state)",
    "other_relation_difference": "other relation, bridge minus control (toward the bridge's value there, A - random)",
    "decoding_difference": "decoding, bridge minus control (bridge - partner's bridge in the top 10)",
    "probe_difference": "probe, bridge minus control (names the bridge - names the partner's bridge)",
    "other_relation": "other relation", "probe": "probe",
    "crosspatch_specific_effect": "cross-patch, bridge-specific effect (A - random)",
    "crosspatch_main_value": "cross-patch effect of A's state", "crosspatch_random_value": "cross-patch effect of a "
    "random item's state (control)", "answer_top1_main": "A's answer becomes top 1, A's state",
    "answer_top1_random": "A's answer becomes top 1, random state (control)",
    "other_relation_specific_transfer": "other relation: toward the bridge's value there (A - random)",
    "decoded_top10": "decoded in the top 10", "decoded_top10_chance": "decoded in the top 10, partner's bridge "
    "(chance)", "lens_top10": "logit lens top 10", "probe_latent_accuracy": "probe accuracy on the latent state",
    "probe_chance_majority": "probe chance (majority bridge)", "cosine_centered_gap": "centered cosine gap (same "
    "item - partner)", "cka_matched": "linear CKA, matched", "cka_mismatched": "linear CKA, partners (control)",
    "crosspatch": "cross-patching", "decoding": "decoding", "alignment": "probe",
    "crosspatch_some_target": "A's state written into another layer of the partner's prompt, bridge-specific "
                              "(source layer -> target layer; the best target per source, a maximum: readable "
                              "somewhere, not an effect size)",
}
CAPTIONS = {
    "memory_layers.png": "Per-layer curves, each a mean over prompts with its 95% interval (shaded, same "
                         "colour); the gold span marks the band where all four tests hold, the red "
                         "dotted line the layer where the answer rises. Blue: the latent state at the last token; "
                         "purple: at e1's last token; green: the explicit bridge; grey: controls and chance.",
    "memory_crosspatch.png": "Source layer (two-hop prompt) × target layer (partner's hop2 prompt): the effect of "
                             "A's state, of a random item's state (the control), and their difference; top row at "
                             "the last token, bottom row at e1's last token. 1 = as if A's bridge were written out.",
    "memory_backpatch.png": "Back-patching a later layer's state into an earlier layer of the same prompt: the "
                            "fraction of composition failures fixed (left) and of correct prompts broken (right).",
}


def _sensitivity_html(rows: list[dict[str, Any]]) -> str:
    """The sensitivity table: the decision under each threshold halved and doubled."""
    if not rows:
        return ""
    frame = pd.DataFrame(rows).rename(columns={"min_effect_scale": "minimum effects (x as set)",
                                               "min_gap": "minimum gap (logit)",
                                               **{p: f"at {w}" for p, w in POSITIONS.items()}})
    return ("<h3>Sensitivity</h3><p>The decision with each threshold of the band test halved and doubled (the "
            "others as set).</p>" + frame.to_html(index=False, border=0, classes="data"))


TERMS = ("<p><b>Terms.</b> An item A is a two-hop prompt such as \"The capital of the country where the Eiffel "
         "Tower is located is\", whose bridge (France) is never written in it. <b>e1</b> is the first entity of the "
         "two-hop prompt, its subject (the Eiffel Tower): the bridge can be computed from e1's last token on. "
         "<b>A's state</b> is the hidden state (residual stream) of A's two-hop prompt at one layer, at its last token "
         "or at e1's last token: where the bridge is kept, if it is. A's <b>partner</b> is an item with another "
         "bridge; its hop-2 prompt names that bridge (\"The capital of Italy is\"). <b>Cross-patching</b> writes A's "
         "state into the partner's hop-2 prompt at its bridge: if the state carries France, the prompt moves toward "
         "Paris. The <b>control</b> of each test is the same measurement with a random other item's state or the "
         "partner's bridge.</p>")


def criteria_html() -> str:
    """The band test in plain words, with the thresholds as set (the module docstring is the developers' version)."""
    effects = sorted(set(MIN_EFFECTS.values()))
    minimum = (f"{effects[0]:g} for each test" if len(effects) == 1 else
               ", ".join(f"{TEST_NAMES[t]} {e:g}" for t, e in MIN_EFFECTS.items()))
    return (
        "<p>The band of the shared memory is the longest run of consecutive layers where four tests all hold. Each "
        "test compares, item by item, the bridge with its matched control (a difference centred on 0 when the state "
        "does not carry the bridge), on A's state at a layer, at the last token and at e1's last token:</p><ul>"
        "<li><b>cross-patch</b>: A's state written into the partner's hop-2 prompt at the same layer, against a "
        "random other item's state written there; in fractions of what writing A's bridge out in words does (1 = as "
        f"much). Only items where the written-out bridge moves the partner's prompt by at least {MIN_GAP:g} logit "
        "count (a smaller gap would let one item dominate).</li>"
        "<li><b>other relation</b>: A's state written into the hop-2 prompt of another relation, at that prompt's "
        "own bridge (\"The main language spoken in Italy is\", A's bridge being France): how far it moves that "
        "prompt toward the value of A's bridge there (French), against the random item's state; in fractions of "
        "what writing A's bridge out there does, over the "
        f"items where that is at least {MIN_GAP:g} logit. The state then serves as the bridge for a relation it was "
        "not computed for.</li>"
        "<li><b>decoding</b>: the bridge decoded in the top 10 from A's state (through an identity prompt, read at a "
        "fixed early layer) minus the partner's bridge decoded there; a rate difference (0.1 = 10 points).</li>"
        "<li><b>probe</b>: a linear probe trained on written-out bridges (of prompts that share no template with the "
        "item) names the item's bridge, minus it names the partner's bridge; a rate difference.</li></ul>"
        f"<p>A test <b>holds</b> at a layer when its lower bound is above 0 and its mean difference is at least its "
        f"minimum effect ({minimum}: a tenth of what the written-out bridge does, or 10 points); it <b>rules the "
        f"layer out</b> when its upper bound is below the minimum effect. The bounds are one-sided and family-wise "
        f"over every test, layer and position ({ALPHA:.0%} error for the lower bounds and, separately, for the upper "
        f"bounds), from {N_RESAMPLES:,} random sign flips of the items' differences. With no layer where all four "
        "hold, the statement says \"no band\" only when every layer is ruled out, and otherwise \"not enough items "
        "to decide\", with the number of items that would decide if the estimates stayed as they are. The rule's "
        "error rates on planted effects are in docs/statistics.md; the sensitivity table repeats the decision with "
        "each threshold halved and doubled.</p>"
        "<p>The band is compared with the median layer where the answer rises (the first layer from which it stays "
        "in the logit-lens top 10 at the last token). The row \"A's state written into another layer\" lists the "
        "source layers whose state is bridge-specific when written into some other layer of the partner's prompt "
        "(the best target layer per source: a maximum, so read it as \"readable somewhere\", not as an effect size; "
        "not part of the test).</p>")


def memory_section(summary: dict[str, Any], figures: list[Path]) -> Section:
    """The report section: the statement as its findings (e1 defined where it first appears), the terms, the
    evidence per position, the criteria in plain words."""
    fixes = summary.get("backpatch") or {}
    settings = summary.get("settings", {})
    tables = ""
    for position, part in summary["positions"].items():
        evidence = {EVIDENCE_NAMES.get(k, k): v for k, v in (part.get("evidence_at_peak") or {}).items()}
        kinds = {EVIDENCE_NAMES.get(k, k): v for k, v in part["layers_by_evidence"].items()}
        tables += (f"<h3>Latent state at {POSITIONS[position]}</h3><p>Layers where each kind of evidence holds:</p>"
                   + key_values(kinds)
                   + (f"<p>Evidence at layer {evidence['layer']}:</p>" + key_values(evidence) if evidence else ""))
    decode_layer = settings.get("decode_layer")
    body = (
        TERMS
        + f"<p>{summary['n_items']} items ({summary['n_map_items']} with the cross-patch maps and the decoding; "
        f"{summary['n_crosspatch_eligible']} of those where writing the bridge out moves the partner's prompt by "
        f"at least {MIN_GAP:g} logit). Identity prompt for the decoding: <code>"
        f"{html.escape(repr(settings.get('identity_prompt', '')))}</code>"
        + (f", read at the fixed layer {decode_layer}. " if decode_layer is not None else ". ")
        + (f"Back-patching fixes {fixes['fixed']} of the {fixes['n_failures']} two-hop failures whose hops are both "
           f"right at the best cell (source, target) = {tuple(fixes['best_cell'])} (net of breakage; a maximum over cells, so biased upward), and breaks "
           f"{fixes['broken_correct_at_best_cell']} of the {fixes['n_correct']} correct prompts there. "
           if fixes else "")
        + "Means with 95% t intervals over prompts, rates with exact intervals (none below 3 prompts; an interval "
        "of no width from fewer than 10 items is shown as \"n too small\"); CKA with grouped-jackknife intervals. "
        "Files: memory.csv (every row), memory_cells.csv, memory_layers.csv, memory_backpatch.csv, "
        "memory_summary.json. <code>bridgeprobe memory</code> runs the analysis on every item (<code>--map-items"
        "</code>, <code>--stride</code> set its cost).</p>" + tables
        + _sensitivity_html(summary.get("sensitivity") or [])
        + "<h3>Criteria</h3>" + criteria_html()
    )
    findings = summary["statement"].replace(
        "e1's last token", "e1's last token (e1: the first entity of the two-hop prompt, its subject)", 1)
    return Section("Shared latent memory", findings, body,
                   [Figure(f, CAPTIONS.get(Path(f).name, "")) for f in figures])
