"""The pages, tables and printed summaries of the identity runs (``reproduce``, ``finetune``, ``finetune-lens``),
written from the tables a run has saved, so a finished run's report can be rebuilt without the model; the
tables and statistics they show are :mod:`analyses.identity_report`, the figures :mod:`analyses.identity_plots`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bridgeprobe.analyses import identity_plots
from bridgeprobe.analyses import identity_report as report
from bridgeprobe.analyses.aggregate import per_layer
from bridgeprobe.analyses.findings import finetune_finding, reproduce_finding
from bridgeprobe.analyses.identity_report import GRID_KEYS, comparison_lines
from bridgeprobe.analyses.page import seconds
from bridgeprobe.analyses.patching_report import by_layer
from bridgeprobe.analyses.summaries import files_line, identity_lines
from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv, read_table

REVERSAL_DEFINITION = ("reverse_test: reversed questions of pairs whose reversal is never trained (the OOD "
                       "split); reverse_train: reversed questions that are trained; forward: the trained facts.")


OOD_DEFINITIONS = {
    "bridge": "OOD two-hop queries go through OOD bridges: no trained two-hop query goes through them, so their hop-2 "
              "facts are seen only as explicit one-hop facts, never with the bridge as a latent intermediate.",
    "relation_pair": "OOD two-hop queries compose relation pairs (r1, r2) never composed in training (every bridge "
                     "still serves as a latent bridge in trained compositions).",
}


def ood_kind(data: dict[str, Any]) -> str:
    """The OOD notion of a recorded data config (records written before the bridge split hold relation pairs)."""
    return data.get("ood", "relation_pair")


def ood_text(data: dict[str, Any]) -> str:
    """One phrase for a recorded data config's OOD split, e.g. 'OOD: half of the bridges'."""
    if ood_kind(data) == "bridge":
        return f"OOD bridges: a share {data['ood_bridge_fraction']} of E2"
    return f"OOD relation pairs: a share {data['ood_pair_fraction']}"


REPRODUCE_FILES = ("index.html", "results.csv", "comparison.csv", "comparison.md", "metrics.csv", "alignment.csv",
                   "weights.csv", "spectrum.csv", "*.png", "run.json")


FINETUNE_FILES = ("index.html", "comparison.csv", "items.csv", "results.csv", "metrics.csv", "lens_layers.csv",
                  "lens_summary.csv", "patching_layers.csv", "*.png", "adapters/", "run.json")


# report files each command writes from its tables, and those tables (what rebuilds a finished run's report)
REPRODUCE_REPORT = ("comparison.csv", "comparison.md", "learning_curves.png", "alignment.png", "alignment_vs_ood.png",
                    "spectrum.png", "nuclear_norm.png", "index.html")


REPRODUCE_TABLES = ("metrics.csv", "alignment.csv", "weights.csv", "spectrum.csv", "results.csv")


FINETUNE_REPORT = ("comparison.csv", "learning_curves.png", "index.html")


FINETUNE_TABLES = ("metrics.csv", "results.csv", "items.csv")


def summary_text(out: Path, results: pd.DataFrame, files: Sequence[str], finding: str = "") -> str:
    """The lines a finished run prints: the finding, final accuracies per condition, and the files."""
    return "\n".join([*([f"Finding: {finding}"] if finding else []), *identity_lines(results),
                      files_line(out, files, check=False)])


def timings_text(record: dict[str, Any]) -> str:
    """The run's timings as durations with the thread count: "train 22.5 min (1 thread)"."""
    threads = record["threads"]
    return (", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {seconds(v)}" for k, v in record["timings"].items())
            + f" ({threads} thread{'s' if threads != 1 else ''})")


def reproduce_finding_of(out: Path, record: dict[str, Any]) -> str:
    """The finding of a reproduce run (:func:`analyses.findings.reproduce_finding`) from its comparison.csv."""
    table = pd.read_csv(out / "comparison.csv")
    keys = [k for k in GRID_KEYS if k in table]
    labels = [", ".join(f"{k.replace('_', ' ')} {row[k]:g}" for k in keys) for row in table.to_dict("records")]
    return reproduce_finding(table, 1 / record["settings"]["data"]["n_objects"], labels)


