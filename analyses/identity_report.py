"""Tables, learning curves and the with/without-identity comparison page of ``bridgeprobe reproduce`` and
``bridgeprobe finetune``.

Inputs are the long tables those commands write: ``metrics.csv`` (one row per run and evaluated step), and, for
``reproduce``, ``alignment.csv`` / ``weights.csv`` / ``spectrum.csv``; for ``finetune``, the logit-lens and
patching tables of the base model and of each adapter. A run is identified by its configuration columns (``keys``,
e.g. init scale and weight decay), its ``condition`` (``identity`` / ``no_identity``) and its ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bridgeprobe.analyses.stats import (MIN_N, mean_interval, paired_difference, proportion_interval, sign_test,
                                        signflip_test)
from bridgeprobe.analyses.page import Figure, Section, p_number, p_value, render, table as page_table  # noqa: E402
from bridgeprobe.probes.io.results import atomic_write  # noqa: E402

CONDITIONS = ("no_identity", "identity")
COLORS = {"no_identity": "tab:gray", "identity": "tab:green", "base": "tab:blue"}
ACCURACIES = ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc")
NAMES = {"ood_two_hop_acc": "OOD two-hop", "id_two_hop_acc": "ID two-hop", "one_hop_acc": "one-hop",
         "alignment_top1": "mid-layer alignment"}


def run_label(keys: Sequence[str], values: Any) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                     for k, v in zip(keys, values)) or "all runs"


def comparison_table(results: pd.DataFrame, keys: Sequence[str],
                     metrics: Sequence[str] = ACCURACIES) -> pd.DataFrame:
    """One row per configuration: for each metric, mean and standard deviation over seeds without and with
    identity, the paired difference (identity minus no_identity, same seed) and in how many seeds identity is
    higher; the difference's 95% t interval over seeds (none below 3 seeds) and an exact sign test. ``results``:
    one row per run with ``keys``, ``condition``, ``seed`` and the ``metrics``."""
    rows = []
    groups = results.groupby(list(keys), sort=True) if keys else [((), results)]
    for values, group in groups:
        wide = group.pivot_table(index="seed", columns="condition", values=list(metrics), dropna=False)
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = int(group["seed"].nunique())
        for metric in metrics:
            for condition in CONDITIONS:
                column = wide.get((metric, condition))
                row[f"{metric} {condition} mean"] = float(column.mean()) if column is not None else np.nan
                several = column is not None and len(column) > 1
                row[f"{metric} {condition} std"] = float(column.std(ddof=1)) if several else np.nan
            if all((metric, c) in wide for c in CONDITIONS):
                delta = (wide[(metric, "identity")] - wide[(metric, "no_identity")]).dropna()
                row[f"{metric} delta mean"] = float(delta.mean())
                row[f"{metric} delta std"] = float(delta.std(ddof=1)) if len(delta) > 1 else np.nan
                interval = mean_interval(delta.to_numpy(), "t")  # paired over seeds; none below 3 seeds
                row[f"{metric} delta ci_low"], row[f"{metric} delta ci_high"] = interval.low, interval.high
                row[f"{metric} delta n"] = interval.n
                row[f"{metric} identity higher"] = f"{int((delta > 0).sum())}/{len(delta)}"
                row[f"{metric} sign test p"] = sign_test(delta.to_numpy())[0]
                row[f"{metric} signflip p"] = (signflip_test(delta.to_numpy(), alternative="greater")
                                               if len(delta) >= MIN_N else np.nan)  # as intervals: none below 3
        rows.append(row)
    return pd.DataFrame(rows)


# the columns that tell grid cells apart: (column, where in run.json settings, default for older records)
CELL_KEYS = (("model", ("train", "model"), None), ("tied", ("train", "tie_embeddings"), True),
             ("residual", ("train", "residual"), True), ("d_model", ("train", "d_model"), None),
             ("steps", ("train", "steps"), None), ("lr", ("train", "lr"), None),
             ("subjects", ("data", "n_subjects"), None), ("bridges", ("data", "n_bridges"), None),
             ("ood", ("data", "ood"), "relation_pair"), ("identity_form", ("data", "identity_form"), "relation"),
             ("two_hop_training", ("data", "two_hop_training"), True),
             ("identity_coverage", ("data", "identity_coverage"), 1.0))
# the knobs a reproduce grid sweeps (columns of its results.csv, one value per run)
GRID_KEYS = ("init_scale", "weight_decay", "identity_repeat")
GRID_METRICS = ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc")


def grid_results(run_dirs: Sequence[Path], extra: dict[Path, dict[str, Any]] | None = None) -> pd.DataFrame:
    """The results.csv rows of finished ``reproduce`` runs, each with the :data:`CELL_KEYS` columns of its
    settings, so runs that differ in model, data or training fall into separate grid cells; ``extra``: more such
    columns per run (the other settings in which the runs differ)."""
    import json

    frames = []
    for run_dir in run_dirs:
        settings = json.loads((run_dir / "run.json").read_text())["settings"]
        frame = pd.read_csv(run_dir / "results.csv")
        for column, (part, key), default in CELL_KEYS:
            frame[column] = settings[part].get(key, default)
        if settings["train"]["model"] != "emb_mlp":
            frame["residual"] = "n/a"  # an Emb-MLP knob (a string: groupby drops missing keys)
        for column, value in ((extra or {}).get(run_dir) or {}).items():
            frame[column] = value
        frames.append(frame.assign(run_dir=str(run_dir)))
    return pd.concat(frames, ignore_index=True)


def grid_table(results: pd.DataFrame, chance: float | None = None, extra_keys: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`comparison_table` over every grid cell (:data:`CELL_KEYS` and the knobs reproduce sweeps), with
    whether the cell meets the paper's claim as the issue states it: ID two-hop >= 0.9 in both conditions, OOD
    without identity within 0.05 of ``chance``, OOD with identity >= 0.5, identity higher in every seed, >= 5
    seeds. ``extra_keys``: more columns that tell cells apart (:func:`grid_results`); with ``data.n_objects``
    among them, chance is 1/|E3| of each cell."""
    keys = [c for c, _, _ in CELL_KEYS] + list(extra_keys) + ["init_scale", "weight_decay", "identity_repeat"]
    table = comparison_table(results, keys, GRID_METRICS)
    if chance is None and "data.n_objects" in table:
        chance = 1 / table["data.n_objects"].astype(float)
    ood = "ood_two_hop_acc"
    higher = table[f"{ood} identity higher"].str.split("/", expand=True).astype(int)
    table["claim met"] = ((table["id_two_hop_acc no_identity mean"] >= 0.9) & (table["id_two_hop_acc identity mean"] >= 0.9)
                          & (table[f"{ood} identity mean"] >= 0.5) & (higher[0] == higher[1]) & (table["seeds"] >= 5)
                          & ((table[f"{ood} no_identity mean"] - chance).abs() <= 0.05 if chance is not None else True))
    return table.sort_values(f"{ood} delta mean", ascending=False, ignore_index=True)


