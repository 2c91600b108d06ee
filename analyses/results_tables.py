"""The result tables the README and docs quote, built from the checked-in report files so that no figure is
copied by hand: the README's lens table, the shared-memory statements, and the identity comparisons.

Each table sits in its page between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``python -m bridgeprobe.analyses.results_tables`` rewrites those blocks from ``reports/`` (run it after
``reports/rebuild.sh``), and ``tests/test_quoted_numbers.py`` fails when a page and its reports disagree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from bridgeprobe.analyses.page import p_number, p_value

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
POSITIONS = {"last": "at the last token", "e1_last": "at e1's last token"}
TESTS = {"crosspatch": "cross-patch", "other_relation": "other relation", "decoding": "decoding", "probe": "probe"}
SPLITS = {"ood_two_hop": "OOD two-hop", "id_two_hop": "ID two-hop, held out", "one_hop": "one-hop facts",
          "reverse_test": "never-seen reversals", "reverse_train": "trained reversals", "forward": "forward facts",
          "identity": "identity sentences"}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _rate(block: dict[str, Any], key: str) -> str:
    """``25.1% [22.1, 28.2]`` from a summary block's value and bounds."""
    return f"{_pct(block[key])} [{100 * block[f'{key}_ci_low']:.1f}, {100 * block[f'{key}_ci_high']:.1f}]"


def _points(block: dict[str, Any], key: str, signed_bounds: bool = True) -> str:
    """A rate difference in percentage points with its interval: ``+20.0 points [+17.1, +23.1]``."""
    fmt = (lambda x: f"{100 * x:+.1f}") if signed_bounds else (lambda x: f"{100 * x:.1f}")
    return f"{100 * block[key]:+.1f} points [{fmt(block[f'{key}_ci_low'])}, {fmt(block[f'{key}_ci_high'])}]"




def _lens_row(label: str, model: str, summary: dict[str, Any], items: str) -> str:
    acc, bridge, control, diff = (summary[k] for k in ("accuracy", "bridge", "control", "bridge_minus_control"))
    n_layers = summary["n_layers"]
    ranks = bridge["median_rank_by_layer"]
    mid = n_layers // 2
    best = diff["best_layer"]
    best_text = "none" if best is None else (
        f"{best}{', the last' if best == n_layers - 1 else ''}: {_points(diff, 'best_layer_top10_difference', False)}"
        f" (n = {diff['best_layer_top10_difference_n']})")
    made = summary.get("provenance") or {}
    weights = f"{made.get('weights_format', '?')}, {made.get('device', '?')}"
    hashes = ", ".join(made.get("prompts_sha256") or [])
    label = f"{label} (sha256 {hashes})" if hashes else label
    return (f"| {label} | {model} ({n_layers} layers; {weights}) | {items} | {_rate(acc, 'two_hop')} / "
            f"{_pct(acc['hop1'])} / "
            f"{_pct(acc['hop2'])} | {_rate(bridge, 'top10_any_layer')} ({_pct(bridge['top1_any_layer'])}) | "
            f"{_rate(control, 'top10_any_layer')} ({_pct(control['top1_any_layer'])}) | "
            f"{_points(diff, 'top10_any_layer')}, sign test {p_value(diff['top10_any_layer_sign_test_p'])} | "
            f"{best_text} | "
            f"{ranks[0]:.0f} → {ranks[mid]:.0f} (layer {mid}) → {ranks[-1]:.0f} |")


def lens_table(reports: Path = ROOT / "reports") -> str:
    """The README's lens table: the bundled curated set and Hopping Too Late, both embedded models, each row with
    the provenance its summary recorded (the prompt files' hashes, the weights' format and the device)."""
    lines = ["| set | model | items | two-hop / hop 1 / hop 2 accuracy | bridge in top 10 at some layer (top 1) | "
             "matched control, same statistic | bridge − control, paired | best layer over the control | "
             "median bridge rank, layer 0 → middle → last |", "|---|---|---|---|---|---|---|---|---|"]
    for model, name in MODELS.items():
        summary = _json(reports / model / "summary.json")
        lines.append(_lens_row("curated", name, summary, str(summary["n_prompts"])))
    for model, name in MODELS.items():
        summary = _json(reports / "htl" / model / "summary.json")
        lines.append(_lens_row("Hopping Too Late (Llama-3-8B split)", name, summary, str(summary["n_prompts"])))
    return "\n".join(lines) + "\n"


def _memory_cell(part: dict[str, Any]) -> str:
    """One position's statement in a few words: band a-b / no band / not enough items (+ layers where tests hold)."""
    if part["status"] == "band":
        return "**band {}–{}**".format(*part["band"])
    holds = part["layers_by_evidence"]
    held = "; ".join(f"{name} {holds[test].replace('-', '–')}" for test, name in TESTS.items())
    if part["status"] == "none":
        return f"**no band** (tests hold: {held})"
    return f"**not enough items to decide** (tests hold: {held})"


