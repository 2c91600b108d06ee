"""Write the report of a lens run: tables (CSV), ``summary.json``, PNG plots and one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from markupsafe import Markup

from bridgeprobe.analyses import plots
from bridgeprobe.analyses.aggregate import TOP_K, per_layer, per_prompt, summarize
from bridgeprobe.analyses.findings import lens_finding
from bridgeprobe.analyses.page import (Figure, Section, count, doc_to_html, interval, key_values, num, p_value, pct,
                                       points, render, seconds, signed_points, table)
from bridgeprobe.analyses.provenance import provenance
from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv, atomic_write_json
from bridgeprobe.prompts.schema import PromptItem


def write_lens_report(frame: pd.DataFrame, items: Sequence[PromptItem], out_dir: Path, run: dict[str, Any],
                      sections: Sequence[Section] = ()) -> dict[str, Any]:
    """Aggregate ``frame`` (lens.csv rows of ``items``) into ``out_dir`` and return the summary. ``sections``
    (attribution, memory) are added to the page after the lens sections."""
    layers = per_layer(frame)
    texts = pd.DataFrame([{"prompt_id": i.id, "two_hop": i.two_hop, "bridge": i.bridge, "answer": i.answer,
                           "composition": i.composition} for i in items])
    prompts = per_prompt(frame).merge(texts, on="prompt_id", how="left")
    summary = {"model": run["model"], **summarize(frame, layers, prompts), "provenance": provenance(run)}
    summary = {"finding": lens_finding(summary), **summary}
    atomic_write_csv(out_dir / "layers.csv", layers)
    atomic_write_csv(out_dir / "prompts.csv", prompts)
    atomic_write_json(out_dir / "summary.json", summary)
    name = run["model"]
    figures = [
        plots.rank_curves(layers, out_dir / "ranks_by_layer.png", f"Logit lens, {name}"),
        plots.group_curves(frame, prompts, out_dir / "ranks_by_group.png", f"Two-hop prompt by outcome, {name}"),
        plots.bridge_heatmap(frame, prompts, out_dir / "bridge_heatmap.png", f"Bridge rank per prompt, {name}"),
    ]
    atomic_write(out_dir / "index.html", _html(summary, layers, prompts, frame, figures, run, sections))
    return summary


def _html(summary: dict[str, Any], layers: pd.DataFrame, prompts: pd.DataFrame, frame: pd.DataFrame,
          figures: list[Path], run: dict[str, Any], sections: Sequence[Section]) -> str:
    acc, bridge = summary["accuracy"], summary["bridge"]
    facts = {
        "model": f'{run["model"]} ({run["model_class"]}, {run["n_layers"]} layers)',
        "prompts": f'{count(summary["n_prompts"])} ({", ".join(map(str, run["settings"]["prompts"]))})',
        "accuracy (first token, greedy)": (f'two-hop {interval(acc, "two_hop")}, hop 1 {interval(acc, "hop1")}, '
                                           f'hop 2 {interval(acc, "hop2")}'),
        f"bridge in top {TOP_K} at some layer": f'{interval(bridge, "top10_any_layer")} of two-hop prompts',
        "bridge top 1 at some layer": interval(bridge, "top1_any_layer"),
        "best layer for the bridge": (f'{bridge["best_layer_by_top10_rate"]} (top-{TOP_K} rate '
                                      f'{interval(bridge, "best_top10_rate")}; a maximum over layers)'),
        **_control_facts(summary),
        "median bridge peak / answer rise layer": (f'{num(bridge["median_peak_layer"], 1)} / '
                                                   f'{num(summary["answer"]["median_rise_layer"], 1)}'),
        "time": Markup(key_values({k.removesuffix("_s").replace("_", " "): seconds(v)
                            for k, v in run.get("timings", {}).items() if isinstance(v, (int, float))})),
        "versions": ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items()),
    }
    groups = pd.DataFrame([{"group": g, "n": v["n"], "median_bridge_peak_layer": v["median_bridge_peak_layer"],
                            "median_answer_rise_layer": v["median_answer_rise_layer"],
                            "bridge_top10_any_layer": interval(v, "bridge_top10_any_layer"),
                            "bridge_top1_any_layer": interval(v, "bridge_top1_any_layer")}
                           for g, v in summary["groups"].items()])
    rank_caption = (f"Left: median rank of each target's first token over prompts, per layer (log scale, 0 = top "
                    f"token, up is better); the shaded band is the interquartile range over prompts (25th–75th "
                    f"percentile) of the two-hop prompt's curves. Right: the fraction of prompts whose target is in "
                    f"the top {TOP_K}. Dotted: the one-hop control prompts. Colours: blue = bridge, red = answer, "
                    f"grey = matched control entity (where the run has one).")
    lens = Section(
        "Where the bridge is readable (logit lens)", _lens_findings(summary, layers),
        "<p>Each block's output is read through the model's final norm and unembedding and scored on the bridge "
        "entity (hop 1's result) and the answer. Ranks are 0-based over the vocabulary; correctness is the model's "
        "own greedy first token.</p>",
        [Figure(figures[0], rank_caption)])
    by_group = Section(
        "By outcome", _group_findings(summary),
        table(groups, {"n": count, "median_bridge_peak_layer": lambda x: num(x, 1),
                       "median_answer_rise_layer": lambda x: num(x, 1)}) if len(groups) else "",
        [Figure(figures[1], "Median rank per layer on the two-hop prompt, one panel per outcome group (n prompts "
                            "in each title): blue = bridge, red = answer.")])
    heatmap = Section(
        "Prompts × layers", "",
        "", [Figure(figures[2], "The bridge's rank on each two-hop prompt (rows) at each layer (columns); bright = "
                                "readable. Rows are grouped by outcome (white lines separate the groups, labelled on "
                                "the left with their size), then ordered by the layer where the bridge peaks.")])
    best = _examples(frame, prompts)
    examples = Section(
        "Where the bridge surfaces best", _examples_note(prompts, best),
        table(best, {"bridge_best_rank": count, "bridge_peak_layer": count,
                                           "control_best_rank": count, "contrast_peak_layer": count,
                                           "answer_final_rank": count}))
    two_hop = layers[layers["prompt_kind"] == "two_hop"].pivot(
        index="layer", columns="target", values=["median_rank", "top1_rate", "top10_rate"])
    two_hop.columns = [f"{target} {stat.replace('_', ' ')}" for stat, target in two_hop.columns]
    per_layer_table = Section(
        "Per-layer table (two-hop prompt)", "",
        table(two_hop.reset_index(), {c: (count if "rank" in c else pct) for c in two_hop.columns} | {"layer": str}))
    definitions = Section("Definitions", "", f'<div class="definitions">{doc_to_html(summary["definitions"], {"TOP_K": TOP_K})}</div>')
    return render(f"Where is the bridge entity? {run['model']}",
                  [lens, by_group, heatmap, examples, per_layer_table, *sections, definitions],
                  facts=facts, provenance=summary["provenance"], finding=summary["finding"],
                  footer="Files beside this page: lens.csv (every row), layers.csv, prompts.csv, summary.json, "
                         "run.json.")


def _lens_findings(summary: dict[str, Any], layers: pd.DataFrame) -> str:
    """The lens result in words, from the summary's numbers (with intervals and the control where present)."""
    acc, bridge, n_layers = summary["accuracy"], summary["bridge"], summary["n_layers"]
    ranks = bridge["median_rank_by_layer"]
    mid = n_layers // 2
    best = bridge["best_layer_by_top10_rate"]
    def ci(values: dict[str, Any], key: str, fmt: Any = pct) -> str:
        return interval(values, key, fmt, with_n=False)

    text = (f"On {count(summary['n_prompts'])} two-hop prompts the model answers {ci(acc, 'two_hop')} correctly "
            f"(95% intervals in brackets; hop 1 alone {ci(acc, 'hop1')}, hop 2 alone {ci(acc, 'hop2')}). Through "
            f"the logit lens the bridge entity is in the top {TOP_K} at some layer for "
            f"{ci(bridge, 'top10_any_layer')} of the prompts (top 1: {ci(bridge, 'top1_any_layer')}); it is most "
            f"often in the top {TOP_K} at layer {best} of 0–{n_layers - 1} ({ci(bridge, 'best_top10_rate')}). Its "
            f"median rank goes from {count(ranks[0])} at layer 0 to {count(ranks[mid])} at layer {mid} and "
            f"{count(ranks[-1])} at the last layer.")
    control, diff = summary.get("control", {}), summary.get("bridge_minus_control", {})
    if control.get("measured"):
        text += (f" A matched control entity (another item's bridge, scored the same way) is in the top {TOP_K} at "
                 f"some layer for {ci(control, 'top10_any_layer')}; bridge minus control, paired over prompts: "
                 f"{_difference(diff, 'top10_any_layer', with_n=False)}"
                 + (f" (sign test {p_value(diff['top10_any_layer_sign_test_p'])})."
                    if "top10_any_layer_sign_test_p" in diff else "."))
    elif len(layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "control")]) == 0:
        text += " " + control.get("note", "This run has no matched control entity (its lens.csv has no control rows).")
    rise, peak = summary["answer"]["median_rise_layer"], bridge["median_peak_layer"]
    if rise is None:
        text += f" The answer does not stay in the top {TOP_K} up to the last layer for most prompts."
    elif peak is not None:
        order = "before" if peak < rise else "after" if peak > rise else "at"
        text += (f" Per prompt, the bridge peaks (median layer {num(peak, 1)}) {order} the layer from which the "
                 f"answer stays in the top {TOP_K} (median {num(rise, 1)}).")
    return text


