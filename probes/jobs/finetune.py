"""``bridgeprobe finetune``: LoRA adapters trained with and without identity supervision on each seed's synthetic
data (:mod:`probes.identity.finetune`), every evaluation item scored for the base model and each adapter, the lens,
exact patching and (optionally) the shared-memory analyses read before and after, and the report. Resumable like
every job: a killed run continues from its checkpoints; a finished one only rebuilds its report."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from bridgeprobe.analyses.identity_pages import finetune_report, finetune_summary
from bridgeprobe.analyses.identity_report import item_comparison
from bridgeprobe.probes.jobs.reproduce import finished
from bridgeprobe.probes.identity.data import adapter_name, select_split_items, task_data
from bridgeprobe.probes.io.results import IncrementalCSV, atomic_write_csv
from bridgeprobe.probes.runs.pipeline import ModelOptions, Timer
from bridgeprobe.probes.runs.rundir import write_finished

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

    from bridgeprobe.probes.identity.finetune import (BASE, add_adapter, eval_pairs, inner_model, item_scores,
                                                      load_base, metric_columns, model_state, save_adapter,
                                                      train_adapter)
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
        tasks[seed], data_files[seed], items[seed] = task_data(task, data_config, tokenizer, out / "data" / f"seed{seed}")
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
                from bridgeprobe.probes.memory.analysis import run_memory
                from bridgeprobe.probes.memory.plans import MemoryConfig

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