def memory_table(reports: Path = ROOT / "reports") -> str:
    """The shared-memory statements at both positions: the controls (positive, negative) first, then the models."""
    rows = [("positive control (SmolLM2-135M, the bridge in place of e1)", reports / "memory-controls" / "present"),
            ("negative control (SmolLM2-135M, another bridge in place of e1)", reports / "memory-controls" / "absent")]
    rows += [(f"{name}, curated set (full analysis)", reports / model / "memory") for model, name in MODELS.items()]
    lines = ["| what | items (with maps) | at the last token | at e1's last token |", "|---|---|---|---|"]
    for label, directory in rows:
        summary = _json(directory / "memory_summary.json")
        lines.append(f"| {label} | {summary['n_items']} ({summary['n_map_items']}) | "
                     f"{_memory_cell(summary['positions']['last'])} | {_memory_cell(summary['positions']['e1_last'])} |")
    return "\n".join(lines) + "\n"


def lora_table(reports: Path = ROOT / "reports") -> str:
    """The LoRA comparisons, identity minus no identity with the seed as the unit, per split."""
    lines = ["| run | split (items) | no identity | identity | difference over seeds [95% t] | per seed | seeds higher | "
             "sign-flip p (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for run, splits in (("two-hop", ("ood_two_hop", "id_two_hop", "one_hop")),
                        ("reversal", ("reverse_test", "reverse_train", "forward", "identity"))):
        table = pd.read_csv(reports / "identity" / ("finetune" if run == "two-hop" else run) / "comparison.csv")
        for split in splits:
            row = table.set_index("split").loc[split]
            if pd.isna(row["delta ci_low"]):
                interval = "no interval below 3 seeds"
            elif row["delta ci_low"] == row["delta ci_high"]:
                interval = "(every seed the same)"
            else:
                interval = f"[{row['delta ci_low']:+.3f}, {row['delta ci_high']:+.3f}]"
            lines.append(f"| {run} | {SPLITS[split]} ({row['items']}) | {row['no_identity acc']:.3f} | "
                         f"{row['identity acc']:.3f} | {row['delta']:+.3f} {interval} | {row['delta per seed']} | "
                         f"{row['seeds identity higher']} | {p_number(row['seeds sign-flip p'])} |")
    return "\n".join(lines) + "\n"


def _grid_labels(row: dict[str, Any]) -> tuple[str, str]:
    """(model, knob) of a grid cell in words: the model with its variant, then every setting that differs from the
    preset's (split, init, weight decay, identity ratio, steps, entities, identity coverage, two-hop training)."""
    gpt2 = row["model"] == "gpt2"
    model = "GPT-2" if gpt2 else f"Emb-MLP, {'residual' if str(row['residual']) == 'True' else 'no residual'}"
    knobs = []
    if row["ood"] == "relation_pair":
        knobs.append("**relation-pair OOD**")
    if not str(row.get("two_hop_training", True)) == "True":
        knobs.append("one-hop only (no two-hop training)")
    if row["init_scale"] != 1.0:
        knobs.append(f"init {row['init_scale']:g}")
    if row["weight_decay"] != 1.0:
        knobs.append(f"weight decay {row['weight_decay']:g}")
    if row["identity_repeat"] != 10:
        knobs.append(f"identity ×{row['identity_repeat']}")
    if row["steps"] != (5000 if gpt2 else 10000):
        knobs.append(f"{row['steps']:,} steps")
    if row["subjects"] != 100:
        knobs.append(f"{row['subjects']} subjects ({row['subjects'] / 100:g}× the facts)")
    coverage = row.get("identity_coverage", 1.0)
    if not pd.isna(coverage) and float(coverage) != 1.0:
        knobs.append(f"identity for {float(coverage):.0%} of the bridges")
    return model, ", ".join(knobs)


