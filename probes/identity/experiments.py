"""Identity-supervision experiments (Lin, Chen, Xu 2025): synthetic two-hop data sets on disk, the from-scratch
grid (:func:`reproduce`) and LoRA fine-tuning probed before and after (:func:`finetune`), each with its report.

``bridgeprobe synth`` / ``reproduce`` / ``finetune`` (:mod:`bridgeprobe.probes.cli.identity`) only turn flags into the configs
these functions take. Runs resume: a killed grid or fine-tuning run continues from its checkpoints and incremental
CSVs when called again with the same settings; a finished one only rebuilds its report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from bridgeprobe.analyses.summaries import files_line, identity_lines
from bridgeprobe.probes.runs.pipeline import ModelOptions, Timer, versions
from bridgeprobe.probes.io.results import IncrementalCSV, atomic_write, atomic_write_csv, read_table
from bridgeprobe.probes.runs.rundir import (RunDirError, RunDirectory, check_rows, flat_settings,
                                      read_run_record, write_finished)
from bridgeprobe.prompts.sampling import sample_items
from bridgeprobe.prompts.schema import PromptItem
from bridgeprobe.prompts.reversal import generate_reversal
from bridgeprobe.prompts.synthetic import (SynthConfig, Splits, TwoHopTexts, generate, make_names, people, render_items,
                                           save_splits, training_texts)

# Named configurations. `cpu` is the default: the grid's best cell, 5 seeds x 2 conditions in about 12 minutes on 2
# quiet CPU cores and up to about 25 under load (docs/identity.md: 2-layer GPT-2, untied embeddings, zero-hop identity, weight decay
# 1, bridge-level OOD); `gpu` a larger one for GPU hosts (not run here); `tiny` a seconds-long smoke run.
REPRODUCE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"data": dict(n_subjects=100, n_bridges=20, n_objects=20, n_r1=4, n_r2=4, identity_form="zero_hop"),
            "train": dict(model="gpt2", n_layer=2, d_model=64, n_head=4, d_mlp=256, tie_embeddings=False,
                          steps=5000, batch_size=128, lr=2e-3, weight_decay=1.0, eval_every=500,
                          checkpoint_every=500, identity_repeat=10),
            "seeds": [0, 1, 2, 3, 4]},
    "gpu": {"data": dict(n_subjects=2000, n_bridges=200, n_objects=200, n_r1=6, n_r2=6, identity_form="zero_hop"),
            "train": dict(model="gpt2", n_layer=4, d_model=256, n_head=8, d_mlp=1024, tie_embeddings=False,
                          steps=20000, batch_size=1024, lr=5e-4, weight_decay=1.0, eval_every=500,
                          checkpoint_every=2000, identity_repeat=10, eval_limit=2000),
            "seeds": [0, 1, 2, 3, 4]},
    "tiny": {"data": dict(n_subjects=16, n_bridges=6, n_objects=6, n_r1=2, n_r2=2),
             "train": dict(model="gpt2", n_layer=2, d_model=32, n_head=2, d_mlp=64, steps=40, batch_size=16,
                           lr=3e-3, warmup=5, eval_every=10, checkpoint_every=20),
             "seeds": [0]},
}
# LoRA data: at least 256 ID and 256 OOD two-hop queries per seed (bridge split), about 530 training sentences
FINETUNE_DATA = dict(n_subjects=112, n_bridges=16, n_objects=32, n_r1=2, n_r2=4, two_hop_train_fraction=0.4)


# ------------------------------------------------------------------------------------------------------ synth

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



def write_synth(config: SynthConfig, out: Path, tokenizer: Any = None) -> Splits:
    """Generate and check the data of ``config`` and save it under ``out`` with its natural-language prompt set
    (prompts.jsonl) and training sentences (train.jsonl); ``tokenizer`` makes first tokens distinct."""
    splits = generate(config)
    names = make_names(splits, seed=config.seed, tokenizer=tokenizer)
    save_splits(splits, out, names)
    write_text_sets(splits, names, out, tokenizer)
    return splits


def write_text_sets(splits: Splits, names: dict[str, str], out: Path, tokenizer: Any) -> list[PromptItem]:
    """DIR/prompts.jsonl (ID and OOD two-hop test items) and DIR/train.jsonl (training sentences by split)."""
    items = render_items(splits, names, ("id_test", "ood_test"), tokenizer=tokenizer)
    atomic_write(out / "prompts.jsonl", "".join(json.dumps(i.to_dict()) + "\n" for i in items))
    lines = []
    for split in ("one_hop", "two_hop_train", "identity"):
        examples = splits.examples[split]
        for example, (prompt, target) in zip(examples, training_texts(splits, examples, names)):
            lines.append(json.dumps({"split": split, "task": example.task, "prompt": prompt, "target": target}))
    atomic_write(out / "train.jsonl", "\n".join(lines) + "\n")
    return items


REPRODUCE_FILES = ("index.html", "results.csv", "comparison.csv", "comparison.md", "metrics.csv", "alignment.csv",
                   "weights.csv", "spectrum.csv", "*.png", "run.json")
FINETUNE_FILES = ("index.html", "comparison.csv", "items.csv", "results.csv", "metrics.csv", "lens_layers.csv",
                  "lens_summary.csv", "patching_layers.csv", "*.png", "adapters/", "run.json")


def summary_text(out: Path, results: pd.DataFrame, files: Sequence[str], finding: str = "") -> str:
    """The lines a finished run prints: the finding, final accuracies per condition, and the files."""
    return "\n".join([*([f"Finding: {finding}"] if finding else []), *identity_lines(results),
                      files_line(out, files, check=False)])


def timings_text(record: dict[str, Any]) -> str:
    """The run's timings as durations with the thread count: "train 22.5 min (1 thread)"."""
    from bridgeprobe.analyses.page import seconds

    threads = record["threads"]
    return (", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {seconds(v)}" for k, v in record["timings"].items())
            + f" ({threads} thread{'s' if threads != 1 else ''})")


