"""``bridgeprobe reproduce``: the from-scratch identity grid (:func:`reproduce`), its report rebuilt from the tables
of a finished run (:func:`rebuild_report`), and the grid of several runs (``identity-grid``, :func:`write_grid`).
Runs resume: a killed grid continues from its checkpoints and incremental CSVs when called again with the same
settings; a finished one only rebuilds its report."""

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

from bridgeprobe.analyses import identity_report as report
from bridgeprobe.analyses.identity_pages import (FINETUNE_REPORT, FINETUNE_TABLES, REPRODUCE_FILES, REPRODUCE_REPORT,
                                                 REPRODUCE_TABLES, finetune_report, reproduce_finding_of,
                                                 reproduce_report, summary_text)
from bridgeprobe.analyses.identity_report import CELL_KEYS, GRID_KEYS
from bridgeprobe.probes.io.results import IncrementalCSV, atomic_write, atomic_write_csv
from bridgeprobe.probes.runs.pipeline import Timer, versions
from bridgeprobe.probes.runs.rundir import (RunDirError, RunDirectory, check_rows, flat_settings, read_run_record,
                                            write_finished)
from bridgeprobe.prompts.synthetic import SynthConfig, generate, save_splits

RUN_KEYS = ("run", "model", "init_scale", "weight_decay", "identity_repeat", "condition", "seed")


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


def reproduce(out: Path, base: Any, data: dict[int, SynthConfig], grid: Sequence[tuple[float, float, int]], *,
              preset: str, device: str = "cpu", keep_checkpoints: bool = False) -> Path:
    """Train every (init_scale, weight_decay, identity_repeat) of ``grid`` x seed (the keys of ``data``) x condition
    from the :class:`~probes.identity.scratch.TrainConfig` ``base`` (resumable), then write the tables, plots, page and
    run.json under ``out``; ``preset`` is the name recorded in the settings."""
    from bridgeprobe.probes.identity.scratch import (ALIGNMENT_COLUMNS, CONDITIONS, METRIC_COLUMNS, WEIGHT_COLUMNS,
                                                     run_name, train, weight_stats)

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
    runs = reproduce_runs(paths)
    if not runs:
        raise ValueError(f"no finished reproduce run under {', '.join(map(str, paths))}")
    cells = grid_cells(runs)
    extra_keys = list(next(iter(cells.values())))
    results = report.grid_results(runs, cells)
    keys = [c for c, _, _ in CELL_KEYS] + extra_keys + [*GRID_KEYS, "condition", "seed"]
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