def identity_grid_table(reports: Path = ROOT / "reports") -> str:
    """docs/identity.md's grid: every cell of reports/identity/grid/grid.csv (sorted by the OOD difference), the
    preset's default cell in bold, ID and OOD two-hop per condition (mean over seeds), the OOD difference with its t
    interval over seeds and the seeds where identity is higher."""
    grid = pd.read_csv(reports / "identity" / "grid" / "grid.csv")
    lines = ["| model | embeddings | identity form | knob | seeds | ID without / with | OOD without | OOD with | "
             "Δ [95% t] | higher |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in grid.to_dict("records"):
        model, knob = _grid_labels(row)
        low, high = row["ood_two_hop_acc delta ci_low"], row["ood_two_hop_acc delta ci_high"]
        interval = "n too small" if pd.isna(low) else f"[{low:+.2f}, {high:+.2f}]".replace("-", "−")
        default = (model == "GPT-2" and not knob and not row["tied"] and row["identity_form"] == "zero_hop"
                   and row["seeds"] >= 5)
        lines.append(f"| {f'**{model} (the default)**' if default else model} | "
                     f"{'tied' if row['tied'] else 'untied'} | {row['identity_form'].replace('_', '-')} | {knob} | "
                     f"{row['seeds']} | {row['id_two_hop_acc no_identity mean']:.2f} / "
                     f"{row['id_two_hop_acc identity mean']:.2f} | {row['ood_two_hop_acc no_identity mean']:.2f} | "
                     f"{row['ood_two_hop_acc identity mean']:.2f} | "
                     f"{row['ood_two_hop_acc delta mean']:+.2f} {interval}".replace("| -", "| −").replace(" -0", " −0")
                     + f" | {row['ood_two_hop_acc identity higher']} |")
    return "\n".join(lines) + "\n"


def _interval(row: dict[str, Any], prefix: str) -> str:
    low = row[f"{prefix} ci_low"]
    text = f"{row[prefix]:+.2f} " + ("(n too small)" if pd.isna(low) else f"[{low:+.2f}, {row[f'{prefix} ci_high']:+.2f}]")
    return text.replace("-", "−")


def _scratch(reports: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(reports / "identity" / "scratch-analysis" / name)


def _cell_label(row: dict[str, Any]) -> str:
    kind = "one-hop only" if "one_hop_only" in str(row["cell"]) else "relation-pair OOD"
    model = "GPT-2" if row["model"] == "gpt2" else "Emb-MLP"
    return f"{model}, {kind}, weight decay {row['weight_decay']:g}, init {row['init_scale']:g}"


def crosspatch_table(reports: Path = ROOT / "reports") -> str:
    """The paper's Sec. 4.1 test per from-scratch cell: the last block's output at r1 of (a, r1) written into the
    bridge position of (b', r2) at the input; how often hop 2 of a's bridge comes out (OOD queries whose facts the
    model knows), without and with identity, the difference over seeds."""
    table = _scratch(reports, "crosspatch_summary.csv")
    last = table.groupby("cell")["source_layer"].transform("max")
    rows = table[(table["split"] == "ood_test") & (table["source_layer"] == last) & (table["target_layer"] == 0)
                 & (table["identity_coverage"] == 1.0)]
    lines = ["| cell | items per model | no identity | identity | difference over seeds [95% t] | sign-flip p | "
             "seeds higher |", "|---|---|---|---|---|---|---|"]
    for row in rows.to_dict("records"):
        lines.append(f"| {_cell_label(row)} | {row['items identity']:.0f} | {row['transfer no_identity']:.2f} | "
                     f"{row['transfer identity']:.2f} | {_interval(row, 'transfer delta')} | "
                     f"{p_number(row['transfer delta signflip p'])} | {row['transfer delta seeds above 0']} |")
    return "\n".join(lines) + "\n"


def dose_table(reports: Path = ROOT / "reports") -> str:
    """The identity dose: per share of the bridges given identity examples (same cell otherwise), the identity
    models' OOD accuracy, through covered and uncovered bridges, and their within-model contrast over seeds; the
    no-identity models' contrast on the same draw is the placebo."""
    table = _scratch(reports, "coverage.csv")
    lines = ["| identity for | OOD accuracy | through covered bridges | through uncovered | covered − uncovered, "
             "over seeds [95% t] | sign-flip p | placebo (no identity) | identity's contrast − placebo's [95% t] | "
             "sign-flip p |", "|---|---|---|---|---|---|---|---|---|"]
    dose = table[(table["weight_decay"] == 1.0) & (table["init_scale"] == 1.0)
                 & ~table["cell"].str.contains("one_hop_only")]
    none = dose[(dose["identity_coverage"] == 1.0) & (dose["condition"] == "no_identity")]
    for row in none.to_dict("records"):  # coverage 0: the no-identity models (the same in every cell)
        lines.append(f"| none (no identity) | {row['ood acc']:.2f} | – | – | – | – | – | – | – |")
    for coverage, part in dose.groupby("identity_coverage", sort=True):
        rows = {r["condition"]: r for r in part.to_dict("records")}
        row = rows["identity"]
        partial = "contrast" in row and not pd.isna(row.get("contrast"))
        placebo = rows.get("no_identity")
        lines.append(f"| {coverage:.0%} of the bridges | {row['ood acc']:.2f} | {row['covered acc']:.2f} | "
                     + (f"{row['uncovered acc']:.2f} | {_interval(row, 'contrast')} | "
                        f"{p_number(row['contrast signflip p'])} | {_interval(placebo, 'contrast')} | "
                        f"{_interval(row, 'did')} | {p_number(row['did signflip p'])} |" if partial
                        else "– | – | – | – | – | – |"))
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[Path], str]] = {"lens": lens_table, "memory": memory_table, "lora": lora_table,
                                            "identity_grid": identity_grid_table, "crosspatch": crosspatch_table,
                                            "dose": dose_table}
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def blocks(text: str) -> dict[str, str]:
    """The generated blocks of a page: name -> its current content."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def refresh(path: Path, reports: Path = ROOT / "reports") -> bool:
    """Rewrite the generated blocks of ``path`` from ``reports``; whether anything changed."""
    text = path.read_text(encoding="utf-8")
    new = BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)](reports) + m.group(4), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main() -> None:
    for page in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        if blocks(page.read_text(encoding="utf-8")):
            print(f"{page.relative_to(ROOT)}: {'updated' if refresh(page) else 'unchanged'}")


if __name__ == "__main__":
    main()