def reproduce_finding_of(out: Path, record: dict[str, Any]) -> str:
    """The finding of a reproduce run (:func:`analyses.findings.reproduce_finding`) from its comparison.csv."""
    from bridgeprobe.analyses.findings import reproduce_finding

    table = pd.read_csv(out / "comparison.csv")
    keys = [k for k in GRID_KEYS if k in table]
    labels = [", ".join(f"{k.replace('_', ' ')} {row[k]:g}" for k in keys) for row in table.to_dict("records")]
    return reproduce_finding(table, 1 / record["settings"]["data"]["n_objects"], labels)


def finished(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished run with these settings (another finished run there is an error)."""
    if not (out / "run.json").is_file() or (out / "metrics.partial.csv").exists():
        return False
    record = json.loads((out / "run.json").read_text())
    if record.get("status") == "running":  # started by probes.runs.rundir, which has compared the settings
        return False
    previous = record.get("settings")
    if previous != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds a finished run with other settings; use another --out or delete it")
    return True


# report files each command writes from its tables, and those tables (what rebuilds a finished run's report)
REPRODUCE_REPORT = ("comparison.csv", "comparison.md", "learning_curves.png", "alignment.png", "alignment_vs_ood.png",
                    "spectrum.png", "nuclear_norm.png", "index.html")
REPRODUCE_TABLES = ("metrics.csv", "alignment.csv", "weights.csv", "spectrum.csv", "results.csv")
FINETUNE_REPORT = ("comparison.csv", "learning_curves.png", "index.html")
FINETUNE_TABLES = ("metrics.csv", "results.csv", "items.csv")


def missing_report(out: Path, command: str) -> list[str]:
    """The report files of the finished ``reproduce`` or ``finetune`` run in ``out`` that are not there."""
    names = list(REPRODUCE_REPORT if command == "reproduce" else FINETUNE_REPORT)
    if command == "finetune" and any(out.glob("lens/*/*/lens.csv")):
        names += ["lens_layers.csv", "lens_summary.csv", "lens_layers.png"]
    if command == "finetune" and any(out.glob("patching/*/*/patching.csv")):
        names.append("patching_layers.csv")
    return [name for name in names if not (out / name).is_file()]


def rebuild_report(out: Path, command: str) -> Path:
    """Rewrite the report files of the finished ``command`` run in ``out`` from its tables (no model, no
    training); a one-line error naming what to run when a table is missing too."""
    gone = [name for name in (REPRODUCE_TABLES if command == "reproduce" else FINETUNE_TABLES)
            if not (out / name).is_file()]
    if gone:
        raise RunDirError(f"{out}: {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} missing too, so the report "
                          f"cannot be rebuilt from the tables; rerun the same {command} command with --recompute")
    return reproduce_report(out) if command == "reproduce" else finetune_report(out)


# -------------------------------------------------------------------------------------------------- reproduce

RUN_KEYS = ("run", "model", "init_scale", "weight_decay", "identity_repeat", "condition", "seed")
GRID_KEYS = ("init_scale", "weight_decay", "identity_repeat")


def reproduce(out: Path, base: Any, data: dict[int, SynthConfig], grid: Sequence[tuple[float, float, int]], *,
              preset: str, device: str = "cpu", keep_checkpoints: bool = False) -> Path:
    """Train every (init_scale, weight_decay, identity_repeat) of ``grid`` x seed (the keys of ``data``) x condition
    from the :class:`~probes.identity.scratch.TrainConfig` ``base`` (resumable), then write the tables, plots, page and
    run.json under ``out``; ``preset`` is the name recorded in the settings."""
    from bridgeprobe.probes.identity.scratch import (ALIGNMENT_COLUMNS, CONDITIONS, METRIC_COLUMNS, WEIGHT_COLUMNS, run_name, train,
                                            weight_stats)

    seeds = list(data)
    settings = {"preset": preset, "train": asdict(base), "data": data[seeds[0]].record(),
                "seeds": seeds, "grid": [dict(zip(GRID_KEYS, g)) for g in grid], "conditions": list(CONDITIONS)}
    if finished(out, settings):
        print(f"{out} holds a finished run with these settings; rebuilding its report")
        return reproduce_report(out)
    timer = Timer()
    stores = {
        "metrics": IncrementalCSV(out, "metrics", (*RUN_KEYS, *METRIC_COLUMNS), settings),
        "alignment": IncrementalCSV(out, "alignment", (*RUN_KEYS, "step", *ALIGNMENT_COLUMNS), settings),
        "weights": IncrementalCSV(out, "weights", (*RUN_KEYS, "step", *WEIGHT_COLUMNS), settings),
        "spectrum": IncrementalCSV(out, "spectrum", (*RUN_KEYS, "weight", "index", "singular_value"), settings),
    }
    done = {name: store.done(["run", "step"] if name != "spectrum" else ["run"]) for name, store in stores.items()}
    splits = {}
    for seed, config in data.items():
        splits[seed] = generate(config)
        save_splits(splits[seed], out / "data" / f"seed{seed}")
    runs = [(g, seed, condition) for g in grid for seed in seeds for condition in CONDITIONS]
    results, run_seconds = [], {}
    bar = tqdm(total=len(runs) * base.steps, desc="reproduce", unit="step")
    with timer.section("train_s"):
        for index, ((init_scale, weight_decay, repeat), seed, condition) in enumerate(runs):
            config = replace(base, init_scale=init_scale, weight_decay=weight_decay, identity_repeat=repeat)
            name = run_name(config, condition, seed)
            keys = {"run": name, "model": config.model, "init_scale": init_scale, "weight_decay": weight_decay,
                    "identity_repeat": repeat, "condition": condition, "seed": seed}
            bar.set_postfix_str(name)
            started = time.perf_counter()

            def on_eval(row: dict, align: list[dict], weights: list[dict], keys: dict = keys) -> None:
                step = (keys["run"], str(row["step"]))
                if step not in done["metrics"]:
                    stores["metrics"].append([{**keys, **row}])
                if step not in done["alignment"]:
                    stores["alignment"].append([{**keys, "step": row["step"], **a} for a in align])
                if step not in done["weights"]:
                    stores["weights"].append([{**keys, "step": row["step"], **w} for w in weights])

            offset = index * base.steps
            model, result = train(splits[seed], config, identity=condition == "identity", seed=seed,
                                  checkpoint=out / "checkpoints" / f"{name}.pt", on_eval=on_eval, device=device,
                                  progress=lambda step, offset=offset: bar.update(offset + step - bar.n))
            bar.update(offset + config.steps - bar.n)
            if (name,) not in done["spectrum"]:
                stores["spectrum"].append([{**keys, **s} for s in weight_stats(model)[1]])
            run_seconds[name] = round(time.perf_counter() - started, 2)
            results.append({**{k: v for k, v in keys.items() if k != "run"},
                            **{k: result.final[k] for k in ("ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc",
                                                            "identity_acc", "train_two_hop_acc")},
                            "resumed_from": result.resumed_from})
    bar.close()
    for name, store in stores.items():
        store.finish(sort_by=["run", "step"] if name != "spectrum" else ["run", "weight", "index"])
    record = {"command": "reproduce", "settings": settings, "versions": versions(),
              "threads": torch.get_num_threads(), "seed": seeds, "timings": timer.timings,
              "run_seconds": run_seconds, "results": results}
    atomic_write_csv(out / "results.csv", pd.DataFrame(results))
    reproduce_report(out, record)
    # last, after every report file: a run killed before here resumes (its checkpoints say the training is done)
    write_finished(out, record, summary_text(out, pd.DataFrame(results), REPRODUCE_FILES,
                                             reproduce_finding_of(out, record)))
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


def reproduce_report(out: Path, record: dict[str, Any] | None = None) -> Path:
    """The reproduce page and tables, from the files of a finished grid (no training); ``record``: the run's
    record (default: its run.json)."""
    from bridgeprobe.analyses import identity_report as report

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
        "curves": report.learning_curves(metrics, keys, out / "learning_curves.png", title,
                                         chance=1 / settings["data"]["n_objects"]),
        "alignment": report.alignment_curves(alignment, keys, out / "alignment.png",
                                             "Nearest bridge state is the right one (bridge layer 0; "
                                             f"{report.alignment_subset(alignment)[1]})"),
        "mechanism": report.alignment_vs_accuracy(metrics, alignment, out / "alignment_vs_ood.png",
                                                  "Alignment and OOD accuracy over training"),
        "spectrum": report.spectrum_plot(spectrum, keys, out / "spectrum.png", "Final singular values (normalized)",
                                         weights=[w for w in dict.fromkeys(spectrum["weight"])
                                                  if any(k in w for k in ("wte", "embed", "c_fc", "mlp.0"))]),
        "nuclear": report.nuclear_norm_curves(pd.read_csv(out / "weights.csv"), keys, out / "nuclear_norm.png",
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



def reproduce_runs(paths: Sequence[Path]) -> list[Path]:
    """The finished ``reproduce`` run directories among ``paths`` and below them; a damaged run.json, or a
    finished run without its settings or with a results.csv missing or not of the row count its run recorded, is
    a one-line error naming the file."""
    found = []
    for path in paths:
        for record in sorted([path / "run.json"] if (path / "run.json").is_file() else path.rglob("run.json")):
            data = read_run_record(record)
            if record.parent.resolve() in {run.resolve() for run in found}:
                continue  # named twice (a directory and its parent)
            if data.get("command") == "reproduce" and data.get("status", "finished") == "finished":
                if not isinstance(data.get("settings"), dict):
                    raise RunDirError(f"{record} has no settings; delete that run, or rerun it with --overwrite")
                if not (record.parent / "results.csv").is_file():
                    raise RunDirError(f"{record.parent / 'results.csv'} is missing; rerun that run with --recompute")
                check_rows(record.parent, "results.csv", data)  # cut short or edited since its run wrote it
                found.append(record.parent)
    return found


# settings that are no property of a grid cell: the seed and the swept knobs (columns of every results.csv row),
# the sweep's lists, the preset's name and how often a checkpoint is saved
GRID_IGNORED = ("preset", "seeds", "grid", "conditions", "data.seed", "train.init_scale", "train.weight_decay",
                "train.identity_repeat", "train.checkpoint_every")


def grid_cells(runs: Sequence[Path]) -> dict[Path, dict[str, Any]]:
    """Per run, its value of every setting in which the runs differ and that no grid column shows
    (:data:`analyses.identity_report.CELL_KEYS`): layers, batch size, entity counts, ... (dotted names,
    ``train.n_layer``), so that only runs with equal settings but the seed share a grid cell."""
    from bridgeprobe.analyses.identity_report import CELL_KEYS
    shown = {".".join(where) for _, where, _ in CELL_KEYS} | set(GRID_IGNORED)
    flat = {run: flat_settings(json.loads((run / "run.json").read_text())["settings"]) for run in runs}
    names = sorted({name for values in flat.values() for name in values if name not in shown})
    unset = "(unset)"
    differing = [name for name in names if len({json.dumps(v.get(name, unset), sort_keys=True)
                                                for v in flat.values()}) > 1]
    cells: dict[Path, dict[str, Any]] = {run: {} for run in runs}
    for name in differing:
        values = {run: v.get(name, unset) for run, v in flat.items()}
        plain = all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in values.values()) and \
            len({type(x) for x in values.values()}) == 1
        for run, value in values.items():  # a string where types mix (or None): groupby drops missing keys
            cells[run][name] = value if plain else (value if isinstance(value, str) else json.dumps(value))
    return cells


GRID_FILES = ("grid.csv", "grid.md")


def write_grid(paths: Sequence[Path], out: Path) -> pd.DataFrame:
    """Collect the finished reproduce runs under ``paths`` into one table, a row per grid cell (model, data,
    training and the swept knobs; :func:`analyses.identity_report.grid_table`): ``out``/grid.csv and grid.md."""
    from bridgeprobe.analyses import identity_report as report

    runs = reproduce_runs(paths)
    if not runs:
        raise ValueError(f"no finished reproduce run under {', '.join(map(str, paths))}")
    cells = grid_cells(runs)
    extra_keys = list(next(iter(cells.values())))
    results = report.grid_results(runs, cells)
    keys = [c for c, _, _ in report.CELL_KEYS] + extra_keys + [*GRID_KEYS, "condition", "seed"]
    for _, group in results.groupby(keys, dropna=False, sort=False):
        if len(group) > 1:  # one row per cell, condition and seed in each run: the seed is in two runs
            raise RunDirError(f"{' and '.join(sorted(set(group['run_dir'])))} both hold seed {group['seed'].iloc[0]} "
                              "of the same grid cell (equal settings); pass only one of them")
    chances = {1 / json.loads((r / "run.json").read_text())["settings"]["data"]["n_objects"] for r in runs}
    table = report.grid_table(results, chance=chances.pop() if len(chances) == 1 else None, extra_keys=extra_keys)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with RunDirectory.locked(out):  # like every writer: not into a directory a running job holds
        atomic_write_csv(out / "grid.csv", table)
        atomic_write(out / "grid.md", report.grid_markdown(table))
    return table


# --------------------------------------------------------------------------------------------------- finetune


def select_split_items(items: Sequence[PromptItem], split: str, n: int, seed: int = 0) -> list[PromptItem]:
    """``n`` items of a split drawn by the project's stratified sampler (:func:`prompts.sampling.sample_items`:
    round-robin over the relation compositions, ``seed``-shuffled), each item's pair partner taken along so patching
    has pairs. (The first ``n`` in file order would cover only the first compositions.)"""
    prefix = f"synth-{split.replace('_', '-')}-"
    return sample_items([i for i in items if i.id.startswith(prefix)], n, "stratified", seed, pairs=True)


def _task_data(kind: str, config: Any, tokenizer: Any, out: Path) -> tuple[Any, list[Path], list[PromptItem]]:
    """The text task of one seed (``two_hop``: :class:`TwoHopTexts`; ``reversal``: :class:`ReversalData`), saved
    under ``out``; with its files and, for two-hop, the natural-language prompt items the lens reads."""
    if kind == "reversal":
        data = generate_reversal(config, people(2 * config.n_pairs, seed=config.seed))
        rows = [{"split": split, **asdict(fact)} for split in data.examples for fact in data.examples[split]]
        atomic_write(out / "reversal.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(out / "reversal.json", json.dumps(data.summary(), indent=1))
        return data, [out / "reversal.jsonl", out / "reversal.json"], []
    splits = generate(config)
    names = make_names(splits, seed=config.seed, tokenizer=tokenizer)
    files = save_splits(splits, out, names)
    items = write_text_sets(splits, names, out, tokenizer)
    return TwoHopTexts(splits, names), files + [out / "prompts.jsonl", out / "train.jsonl"], items


def adapter_name(condition: str, seed: int) -> str:
    """The adapter (and model-state) name of one condition and seed, e.g. ``identity_seed0``."""
    return f"{condition}_seed{seed}"


def finetune(out: Path, options: ModelOptions, data: dict[int, Any], config: Any, *, task: str = "two_hop",
             conditions: Sequence[str] = ("no_identity", "identity"), probe_items: int = 16, patch_pairs: int = 2,
             memory: bool = False, keep_checkpoints: bool = False) -> Path:
    """Train one LoRA adapter per seed (the keys of ``data``, each with its own data set) and condition
    (:class:`~probes.identity.finetune.FinetuneConfig` ``config``; resumable) on ``task`` (``two_hop`` with
    :class:`SynthConfig` data, or ``reversal`` with :class:`ReversalConfig` data); score base and adapters on every
    evaluation item (``config.eval_limit`` per split) -> items.csv; for two-hop, run the lens, exact patching
    (``patch_pairs`` per split) and, with ``memory``, the shared-memory analyses on ``probe_items`` items per split
    of the first seed; and write the report."""
    from accelerate import Accelerator

    from bridgeprobe.probes.identity.finetune import (BASE, add_adapter, eval_pairs, inner_model, item_scores, load_base,
                                             metric_columns, model_state, save_adapter, train_adapter)
    from bridgeprobe.probes.model.hooks import NativeHooks
    from bridgeprobe.probes.runs.pipeline import item_pairs, run_lens, run_patching, run_record

    if options.backend != "native":
        raise ValueError("finetune hooks the adapted model with the native backend; drop --backend")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1 and len(conditions) * len(data) > 1:
        raise ValueError("with several processes, train one condition and seed per launch (--conditions identity)")
    timer = Timer()
    seeds = list(data)
    with timer.section("load_model_s"):
        base, tokenizer = load_base(options.model, quantize=options.quantize, dtype=options.dtype,
                                    device=options.device, device_map=options.device_map)
    tasks, data_files, items = {}, {}, {}
    for seed, data_config in data.items():
        tasks[seed], data_files[seed], items[seed] = _task_data(task, data_config, tokenizer, out / "data" / f"seed{seed}")
    settings = {"model": options.model, "quantize": options.quantize, "dtype": options.dtype, "task": task,
                "finetune": asdict(config), "data": data[seeds[0]].record(), "seeds": seeds,
                "conditions": list(conditions), "probe_items": probe_items, "patch_pairs": patch_pairs,
                "memory": memory}
    if finished(out, settings):
        print(f"{out} holds a finished run with these settings; rebuilding its report")
        return finetune_report(out)
    columns = metric_columns(tasks[seeds[0]])
    store = IncrementalCSV(out, "metrics", ("condition", "seed", *columns), settings)
    done = store.done(["condition", "seed", "step"])
    peft_model, results = base, []
    runs = [(seed, condition) for seed in seeds for condition in conditions]
    bar = tqdm(total=len(runs) * config.steps, desc="finetune", unit="step", disable=not accelerator.is_main_process)
    with timer.section("train_s"):
        for index, (seed, condition) in enumerate(runs):
            adapter = adapter_name(condition, seed)
            peft_model = add_adapter(peft_model, adapter, config, seed)
            bar.set_postfix_str(adapter)

            def on_eval(row: dict, condition: str = condition, seed: int = seed) -> None:
                if (condition, str(seed), str(row["step"])) not in done:
                    store.append([{"condition": condition, "seed": seed, **row}])

            started = time.perf_counter()
            final = train_adapter(peft_model, adapter, tokenizer, tasks[seed], config,
                                  identity=condition == "identity", seed=seed,
                                  checkpoint=out / "checkpoints" / f"{adapter}.pt", on_eval=on_eval,
                                  progress=lambda step, offset=index * config.steps: bar.update(offset + step - bar.n),
                                  accelerator=accelerator)
            timer.timings[f"train_{adapter}_s"] = round(time.perf_counter() - started, 2)
            results.append({"condition": condition, "seed": seed, **{k: final[k] for k in columns[3:]}})
            if accelerator.is_main_process:
                save_adapter(peft_model, adapter, out / "adapters", data_files[seed], base_model=options.model)
    bar.close()
    if not accelerator.is_main_process:
        return out
    rows = []
    sets = {seed: eval_pairs(tasks[seed], config.eval_limit, seed) for seed in seeds}
    scoring = tqdm(total=(1 + len(conditions)) * sum(len(p) for s in sets.values() for p in s.values()),
                   desc="scoring", unit="item")
    with timer.section("item_scores_s"):
        for seed in seeds:
            for state in (BASE, *conditions):
                with model_state(peft_model, state if state == BASE else adapter_name(state, seed)):
                    for split, pairs in sets[seed].items():
                        scores = item_scores(peft_model, tokenizer, pairs)
                        scoring.update(len(pairs))
                        rows += [{"seed": seed, "state": state, "split": split, "item": n, "prompt": prompt,
                                  "target": target, "first_token": int(first), "entity": int(entity)}
                                 for n, ((prompt, target), (first, entity)) in enumerate(zip(pairs, scores))]
    scoring.close()
    atomic_write_csv(out / "items.csv", pd.DataFrame(rows))
    hooked = NativeHooks(inner_model(peft_model), tokenizer)
    probed = {split: select_split_items(items[seeds[0]], split, probe_items, seeds[0]) for split in ("id_test", "ood_test")}
    for state in (BASE, *conditions) if task == "two_hop" else ():
        named = state if state == BASE else adapter_name(state, seeds[0])
        with model_state(peft_model, named):
            for split, chosen in probed.items():
                if not chosen:
                    continue
                with timer.section(f"lens_{state}_{split}_s"):
                    run_lens(hooked, chosen, out / "lens" / state / split,
                             settings={**settings, "state": state, "split": split})
                # items without an equal-length partner have no pair; item_pairs refuses a set with none at all
                has_pairs = patch_pairs and any(item.pair for item in chosen)
                pairs = item_pairs(chosen, tokenizer, skip_unequal=True)[0] if has_pairs else []
                if pairs:
                    with timer.section(f"patching_{state}_{split}_s"):
                        run_patching(hooked, pairs[: patch_pairs], out / "patching" / state / split,
                                     sites=["resid_pre"], method="exact", direction="denoise",
                                     settings={**settings, "state": state, "split": split})
            if memory:
                from bridgeprobe.probes.memory.analysis import MemoryConfig, run_memory

                with timer.section(f"memory_{state}_s"):
                    run_memory(hooked, [i for chosen in probed.values() for i in chosen], out / "memory" / state,
                               MemoryConfig(analyses=("decoding", "alignment"), seed=seeds[0]),
                               settings={**settings, "state": state})
    record = run_record("finetune", hooked, options, settings, timer, {
        "results": results, "n_probe_items": {k: len(v) for k, v in probed.items()} if task == "two_hop" else {},
        "trainable_parameters": sum(p.numel() for n, p in peft_model.named_parameters()  # per adapter
                                    if f".{adapter_name(conditions[0], seeds[0])}." in n),
        "threads": torch.get_num_threads(),
    })
    atomic_write_csv(out / "results.csv", state_accuracies(pd.DataFrame(rows)))
    store.finish(sort_by=["condition", "seed", "step"])  # last: a crash before here resumes with every row kept
    from bridgeprobe.analyses.identity_report import item_comparison

    finetune_report(out, record)
    # last, after every report file: a run killed before here resumes (its checkpoints say the training is done)
    write_finished(out, record, finetune_summary(out, item_comparison(pd.DataFrame(rows)), task))
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


def state_accuracies(items: pd.DataFrame) -> pd.DataFrame:
    """One row per seed and model state: entity-level accuracy per split (``<split>_acc``) and the first-token
    rate (``<split>_first_token``), from items.csv rows."""
    table = items.pivot_table(index=["state", "seed"], columns="split", values=["entity", "first_token"],
                              aggfunc="mean", sort=False)
    table.columns = [f"{split}_{'acc' if kind == 'entity' else 'first_token'}" for kind, split in table.columns]
    return table.reset_index().rename(columns={"state": "condition"})


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
    from bridgeprobe.analyses import identity_report as report
    from bridgeprobe.analyses.aggregate import per_layer
    from bridgeprobe.analyses.findings import finetune_finding
    from bridgeprobe.analyses.patching_report import by_layer
    from bridgeprobe.probes.identity.finetune import two_hop_stats

    record = record if record is not None else json.loads((out / "run.json").read_text())
    results = pd.read_csv(out / "results.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    comparison = report.item_comparison(pd.read_csv(out / "items.csv"))
    atomic_write_csv(out / "comparison.csv", comparison)
    lens_tables, patch_tables = _state_tables(out, "lens"), _state_tables(out, "patching")
    figures = [report.learning_curves(metrics, [], out / "learning_curves.png", f"LoRA fine-tuning, {record['model']}",
                                      columns=(*[c for c in metrics if c.endswith("_acc")], "train_loss"))]
    probes_rows, sections = [], []
    if lens_tables:
        layers = pd.concat([per_layer(t).assign(state=t["state"].iloc[0], split=t["split"].iloc[0])
                            for t in lens_tables])
        atomic_write_csv(out / "lens_layers.csv", layers)
        figures.append(report.lens_layer_plot(layers, out / "lens_layers.png", "Logit lens: base vs adapted"))
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
            figures.append(report.patching_layer_plot(part[part["site"] == "resid_pre"], out / f"patching_{split}.png",
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
    from bridgeprobe.analyses.identity_report import comparison_lines

    from bridgeprobe.analyses.findings import finetune_finding

    shown = ("reverse_test", "reverse_train", "forward") if task == "reversal" else ("ood_two_hop", "id_two_hop",
                                                                                      "one_hop")
    return "\n".join([f"Finding: {finetune_finding(comparison, task)}", *comparison_lines(comparison, shown),
                      files_line(out, FINETUNE_FILES, check=False)])