def _group_findings(summary: dict[str, Any]) -> str:
    groups = summary["groups"]
    sizes = ", ".join(f"{g.replace('_', ' ')} {count(v['n'])}" for g, v in groups.items())
    failed, correct = groups.get("hops_ok_composition_failed"), groups.get("correct")
    if not failed or not correct:
        return (f"Prompts per outcome group: {sizes}. Comparing the composition failures with the correct prompts "
                f"needs both groups.")
    test = summary.get("failures_vs_correct") or {}
    fisher = (f" (Fisher's exact test: top 1 {p_value(test['bridge_top1_any_layer_fisher_p'])}, top {TOP_K} "
              f"{p_value(test[f'bridge_top{TOP_K}_any_layer_fisher_p'])})" if test else "")
    return (f"Prompts per outcome group: {sizes}. Of the {count(failed['n'])} prompts answered wrongly although both "
            f"one-hop prompts are right, leaving out the {count(failed.get('n_bridge_is_output', 0))} whose output "
            f"is the bridge itself (a correct prompt cannot have it), the bridge is top 1 at some layer in "
            f"{interval(failed, 'bridge_top1_any_layer')} (correct prompts: "
            f"{interval(correct, 'bridge_top1_any_layer')}); in the top {TOP_K} in "
            f"{interval(failed, 'bridge_top10_any_layer', with_n=False)} vs "
            f"{interval(correct, 'bridge_top10_any_layer', with_n=False)}{fisher}.")