def reproduce_report(out: Path, record: dict[str, Any] | None = None) -> Path:
    """The reproduce page and tables, from the files of a finished grid (no training); ``record``: the run's
    record (default: its run.json)."""
    record = record if record is not None else json.loads((out / "run.json").read_text())
    metrics = pd.read_csv(out / "metrics.csv")
    alignment = pd.read_csv(out / "alignment.csv")
    results = pd.read_csv(out / "results.csv").merge(
        report.final_alignment(alignment, ["model", *GRID_KEYS]), on=["model", *GRID_KEYS, "condition", "seed"])
    keys = [k for k in GRID_KEYS if results[k].nunique() > 1]
    shown = (*report.ACCURACIES, "alignment_top1")
    table = report.comparison_table(results, keys, shown)
    atomic_write_csv(out / "comparison.csv", table)
    atomic_write(out / "comparison.md", report.markdown_table(table, keys, shown))
    settings = record["settings"]
    title = f"Identity bridge from scratch: {settings['train']['model']}"
    spectrum = pd.read_csv(out / "spectrum.csv")
    figures = {
        "curves": identity_plots.learning_curves(metrics, keys, out / "learning_curves.png", title,
                                         chance=1 / settings["data"]["n_objects"]),
        "alignment": identity_plots.alignment_curves(alignment, keys, out / "alignment.png",
                                             "Nearest bridge state is the right one (bridge layer 0; "
                                             f"{report.alignment_subset(alignment)[1]})"),
        "mechanism": identity_plots.alignment_vs_accuracy(metrics, alignment, out / "alignment_vs_ood.png",
                                                  "Alignment and OOD accuracy over training"),
        "spectrum": identity_plots.spectrum_plot(spectrum, keys, out / "spectrum.png", "Final singular values (normalized)",
                                         weights=[w for w in dict.fromkeys(spectrum["weight"])
                                                  if any(k in w for k in ("wte", "embed", "c_fc", "mlp.0"))]),
        "nuclear": identity_plots.nuclear_norm_curves(pd.read_csv(out / "weights.csv"), keys, out / "nuclear_norm.png",
                                              "Nuclear norm of the weights over training"),
    }
    data, train = settings["data"], settings["train"]
    facts = {
        "model": f"{train['model']} ({train['n_layer']} layers, d={train['d_model']}, "
                 f"{'tied' if train['tie_embeddings'] else 'untied'} embeddings)",
        "data": f"|E1|={data['n_subjects']}, |E2|={data['n_bridges']}, |E3|={data['n_objects']}, "
                f"|R1|={data['n_r1']}, |R2|={data['n_r2']}, {ood_text(data)}, "
                f"two-hop training {'on' if data['two_hop_training'] else 'off'} "
                f"(fraction {data['two_hop_train_fraction']})",
        "training": f"{train['steps']} steps x {train['batch_size']}, AdamW lr {train['lr']}, "
                    + ", ".join(f"{name.replace('_', ' ')} {'/'.join(sorted({f'{g[name]:g}' for g in settings['grid']}))}"
                                for name in GRID_KEYS)
                    + f" (identity form: {data.get('identity_form', 'relation')})"
                    + ("" if train["model"] != "emb_mlp" else f", residual {train.get('residual', True)}"),
        "seeds": ", ".join(map(str, settings["seeds"])),
        "time": timings_text(record),
        "versions": ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
    }
    intro = ("Accuracies are greedy over the whole vocabulary at the last position, at the end of training "
             f"(chance on two-hop queries: 1/|E3| = {1 / data['n_objects']:.3f}). {OOD_DEFINITIONS[ood_kind(data)]} "
             "ID two-hop queries are unseen queries through in-distribution bridges and relation pairs. Mid-layer "
             "alignment: share of (e1, r1) queries (through OOD bridges where there are) whose middle-layer hidden "
             "state is nearest (centred cosine) to the embedding-layer state of their own bridge (chance 1/|E2|). "
             "Δ: identity minus no_identity for the same seed (mean ± std over seeds), its 95% t interval over seeds "
             "(none below 3), the seeds where identity is higher, the exact sign test and the one-sided paired "
             "sign-flip test.")
    sections = [
        ("With vs without identity", report.comparison_html(table, keys, shown), []),
        ("Learning curves", "<p>Mean over seeds; the band spans the seeds.</p>", [figures["curves"]]),
        ("Alignment of the hop-1 state with the bridge",
         "<p>Share of (e1, r1) queries whose hidden state (at each query layer, last position) is closest, by centred "
         "cosine, to the state of its own bridge e2 read as an input token (layer 0); chance is 1/|E2|. "
         "alignment.csv has every layer pair, the mean cosines with the right and the other bridges, for the "
         "queries through OOD bridges, through the others, and all (column bridges). The second plot puts this "
         "alignment beside OOD accuracy at every evaluated step of every run.</p>",
         [figures["alignment"], figures["mechanism"]]),
        ("Weight spectra", "<p>Singular values of the final embedding and MLP input weights, each normalized by its "
                           "largest, and the nuclear norm of all weight matrices over training; weights.csv has every "
                           "matrix's nuclear and Frobenius norm and effective rank at each evaluation.</p>",
         [figures["spectrum"], figures["nuclear"]]),
    ]
    finding = reproduce_finding_of(out, record)
    report.write_page(out / "index.html", title, intro, facts, sections, finding)
    print(summary_text(out, results, REPRODUCE_FILES, finding))
    return out