def grid_markdown(table: pd.DataFrame) -> str:
    """The grid as a Markdown table: one row per cell, the knobs that vary, OOD and ID two-hop per condition
    (mean over seeds), the OOD difference with its t interval, seeds where identity is higher, and the tests."""
    keys = list(table.columns[: list(table.columns).index("seeds")])  # grid_table's cell keys come first
    varying = [c for c in keys if table[c].nunique() > 1]
    ood = "ood_two_hop_acc"
    header = [*varying, "seeds", "ID without", "ID with", "OOD without", "OOD with", "OOD Δ [95% t]", "higher",
              "sign p", "sign-flip p", "claim"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in varying] + [str(row["seeds"])]
        cells += [f"{row[f'{m} {c} mean']:.2f}" for m, c in (("id_two_hop_acc", "no_identity"),
                                                               ("id_two_hop_acc", "identity"),
                                                               (ood, "no_identity"), (ood, "identity"))]
        cells += [_delta(row, ood), row[f"{ood} identity higher"], p_number(row[f"{ood} sign test p"]),
                  p_number(row[f"{ood} signflip p"]), "yes" if row["claim met"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def item_comparison(items: pd.DataFrame) -> pd.DataFrame:
    """Identity vs no identity on the same evaluation items, per split, with the seed as the unit of inference: each
    seed is its own data set, names and adapters, so its items are not independent of each other.

    Per split: each state's entity-level accuracy pooled over seeds with its exact interval and the per-seed
    values; the paired difference (identity minus no_identity) as the mean of the per-seed differences
    (``delta``) with a Student t interval over seeds (none below 3 seeds) and the exact two-sided sign-flip test
    over seeds (``seeds sign-flip p``: with 3 seeds its smallest value is 0.25); the seeds where identity is
    higher. Secondary, labelled ``pooled``: the item-level BCa interval and exact McNemar test that treat all
    items as independent (they understate the uncertainty when seeds differ). ``items``: items.csv rows (seed,
    state, split, item, entity)."""
    rows = []
    for split, part in items.groupby("split", sort=False):
        wide = part.pivot_table(index=["seed", "item"], columns="state", values="entity")
        row: dict[str, Any] = {"split": split, "seeds": int(part["seed"].nunique()), "items": len(wide)}
        for state in [s for s in ("base", *CONDITIONS) if s in wide]:
            rate = proportion_interval(int(wide[state].sum()), int(wide[state].notna().sum()))
            row.update({f"{state} acc": rate.estimate, f"{state} ci_low": rate.low, f"{state} ci_high": rate.high})
            row[f"{state} per seed"] = " ".join(f"{v:.3f}" for v in wide[state].groupby(level="seed").mean())
        if all(c in wide for c in CONDITIONS):
            delta = (wide["identity"] - wide["no_identity"]).dropna()
            per_seed = delta.groupby(level="seed").mean()
            over_seeds = mean_interval(per_seed.to_numpy(), "t")
            pooled = paired_difference(wide["identity"], wide["no_identity"])
            row.update({"delta": over_seeds.estimate, "delta ci_low": over_seeds.low, "delta ci_high": over_seeds.high,
                        "delta per seed": " ".join(f"{v:+.3f}" for v in per_seed),
                        "seeds sign-flip p": signflip_test(per_seed.to_numpy(), "two-sided") if len(per_seed) else 1.0,
                        "seeds identity higher": f"{int((per_seed > 0).sum())}/{len(per_seed)}",
                        "pooled delta": pooled.estimate, "pooled delta ci_low": pooled.low,
                        "pooled delta ci_high": pooled.high, "identity better": int((delta > 0).sum()),
                        "no_identity better": int((delta < 0).sum()), "pooled mcnemar p": sign_test(delta)[0]})
        rows.append(row)
    return pd.DataFrame(rows)


LENS_MEASURES = {"bridge_top10": "bridge in the top 10 at some layer",
                 "control_top10": "matched control in the top 10 at some layer",
                 "bridge_top10_final": "bridge in the top 10 at the last layer (in the output, not only latent)",
                 "two_hop_first_token": "answer's first token is the top prediction"}


def synth_split(prompt_id: str) -> str:
    """``id_two_hop`` / ``ood_two_hop`` from a synthetic test prompt's id (``synth-id-test-...``, ``synth-ood-test-...``)."""
    for prefix, split in (("synth-id-test-", "id_two_hop"), ("synth-ood-test-", "ood_two_hop")):
        if prompt_id.startswith(prefix):
            return split
    raise ValueError(f"prompt id {prompt_id!r} is not a synthetic two-hop test prompt (synth-id-test-/synth-ood-test-)")


def lens_indicators(prompts: pd.DataFrame) -> pd.DataFrame:
    """Per seed, state, split and item (prompt): the 0/1 :data:`LENS_MEASURES` from per-prompt lens rows
    (:func:`analyses.aggregate.per_prompt` with ``seed``, ``state`` and ``split``); NaN where a prompt has no
    matched control."""
    from bridgeprobe.analyses.aggregate import TOP_K

    out = prompts[["seed", "state", "split", "prompt_id"]].rename(columns={"prompt_id": "item"}).copy()
    out["bridge_top10"] = (prompts["bridge_best_rank"] < TOP_K).astype(float)
    control = prompts["control_best_rank"] if "control_best_rank" in prompts else pd.Series(np.nan, prompts.index)
    out["control_top10"] = (control < TOP_K).astype(float).where(control.notna())
    out["bridge_top10_final"] = (prompts["bridge_final_rank"] < TOP_K).astype(float)
    out["two_hop_first_token"] = prompts["two_hop_correct"].astype(float)
    return out


def lens_states(prompts: pd.DataFrame) -> pd.DataFrame:
    """Per model state and split, pooled over seeds: each :data:`LENS_MEASURES` rate with its exact interval, and
    the bridge against its matched control on the same prompts (paired difference with its BCa interval, exact
    sign test)."""
    rows = []
    for (state, split), part in lens_indicators(prompts).groupby(["state", "split"], sort=False):
        row: dict[str, Any] = {"state": state, "split": split, "seeds": int(part["seed"].nunique()),
                               "items": len(part)}
        for measure in LENS_MEASURES:
            values = part[measure].dropna()
            rate = proportion_interval(int(values.sum()), len(values))
            row.update({measure: rate.estimate, f"{measure} ci_low": rate.low, f"{measure} ci_high": rate.high})
        has = part["control_top10"].notna()
        diff = paired_difference(part.loc[has, "bridge_top10"], part.loc[has, "control_top10"])
        row.update({"bridge - control": diff.estimate, "bridge - control ci_low": diff.low,
                    "bridge - control ci_high": diff.high, "bridge - control n": diff.n,
                    "bridge - control sign p": sign_test(part.loc[has, "bridge_top10"] - part.loc[has, "control_top10"])[0]})
        rows.append(row)
    return pd.DataFrame(rows)


def lens_comparison(prompts: pd.DataFrame) -> pd.DataFrame:
    """Identity vs no identity on the same prompts for each :data:`LENS_MEASURES` (:func:`item_comparison`: exact
    intervals, BCa interval of the paired difference, exact McNemar test), one row per measure and split."""
    indicators = lens_indicators(prompts)
    return pd.concat([item_comparison(indicators.assign(entity=indicators[measure]).dropna(subset=["entity"])
                                      [["seed", "state", "split", "item", "entity"]]).assign(measure=measure)
                      for measure in LENS_MEASURES], ignore_index=True)


def lens_lines(states: pd.DataFrame, comparison: pd.DataFrame) -> list[str]:
    """The summary of :func:`probes.jobs.finetune_lens.finetune_lens`: per split and state, the bridge against its
    control; then identity vs no identity on the bridge measure."""
    lines = []
    for row in states.to_dict("records"):
        lines.append(f"{row['split']}, {row['state']}: bridge top 10 at some layer {row['bridge_top10']:.3f} "
                     f"[{row['bridge_top10 ci_low']:.3f}, {row['bridge_top10 ci_high']:.3f}] (at the last layer "
                     f"{row['bridge_top10_final']:.3f}) vs control "
                     f"{row['control_top10']:.3f}; difference {row['bridge - control']:+.3f} "
                     f"[{row['bridge - control ci_low']:+.3f}, {row['bridge - control ci_high']:+.3f}], sign "
                     f"{p_value(row['bridge - control sign p'])} (n = {row['items']} over {row['seeds']} seeds)")
    bridge = comparison[comparison["measure"] == "bridge_top10"]
    return lines + [f"bridge top 10, {line}" for line in comparison_lines(bridge, list(bridge["split"]))]


def comparison_lines(table: pd.DataFrame, splits: Sequence[str]) -> list[str]:
    """One line per split of :func:`item_comparison`: both conditions with intervals, the difference and its test."""
    lines = []
    for row in table[table["split"].isin(splits)].to_dict("records"):
        if "delta" not in row:
            continue
        rate = {c: f"{row[f'{c} acc']:.3f} [{row[f'{c} ci_low']:.3f}, {row[f'{c} ci_high']:.3f}]" for c in CONDITIONS}
        interval = ("(n = {} seeds: no interval below 3)".format(row["seeds"]) if pd.isna(row["delta ci_low"])
                    else f"[{row['delta ci_low']:+.3f}, {row['delta ci_high']:+.3f}]")
        lines.append(f"{row['split']}: identity {rate['identity']} vs no_identity {rate['no_identity']}; "
                     f"difference {row['delta']:+.3f} {interval} over seeds (t interval, per seed "
                     f"{row['delta per seed']}; sign-flip {p_value(row['seeds sign-flip p'])}), identity higher in "
                     f"{row['seeds identity higher']} seeds; pooled over {row['items']} items as if independent "
                     f"(secondary): [{row['pooled delta ci_low']:+.3f}, {row['pooled delta ci_high']:+.3f}], McNemar "
                     f"{p_value(row['pooled mcnemar p'])}")
    return lines


def markdown_table(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str] = ACCURACIES) -> str:
    """The comparison as a Markdown table: ``mean ± std`` per condition, and the paired difference."""
    header = [*keys, "seeds"]
    for metric in metrics:
        header += [f"{NAMES[metric]} without", f"{NAMES[metric]} with", f"{NAMES[metric]} Δ (higher)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in keys] + [str(row["seeds"])]
        for metric in metrics:
            for condition in CONDITIONS:
                cells.append(_pm(row[f"{metric} {condition} mean"], row[f"{metric} {condition} std"]))
            cells.append(f"{_delta(row, metric)} ({row.get(f'{metric} identity higher', '')})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _delta(row: dict[str, Any], metric: str) -> str:
    """The paired difference identity - no_identity over seeds with its 95% t interval, or why there is none."""
    mean = row.get(f"{metric} delta mean")
    if mean is None or pd.isna(mean):
        return "–"
    low, high, n = row.get(f"{metric} delta ci_low"), row.get(f"{metric} delta ci_high"), row.get(f"{metric} delta n")
    if low is None or pd.isna(low):
        return f"{mean:+.3f} (n = {n} seeds: no interval below 3)"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n = {n})"


def _pm(mean: float | None, std: float | None, sign: bool = False) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text + (f" ± {std:.3f}" if std is not None and not pd.isna(std) else "")


def alignment_subset(alignment: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The alignment rows of the queries through OOD bridges where the run has them (bridge-level OOD split; the
    bridges the identity task should align), else those of all queries; with a phrase naming which."""
    if "bridges" in alignment and (alignment["bridges"] == "ood").any():
        return alignment[alignment["bridges"] == "ood"], "queries through OOD bridges"
    if "bridges" in alignment:
        return alignment[alignment["bridges"] == "all"], "all queries"
    return alignment, "all queries"


def final_alignment(alignment: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per run (``keys``, condition, seed): ``alignment_top1``, the share of (e1, r1) queries (through OOD bridges
    where there are: :func:`alignment_subset`) whose middle-layer state (query layer ``max // 2``: the only state of
    the Emb-MLP, layer 1 of a 2-layer GPT-2) is nearest to its own bridge's embedding-layer state, at the last
    evaluated step."""
    alignment = alignment_subset(alignment)[0]
    mid = int(alignment["query_layer"].max()) // 2
    last = alignment[alignment["step"] == alignment.groupby("run")["step"].transform("max")]
    last = last[(last["query_layer"] == mid) & (last["bridge_layer"] == 0)]
    return last[[*keys, "condition", "seed", "top1"]].rename(columns={"top1": "alignment_top1"})


def write_page(path: Path, title: str, intro: str, facts: dict[str, str],
               sections: Sequence[tuple[str, str, Sequence[Path]]], finding: str = "") -> Path:
    """A self-contained HTML page: a title, the finding (:mod:`analyses.findings`), an introduction, a key/value
    table and sections of (title, HTML, figures)."""
    atomic_write(path, render(title, [Section(heading, "", text, [Figure(f) for f in figures])
                                      for heading, text, figures in sections], intro=intro, facts=facts,
                              finding=finding))
    return path


def comparison_html(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str] = ACCURACIES) -> str:
    """The comparison table as HTML: per configuration and metric, ``mean ± std`` without and with identity, and
    the paired difference."""
    shown = pd.DataFrame([{**{k: row[k] for k in keys}, "seeds": row["seeds"],
                           **{f"{NAMES[m]} {c}": _pm(row[f"{m} {c} mean"], row[f"{m} {c} std"])
                              for m in metrics for c in CONDITIONS},
                           **{f"{NAMES[m]} Δ": f"{_delta(row, m)} ({row.get(f'{m} identity higher', '')})"
                              for m in metrics}}
                          for row in table.to_dict("records")])
    return page_table(shown)


def html_table(frame: pd.DataFrame) -> str:
    """A table for the page, in the style of the lens report."""
    return page_table(frame)