def _control_facts(summary: dict[str, Any]) -> dict[str, str]:
    """The headline rows on the matched control, the paired difference and the unambiguous prompts."""
    control, diff, sub = summary["control"], summary["bridge_minus_control"], summary.get("unambiguous", {})
    if not control.get("measured"):
        return {"matched control": control["note"]}
    facts = {
        f"control in top {TOP_K} at some layer": (f'{interval(control, "top10_any_layer")} (at the bridge\'s best '
                                                  f'layer: {interval(control, "top10_rate_at_bridge_best_layer")})'),
        f"bridge − control, top {TOP_K} at some layer": (f'{_difference(diff, "top10_any_layer")}, sign test '
                                                         f'{p_value(diff["top10_any_layer_sign_test_p"])}'),
        "best layer, bridge − control": (diff["best_layer_note"] if diff["best_layer"] is None else
                                         f'{diff["best_layer"]} ({_difference(diff, "best_layer_top10_difference")}; '
                                         f'{diff["best_layer_note"]})'),
    }
    if sub.get("n_prompts"):
        facts["unambiguous prompts (no target flags)"] = (
            f'n = {sub["n_prompts"]} ({sub["n_flagged"]} flagged): bridge {interval(sub["bridge"], "top10_any_layer")}, '
            f'bridge − control {_difference(sub["bridge_minus_control"], "top10_any_layer")}'
            if sub["bridge_minus_control"].get("measured") else f'n = {sub["n_prompts"]}')
    else:
        facts["unambiguous prompts (no target flags)"] = sub.get("note", "none")
    return facts


def _difference(values: dict[str, Any], key: str, with_n: bool = True) -> str:
    """A rate difference in percentage points with its interval: ``+20.0 points [+17.1, +23.1] (n = 794)``."""
    return interval(values, key, points, with_n=with_n, bounds=signed_points)


def _examples_note(prompts: pd.DataFrame, best: pd.DataFrame) -> str:
    """What the "surfaces best" table ranks by, what it leaves out, and how many distinct bridges it shows (a few
    frequent bridges can fill it)."""
    left_out = int(prompts["bridge_is_output"].sum())
    counts = best["bridge"].value_counts()
    repeated = ", ".join(f"{bridge} ×{n}" for bridge, n in counts.items() if n > 1)
    crowded = len(counts) <= 2 * len(best) / 3  # a third of the rows or more repeat a bridge
    distinct = (f" Its {len(best)} rows name {len(counts)} distinct bridges"
                + (f" ({repeated})" if repeated else "")
                + (": a few bridges the lens reads well fill much of it, so it shows where the lens works best, "
                   "not a typical prompt." if crowded else "."))
    how = ("ranked by how far the bridge is ahead of its matched control (contrast: log10(control rank + 1) - "
           "log10(bridge rank + 1) at the layer where it is largest)" if "contrast_at_peak" in prompts else
           "ranked by the bridge's best rank (no control measured: a best rank has no chance level here)")
    return (f"Prompts {how}; {left_out} prompt{'s' if left_out != 1 else ''} whose bridge is the model's own output "
            f"at the last layer left out.{distinct}")


def _examples(frame: pd.DataFrame, prompts: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """The prompts where the bridge is most ahead of its matched control (``contrast_at_peak``, the log-rank
    contrast; without a control, the bridge's best rank), leaving out prompts whose bridge is the model's own output
    at the last layer; flags shown."""
    latent = prompts[~prompts["bridge_is_output"]]
    if "contrast_at_peak" in prompts:
        best = latent.sort_values(["contrast_at_peak", "contrast_peak_layer"], ascending=[False, True]).head(n)
        columns = ["contrast_at_peak", "contrast_peak_layer", "bridge_best_rank", "control_best_rank"]
    else:
        best = latent.sort_values(["bridge_best_rank", "bridge_peak_layer"]).head(n)
        columns = ["bridge_best_rank", "bridge_peak_layer"]
    flags = ["bridge_flags"] if "bridge_flags" in prompts else []
    return best[["prompt_id", "two_hop", "bridge", "answer", "group", *columns, "answer_final_rank", *flags]]