def _state_tables(out: Path, kind: str) -> list[pd.DataFrame]:
    """``out/<kind>/<state>/<split>/<kind>.csv`` tables, each with ``state`` and ``split`` columns."""
    tables = []
    for path in sorted(out.glob(f"{kind}/*/*/{kind}.csv")):
        frame = read_table(path)
        tables.append(frame.assign(state=path.parent.parent.name, split=path.parent.name))
    return tables


def finetune_report(out: Path, record: dict[str, Any] | None = None) -> Path:
    """The finetune page and tables, from the files of a finished run (no model needed); ``record``: the run's
    record (default: its run.json)."""
    record = record if record is not None else json.loads((out / "run.json").read_text())
    results = pd.read_csv(out / "results.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    comparison = report.item_comparison(pd.read_csv(out / "items.csv"))
    atomic_write_csv(out / "comparison.csv", comparison)
    lens_tables, patch_tables = _state_tables(out, "lens"), _state_tables(out, "patching")
    figures = [identity_plots.learning_curves(metrics, [], out / "learning_curves.png", f"LoRA fine-tuning, {record['model']}",
                                      columns=(*[c for c in metrics if c.endswith("_acc")], "train_loss"))]
    probes_rows, sections = [], []
    if lens_tables:
        layers = pd.concat([per_layer(t).assign(state=t["state"].iloc[0], split=t["split"].iloc[0])
                            for t in lens_tables])
        atomic_write_csv(out / "lens_layers.csv", layers)
        figures.append(identity_plots.lens_layer_plot(layers, out / "lens_layers.png", "Logit lens: base vs adapted"))
        probes_rows = [{"state": t["state"].iloc[0], "split": t["split"].iloc[0], **two_hop_stats(t)}
                       for t in lens_tables]
        gaps = {(t["state"].iloc[0], t["split"].iloc[0]): (t.groupby("clean_id")["clean_metric"].first()
                                                         - t.groupby("clean_id")["corrupt_metric"].first()).mean()
                for t in patch_tables}
        for row in probes_rows:
            row["patching_logit_gap"] = gaps.get((row["state"], row["split"]), float("nan"))
        atomic_write_csv(out / "lens_summary.csv", pd.DataFrame(probes_rows))
    if patch_tables:
        patch_layers = pd.concat([by_layer(t).assign(state=t["state"].iloc[0], split=t["split"].iloc[0])
                                  for t in patch_tables])
        atomic_write_csv(out / "patching_layers.csv", patch_layers)
        for split, part in patch_layers.groupby("split"):
            figures.append(identity_plots.patching_layer_plot(part[part["site"] == "resid_pre"], out / f"patching_{split}.png",
                                                      f"Exact resid_pre patching, {split} pairs"))
    settings = record["settings"]
    facts = {
        "model": f"{record['model']} ({record['model_class']}, {record['n_layers']} layers)",
        "LoRA": f"rank {settings['finetune']['rank']}, alpha {settings['finetune']['alpha']}, "
                f"{settings['finetune']['target_modules']}, {record['trainable_parameters']} trainable parameters",
        "training": f"{settings['finetune']['steps']} steps x {settings['finetune']['batch_size']} sentences, "
                    f"AdamW lr {settings['finetune']['lr']}, weight decay {settings['finetune']['weight_decay']}, "
                    f"identity sentences x{settings['finetune']['identity_repeat']}",
        "task and seeds": f"{settings['task']}; seeds {', '.join(map(str, settings['seeds']))} (each its own data, "
                          f"names and LoRA initialization)",
        "data": ", ".join(f"{k}={v}" for k, v in settings["data"].items() if k != "seed"),
        "time": timings_text(record),
        "versions": ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
    }
    split_text = (REVERSAL_DEFINITION if settings["task"] == "reversal" else OOD_DEFINITIONS[ood_kind(settings["data"])])
    sections.append(("With vs without identity, item by item",
                     "<p>Entity-level accuracy (greedy decoding reproduces every token of the target) on the same "
                     f"evaluation items for both adapters, pooled over seeds. {split_text} Rates: exact "
                     "(Clopper-Pearson) intervals. The difference identity minus no identity takes the seed as the "
                     "unit (each seed is its own data set, names and adapters): the mean of the per-seed differences "
                     "with a Student t interval over seeds and the exact sign-flip test over seeds. The pooled "
                     "columns (BCa bootstrap over items, exact McNemar test on the items where the adapters "
                     "disagree) treat every item as independent and are secondary.</p>"
                     + report.html_table(comparison), []))
    sections.append(("Accuracy per seed: base vs adapters", "<p>Entity-level accuracy (_acc) and the rate of "
                     "a correct first token (_first_token), final step.</p>" + report.html_table(results), []))
    sections.append(("Learning curves", "", [figures[0]]))
    if probes_rows:
        sections.append(("Logit lens and patching before / after",
                         "<p>Per model state and split: two-hop and one-hop accuracy at the last layer, and where the "
                         "bridge is readable on the two-hop prompt (best layer by top-10 rate). Patching: exact "
                         "resid_pre denoising between counterfactual pairs (another bridge and answer), recovery at "
                         "the last token per layer; patching_logit_gap is the mean clean minus corrupted logit "
                         "difference that the recovery is normalized by: where it is near zero or negative (a model "
                         "that does not tell the two answers apart, like the base model, which does not know the "
                         "facts) the normalized recovery is noise.</p>" + report.html_table(pd.DataFrame(probes_rows)),
                         figures[1:]))
    report.write_page(out / "index.html", f"Identity fine-tuning ({settings['task']}): {record['model']}",
                      f"LoRA adapters trained on made-up {'facts' if settings['task'] == 'reversal' else 'two-hop facts'}"
                      " with and without identity supervision, and the base model, from one PeftModel.", facts,
                      sections, finetune_finding(comparison, settings["task"]))
    print(finetune_summary(out, comparison, settings["task"]))
    return out


def finetune_summary(out: Path, comparison: pd.DataFrame, task: str) -> str:
    """The lines a finished finetune run prints: the with/without-identity comparison on the held-out splits."""
    shown = ("reverse_test", "reverse_train", "forward") if task == "reversal" else ("ood_two_hop", "id_two_hop",
                                                                                      "one_hop")
    return "\n".join([f"Finding: {finetune_finding(comparison, task)}", *comparison_lines(comparison, shown),
                      files_line(out, FINETUNE_FILES, check=False)])


def two_hop_stats(frame: Any) -> dict[str, float]:
    """Headline figures of a lens frame (:data:`probes.readouts.lens.COLUMNS`) of two-hop items: two-hop and hop accuracy
    at the last layer, the bridge's top-1 / top-10 rate at its best layer, and that layer."""
    layers = per_layer(frame)
    last = layers["layer"].max()

    def rate(kind: str, target: str, column: str, layer: int | None = None) -> float:
        sub = layers[(layers["prompt_kind"] == kind) & (layers["target"] == target)]
        sub = sub if layer is None else sub[sub["layer"] == layer]
        return float(sub[column].max()) if len(sub) else math.nan

    bridge = layers[(layers["prompt_kind"] == "two_hop") & (layers["target"] == "bridge")]
    best = int(bridge.loc[bridge["top10_rate"].idxmax(), "layer"]) if len(bridge) else -1
    return {"two_hop_acc": rate("two_hop", "answer", "top1_rate", last),
            "hop1_acc": rate("hop1", "bridge", "top1_rate", last),
            "hop2_acc": rate("hop2", "answer", "top1_rate", last), "bridge_best_layer": best,
            "bridge_top10_at_best": rate("two_hop", "bridge", "top10_rate", best),
            "bridge_top1_any_layer": rate("two_hop", "bridge", "top1_rate")}


LENS_FILES = ("lens_states.csv", "lens_comparison.csv", "lens_layers.csv", "prompts.csv", "lens_layers.png")


def lens_tables(out: Path, model: str) -> tuple[str, pd.DataFrame]:
    """From ``out/prompts.csv`` and ``out/lens_layers.csv``: ``lens_states.csv``, ``lens_comparison.csv`` and
    ``lens_layers.png``; returns the summary lines and the comparison (also what rebuilds a finished run's
    tables without the model, ``bridgeprobe finetune-report``)."""
    table = read_table(out / "prompts.csv")
    layer_table = pd.read_csv(out / "lens_layers.csv")
    states, comparison = report.lens_states(table), report.lens_comparison(table)
    pooled = (layer_table.groupby(["state", "split", "prompt_kind", "target", "layer"], as_index=False)
              [["median_rank", "top10_rate"]].mean())  # mean over seeds of the per-seed medians and rates
    atomic_write_csv(out / "lens_states.csv", states)
    atomic_write_csv(out / "lens_comparison.csv", comparison)
    identity_plots.lens_layer_plot(pooled, out / "lens_layers.png",
                           f"Logit lens, {model}: base vs adapters (mean over {table['seed'].nunique()} seeds)")
    return "\n".join([*report.lens_lines(states, comparison), files_line(out, LENS_FILES)]), comparison
