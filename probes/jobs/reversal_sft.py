"""``bridgeprobe reversal-sft``: Ma et al.'s husband-wife reversal experiment, one form and seed per run directory.

Full-parameter fine-tuning (:mod:`probes.identity.chat_sft`) of a pretrained chat model on one training set of
:mod:`prompts.couples` (``forward``, ``idn`` or ``ocr``), scored every ``eval_every`` steps on the forward facts,
the never-trained reversed questions and the shortcut (echoing the queried name). Writes DIR/metrics.csv (per
evaluation), items.csv (every scored question of the final model), results.csv (the final rates with exact
Clopper-Pearson intervals), data/train.jsonl and data/eval.jsonl (the examples as trained and scored), run.json.
Resumable from DIR/checkpoints/state.pt (model and optimizer; deleted at the end unless kept).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from bridgeprobe.analyses.stats import proportion_interval
from bridgeprobe.probes.identity.chat_sft import SFTConfig, encode_chat, entity_correct, train_chat
from bridgeprobe.probes.runs.pipeline import ModelOptions, versions
from bridgeprobe.probes.io.results import IncrementalCSV, atomic_write, atomic_write_csv
from bridgeprobe.probes.runs.rundir import write_finished
from bridgeprobe.prompts.couples import EVAL_SPLITS, ChatExample, check_couples, eval_sets, training_set

FILES = ("results.csv", "metrics.csv", "items.csv", "data/train.jsonl", "data/eval.jsonl", "run.json")


def score(model: Any, tokenizer: Any, sets: dict[str, list[ChatExample]]) -> dict[str, list[bool]]:
    """Entity-level greedy correctness of every question per evaluation split."""
    return {name: entity_correct(model, tokenizer, [(e.instruction, e.answer) for e in examples])
            for name, examples in sets.items()}


def _jsonl(examples: list[ChatExample]) -> str:
    return "".join(json.dumps(asdict(e)) + "\n" for e in examples)


def results_frame(form: str, seed: int, correct: dict[str, list[bool]]) -> pd.DataFrame:
    """One row: per split the rate, its count and its exact 95% interval."""
    row: dict[str, Any] = {"form": form, "seed": seed}
    for name in EVAL_SPLITS:
        hits = correct[name]
        interval = proportion_interval(sum(hits), len(hits))
        row.update({f"{name}_acc": interval.estimate, f"{name}_correct": sum(hits), f"{name}_n": len(hits),
                    f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high})
    return pd.DataFrame([row])


def summary_line(row: pd.Series) -> str:
    """The run's finding in one line: each split's count with its exact interval."""
    def rate(split: str) -> str:
        text = f"{row[f'{split}_correct']}/{row[f'{split}_n']}"
        if pd.isna(row[f"{split}_ci_low"]):
            return text + " (n too small for an interval)"
        return text + f" ({row[f'{split}_acc']:.0%} [{row[f'{split}_ci_low']:.0%}, {row[f'{split}_ci_high']:.0%}])"

    return (f"{row['form']}: forward facts {rate('forward')}, reversed questions never trained {rate('reverse')}, "
            f"shortcut (the queried name echoed) {rate('shortcut')}")


def reversal_sft(out: Path, options: ModelOptions, form: str, pairs: list[tuple[str, str]], config: SFTConfig, *,
                 seed: int, keep_checkpoints: bool = False) -> str:
    """Train and score one run (module docstring) and return its summary."""
    from bridgeprobe.probes.model.load import load_model

    check_couples(form, pairs)
    train, sets = training_set(form, pairs), eval_sets(form, pairs)
    atomic_write(out / "data" / "train.jsonl", _jsonl(train))
    atomic_write(out / "data" / "eval.jsonl", _jsonl([e for name in EVAL_SPLITS for e in sets[name]]))
    torch.manual_seed(seed)
    model, tokenizer = load_model(options.model, dtype=options.dtype, device=options.device)
    model.requires_grad_(True)
    encoded = [encode_chat(tokenizer, e.instruction, e.output, e.weight) for e in train]
    settings = {"model": options.model, "dtype": options.dtype, "form": form, "pairs": len(pairs), "seed": seed,
                "sft": asdict(config), "examples": len(train)}
    key = json.dumps(settings, sort_keys=True)
    metrics = IncrementalCSV(out, "metrics", ("step", "epoch", "lr", "train_loss",
                                               *(f"{name}_acc" for name in EVAL_SPLITS)), settings)
    done = metrics.done(["step"])
    total = config.steps(len(encoded))
    bar = tqdm(total=total, desc=f"reversal-sft {form}", unit="step")

    def on_eval(row: dict[str, float]) -> None:
        if (str(row["step"]),) not in done:
            correct = score(model, tokenizer, sets)
            metrics.append([{**row, **{f"{k}_acc": sum(v) / len(v) for k, v in correct.items()}}])

    started = time.perf_counter()
    resumed = train_chat(model, tokenizer, encoded, config, key=key, checkpoint=out / "checkpoints" / "state.pt",
                         on_eval=on_eval, progress=lambda step: bar.update(step - bar.n))
    bar.close()
    metrics.finish(sort_by=["step"])
    correct = score(model, tokenizer, sets)
    items = pd.DataFrame([{"split": name, "pair": e.pair, "question": e.instruction, "answer": e.answer,
                           "correct": hit} for name in EVAL_SPLITS for e, hit in zip(sets[name], correct[name])])
    atomic_write_csv(out / "items.csv", items)
    results = results_frame(form, seed, correct)
    atomic_write_csv(out / "results.csv", results)
    summary = summary_line(results.iloc[0])
    record = {"command": "reversal-sft", "settings": settings, "versions": versions(),
              "threads": torch.get_num_threads(), "train_s": round(time.perf_counter() - started, 1),
              "resumed_from": resumed, "results": results.to_dict("records")}
    write_finished(out, record, summary)
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary
