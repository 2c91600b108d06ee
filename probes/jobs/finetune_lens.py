"""The logit lens on every model state of a finished two-hop ``finetune`` run, with the power to compare them.

``finetune`` itself reads the lens on a few probe items of the first seed. This reads it on each seed's ID and OOD
two-hop test prompts (all of them, or ``per_split`` each) for the base model and every saved adapter, loaded once
into one ``PeftModel``, and compares the states item by item (:func:`analyses.identity_report.lens_states` and
``lens_comparison``): is the bridge readable at some layer of the two-hop prompt more often than its matched
control, and more often with identity supervision than without? ``bridgeprobe finetune-lens`` only parses flags
and calls :func:`finetune_lens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bridgeprobe.analyses.identity_pages import lens_tables
from bridgeprobe.analyses.identity_report import synth_split
from bridgeprobe.probes.identity.data import adapter_name, select_split_items
from bridgeprobe.probes.io.results import atomic_write_csv
from bridgeprobe.probes.runs.pipeline import Timer, versions
from bridgeprobe.probes.runs.rundir import RunDirError, differences, model_identity, read_run_record, write_finished
from bridgeprobe.prompts.schema import PromptItem


def finished_two_hop_run(run_dir: Path) -> dict[str, Any]:
    """``run_dir/run.json`` of a finished two-hop finetune run whose adapters are all on disk, or a one-line
    error (before any model loads)."""
    from bridgeprobe.probes.model.load import check_adapter

    path = run_dir / "run.json"
    if not path.is_file():
        raise ValueError(f"{path}: not a finished finetune run (no such file)")
    record = read_run_record(path, "rerun that finetune run with --overwrite")
    if record.get("command") != "finetune" or record.get("status") != "finished":
        raise ValueError(f"{path}: not a finished finetune run (command {record.get('command')!r}, "
                         f"status {record.get('status')!r})")
    settings = record["settings"]
    if settings["task"] != "two_hop":
        raise ValueError(f"{path}: task {settings['task']!r}; the lens reads two-hop prompts only")
    for seed in settings["seeds"]:
        for condition in settings["conditions"]:
            check_adapter(run_dir / "adapters" / adapter_name(condition, seed))
        prompts = run_dir / "data" / f"seed{seed}" / "prompts.jsonl"
        if not prompts.is_file():
            raise ValueError(f"{prompts}: missing (the two-hop test prompts of seed {seed})")
    return record


def base_model(run_dir: Path, record: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Where the finetune run's base model is (the absolute location it recorded; older runs: the checkpoint
    directory of its fingerprint, else the name it was given) and its identity, checked before any model loads:
    weights that are not the ones the adapters were trained on are a one-line error."""
    from bridgeprobe.probes.model.load import ModelLoadError

    recorded = (record.get("fingerprint") or {}).get("model")  # the identity the run started with
    location = record.get("model_path") or (recorded or {}).get("directory") or record["model"]
    if not recorded:
        return location, None
    try:
        found = model_identity(location)
    except (ModelLoadError, OSError) as err:
        raise RunDirError(f"{run_dir / 'run.json'}: its base model {location} cannot be read ({err}); put the "
                          "model back there, or rerun finetune") from None
    if found != recorded:
        raise RunDirError(f"{run_dir / 'run.json'}: the base model {location} is not the one its adapters were "
                          f"trained on ({'; '.join(differences(recorded, found))}); put those weights back, or "
                          "rerun finetune with --recompute")
    return location, found


def seed_items(run_dir: Path, seed: int, per_split: int | None) -> list[PromptItem]:
    """The ID and OOD two-hop test prompts of one seed (``per_split`` of each split, drawn by the stratified
    sampler with the seed, pair partners included, when given)."""
    from bridgeprobe.prompts.loaders import load_prompts

    items = load_prompts([run_dir / "data" / f"seed{seed}" / "prompts.jsonl"])
    if per_split is None:
        return items
    return [*select_split_items(items, "id_test", per_split, seed), *select_split_items(items, "ood_test", per_split, seed)]


def finetune_lens(run_dir: Path, out: Path, *, per_split: int | None = None,
                  batch_size: int | None = None) -> pd.DataFrame:
    """Run the lens for every (seed, model state) of the finished two-hop run in ``run_dir`` into
    ``out/<state>_seed<N>/lens.csv`` (each resumable), then write the comparison tables and return
    ``lens_comparison``."""
    from peft import PeftModel

    from bridgeprobe.analyses.aggregate import per_layer, per_prompt
    from bridgeprobe.probes.identity.finetune import BASE, inner_model, model_state
    from bridgeprobe.probes.model.hooks import NativeHooks
    from bridgeprobe.probes.model.load import check_adapter_fits, load_model
    from bridgeprobe.probes.runs.pipeline import run_lens

    record = finished_two_hop_run(run_dir)
    location, identity = base_model(run_dir, record)
    settings, load = record["settings"], record["load"]
    seeds, conditions = settings["seeds"], settings["conditions"]
    items = {seed: seed_items(run_dir, seed, per_split) for seed in seeds}
    timer = Timer()
    with timer.section("load_model_s"):
        base, tokenizer = load_model(location, dtype=load["dtype"], device=load["device"],
                                     device_map=load["device_map"], quantize=load["quantize"])
        names = [adapter_name(condition, seed) for seed in seeds for condition in conditions]
        for name in names:  # before peft wraps the base model: its module names are the ones adapters name
            check_adapter_fits(base, run_dir / "adapters" / name)
        peft_model = None
        for name in names:
            path = str(run_dir / "adapters" / name)
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
    hooked = NativeHooks(inner_model(peft_model), tokenizer)
    prompts, layers = [], []
    for seed in seeds:
        for state in (BASE, *conditions):
            with model_state(peft_model, state if state == BASE else adapter_name(state, seed)), \
                    timer.section(f"lens_{state}_seed{seed}_s"):
                run = run_lens(hooked, items[seed], out / f"{state}_seed{seed}", batch_size=batch_size,
                               settings={"source": str(run_dir.resolve()), "state": state, "seed": seed,
                                         "per_split": per_split})
            frame = run.frame.assign(split=run.frame["prompt_id"].map(synth_split))
            prompts.append(per_prompt(run.frame).assign(seed=seed, state=state))
            layers += [per_layer(part).assign(seed=seed, state=state, split=split)
                       for split, part in frame.groupby("split")]
    table = pd.concat(prompts, ignore_index=True)
    table["split"] = table["prompt_id"].map(synth_split)
    atomic_write_csv(out / "prompts.csv", table)
    atomic_write_csv(out / "lens_layers.csv", pd.concat(layers, ignore_index=True))
    summary, comparison = lens_tables(out, record["model"])
    write_finished(out, {"command": "finetune-lens", "source": str(run_dir.resolve()), "model": record["model"],
                         "model_path": location, "model_identity": identity,
                         "settings": {"per_split": per_split, "batch_size": batch_size, "seeds": seeds,
                                      "conditions": conditions},
                         "n_prompts": {str(seed): len(v) for seed, v in items.items()},
                         "timings": timer.timings, "versions": versions()}, summary)
    print(summary)
    return comparison
