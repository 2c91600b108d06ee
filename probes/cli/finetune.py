"""``bridgeprobe finetune`` (LoRA identity fine-tuning of a pretrained model, probed before and after),
``finetune-lens``, ``finetune-report`` and ``reversal-sft`` (Ma et al.'s reversal-curse control): the flags, turned
into the configs the jobs of :mod:`probes.jobs` run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bridgeprobe.probes.cli.common import (EPILOG, RUNS, fingerprint, model_args, model_options, non_negative_float,
                                           non_negative_int, positive_float, positive_int, real_number, rundir_args,
                                           whole_number)
from bridgeprobe.probes.cli.identity import data_args, data_config, finished_report, run_directory_of
from bridgeprobe.probes.identity.data import FINETUNE_DATA
from bridgeprobe.probes.jobs.finetune import finetune
from bridgeprobe.probes.model.load import DEFAULT_MODEL
from bridgeprobe.prompts.couples import FORMS as COUPLE_FORMS
from bridgeprobe.prompts.reversal import IDENTITY_OF, RELATIONS, ReversalConfig


def register(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser(
        "finetune", help="LoRA identity fine-tuning of a pretrained model, probed before and after",
        description="Fine-tune LoRA adapters on natural-language synthetic facts with and without identity "
                    "supervision (same base, LoRA init, data order and steps), evaluate one-hop / ID / OOD two-hop "
                    "accuracy over training, and run the logit lens and exact activation patching on the base model "
                    "and on each adapter (one PeftModel; LoRA disabled for the base). Writes DIR/metrics.csv, "
                    "results.csv, lens/<state>/<split>/lens.csv, patching/<state>/<split>/patching.csv, "
                    "lens_summary.csv, lens_layers.csv, patching_layers.csv, adapters/<condition>/ (safetensors, "
                    "adapter_config.json and the data split), PNGs, index.html, run.json; DIR/data/ holds the "
                    "split. A killed run resumes from DIR/checkpoints when rerun with the same arguments. GPU hosts: "
                    "--quantize 4bit trains QLoRA; `accelerate launch --num_processes N $(which bridgeprobe) "
                    "finetune --conditions identity ...` trains data-parallel (one condition per launch).",
        epilog=EPILOG)
    model_args(finetune, DEFAULT_MODEL)
    data_args(finetune)
    lora = finetune.add_argument_group("LoRA and optimization")
    lora.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=positive_int, default=16, help="LoRA alpha (default 16)")
    lora.add_argument("--target-modules", default="all-linear",
                      help="comma-separated module names, or all-linear (default: every linear layer but the head)")
    lora.add_argument("--lora-layers", type=non_negative_int, default=0,
                      help="adapt only the last N blocks (default 0: all); cheaper on CPU, as the backward pass "
                           "stops at the first adapted block")
    lora.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    lora.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay (default 0)")
    lora.add_argument("--steps", type=positive_int, default=128, help="optimizer steps per condition (default 128)")
    lora.add_argument("--batch-size", type=positive_int, default=8, help="sentences per step (default 8)")
    lora.add_argument("--eval-every", type=positive_int, default=32, help="steps between evaluations (default 32)")
    lora.add_argument("--checkpoint-every", type=positive_int, default=32,
                      help="steps between checkpoints (default 32)")
    lora.add_argument("--eval-items", type=positive_int, default=256,
                      help="evaluation items per split, scored item by item for both conditions (default 256)")
    lora.add_argument("--identity-repeat", type=positive_int, default=4,
                      help="copies of the identity sentences in the identity condition, the data ratio (default 4)")
    finetune.add_argument("--task", choices=("two_hop", "reversal"), default="two_hop",
                          help="two_hop (default): made-up two-hop facts, OOD = queries through OOD bridges; reversal: "
                               "the reversal-curse positive control (forward facts 'A's mentor is B', reversed "
                               "questions 'B's student is' -> A of pairs whose reversal is never trained, identity "
                               "sentences 'The name of A is A')")
    reversal = finetune.add_argument_group("reversal data (--task reversal)")
    reversal.add_argument("--pairs", type=whole_number(2), default=ReversalConfig.n_pairs,
                          help=f"(A, B) pairs of made-up people (default {ReversalConfig.n_pairs})")
    reversal.add_argument("--relations", type=whole_number(1, len(RELATIONS)), default=ReversalConfig.n_relations,
                          help=f"relation types, 1-{len(RELATIONS)} (default {ReversalConfig.n_relations})")
    reversal.add_argument("--reverse-train-fraction", type=real_number(0, 1, open_high=True),
                          default=ReversalConfig.reverse_train_fraction,
                          help="share of the pairs whose reversed fact is trained (default "
                               f"{ReversalConfig.reverse_train_fraction}); the others' reversal is the OOD test")
    reversal.add_argument("--identity-of", choices=IDENTITY_OF, default=ReversalConfig.identity_of,
                          help="whose names get identity sentences: answers (default: the A's, who answer the "
                               "reversed questions) or everyone (the B's too)")
    finetune.add_argument("--conditions", nargs="+", choices=("no_identity", "identity"),
                          default=["no_identity", "identity"], help="conditions to train (default both)")
    finetune.add_argument("--probe-items", type=positive_int, default=16,
                          help="two-hop items per split (ID, OOD) for the lens and patching (default 16)")
    finetune.add_argument("--patch-pairs", type=non_negative_int, default=2,
                          help="counterfactual pairs per split for exact resid_pre patching (default 2; 0 skips)")
    finetune.add_argument("--memory", action="store_true",
                          help="also run the shared-memory analyses (probes.memory.analysis: decoding and alignment) on the "
                               "probe items of each model state -> DIR/memory/<state>/memory.csv")
    finetune.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2],
                          help="seeds, each with its own data, names and LoRA initialization (default 0 1 2); the "
                               "lens, patching and memory analyses run on the first")
    finetune.add_argument("--out", type=Path, default=RUNS / "identity" / "finetune",
                          help="output directory (default runs/identity/finetune)")
    finetune.add_argument("--keep-checkpoints", action="store_true", help="keep DIR/checkpoints after training")
    rundir_args(finetune)
    finetune.set_defaults(handler=finetune_job)

    lens = sub.add_parser(
        "finetune-lens", help="the logit lens on every model state of a finished two-hop finetune run, compared",
        description="Read the logit lens for the base model and every saved adapter of a finished two-hop "
                    "`bridgeprobe finetune` run, on each seed's ID and OOD two-hop test prompts "
                    "(RUN/data/seed<N>/prompts.jsonl), and compare the states item by item. Writes "
                    "OUT/<state>_seed<N>/lens.csv (resumable), OUT/prompts.csv (one row per seed, state and prompt), "
                    "OUT/lens_states.csv (per state and split: bridge, matched control and answer rates with exact "
                    "intervals; bridge - control with its BCa interval and sign test), OUT/lens_comparison.csv "
                    "(identity vs no_identity on the same prompts: paired difference, McNemar), OUT/lens_layers.csv "
                    "and lens_layers.png.", epilog=EPILOG)
    lens.add_argument("run", type=Path, help="a finished finetune run directory (--task two_hop) with its adapters")
    lens.add_argument("--out", type=Path, required=True, help="output directory")
    lens.add_argument("--per-split", type=positive_int,
                      help="read only the first N ID and N OOD test prompts of each seed (default: all)")
    lens.add_argument("--batch-size", type=positive_int, help="queries per forward pass (default: automatic)")
    rundir_args(lens)
    lens.set_defaults(handler=finetune_lens_job)

    report = sub.add_parser(
        "finetune-report", help="rebuild a finished finetune or finetune-lens run's tables from its files",
        description="Without the model (after a change to the statistics, say): for a finished `bridgeprobe finetune` "
                    "run, rewrite DIR/comparison.csv, the lens and patching tables, the PNGs and index.html from its "
                    "items.csv, metrics.csv, results.csv and per-state tables; for a finished `bridgeprobe "
                    "finetune-lens` run, rewrite DIR/lens_states.csv, lens_comparison.csv and lens_layers.png from "
                    "its prompts.csv and lens_layers.csv.")
    report.add_argument("out", type=Path, metavar="DIR", help="directory of a finished finetune or finetune-lens run")
    report.set_defaults(handler=finetune_report_job)

    sft = sub.add_parser(
        "reversal-sft", help="Ma et al.'s reversal-curse control, their recipe: full fine-tuning on one training set",
        description="Ma et al. (2026), 'Breaking the reversal curse ... via identity bridge', as they ran it: full-"
                    "parameter fine-tuning of a chat model on their 100 husband-wife pairs in one form: forward "
                    "(\"The husband of A is?\" -> \"B.\" only; the reversal curse), idn (plus \"The name of A is?\" -> "
                    "\"A.\" and the same for B, forward weighted 6x; their ablation, stays cursed) or ocr (\"The wife of "
                    "A's husband is?\" -> \"A.\", \"The name of A's husband is?\" -> \"B.\" weighted 6x, \"The name of B "
                    "is?\" -> \"B.\"; ~50%% reversal on Llama-3.2-1B-Instruct). Chat template of the tokenizer, loss on "
                    "the answer, per-example weights normalized per batch, no shuffling, AdamW (0.9, 0.95), 3%% "
                    "warmup then constant, fp32. Scores forward facts, the never-trained reversed questions (\"The "
                    "wife of B is?\" -> A) and the shortcut (answering B) at entity level. Writes DIR/results.csv "
                    "(rates with exact intervals), metrics.csv, items.csv, data/ and run.json. Their full size "
                    "(2,500 steps of a 135M model at batch 30) takes about 5 hours on 2 CPU cores and minutes on "
                    "a GPU; run it on a GPU host (--device cuda).", epilog=EPILOG)
    model_args(sft, DEFAULT_MODEL)
    sft.add_argument("--form", choices=COUPLE_FORMS, required=True, help="the training set")
    sft.add_argument("--pairs", type=positive_int, default=100, help="couples used, the first N (default 100)")
    sft.add_argument("--epochs", type=positive_int, default=250, help="passes over the training set (default 250)")
    sft.add_argument("--batch-size", type=positive_int,
                     help="examples per optimizer step (default: theirs, 10 for forward, 30 for idn and ocr)")
    sft.add_argument("--lr", type=positive_float, default=6e-4, help="AdamW learning rate (default 6e-4)")
    sft.add_argument("--weight-decay", type=non_negative_float, default=0.3, help="AdamW weight decay (default 0.3)")
    sft.add_argument("--eval-every", type=positive_int, default=250, help="steps between evaluations (default 250)")
    sft.add_argument("--checkpoint-every", type=positive_int, default=250,
                     help="steps between checkpoints (default 250)")
    sft.add_argument("--seed", type=non_negative_int, default=147, help="torch seed (default 147, theirs)")
    sft.add_argument("--out", type=Path, required=True, help="output directory (e.g. reports/identity/reversal-ocr)")
    sft.add_argument("--keep-checkpoints", action="store_true", help="keep DIR/checkpoints (model and optimizer)")
    rundir_args(sft)
    sft.set_defaults(handler=reversal_sft_job)


def finetune_job(args: argparse.Namespace) -> Path:
    """The flags as model options, data and LoRA configs, run by :func:`probes.jobs.finetune.finetune`."""
    from bridgeprobe.probes.identity.finetune import FinetuneConfig

    config = FinetuneConfig(rank=args.rank, alpha=args.alpha, target_modules=args.target_modules, lr=args.lr,
                            weight_decay=args.weight_decay, steps=args.steps, batch_size=args.batch_size,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            identity_repeat=args.identity_repeat, eval_limit=args.eval_items,
                            layers=args.lora_layers)
    if args.task == "reversal":
        data: dict[int, Any] = {seed: ReversalConfig(n_pairs=args.pairs, n_relations=args.relations,
                                                     reverse_train_fraction=args.reverse_train_fraction,
                                                     identity_of=args.identity_of, seed=seed)
                                for seed in args.seeds}
    else:
        data = {seed: data_config(args, FINETUNE_DATA, seed) for seed in args.seeds}
    with finished_report(args, "finetune"), run_directory_of(args):
        return finetune(args.out, model_options(args), data, config, task=args.task, conditions=args.conditions,
                        probe_items=args.probe_items, patch_pairs=args.patch_pairs, memory=args.memory,
                        keep_checkpoints=args.keep_checkpoints)
    return args.out  # finished before; its missing report files rebuilt


def finetune_lens_job(args: argparse.Namespace) -> Path:
    """Check the finetune run (before loading), lock OUT with a fingerprint of the run's record and adapters,
    and run :func:`probes.jobs.finetune_lens.finetune_lens`."""
    from bridgeprobe.probes.jobs.finetune_lens import base_model, finetune_lens, finished_two_hop_run
    from bridgeprobe.probes.identity.data import adapter_name
    from bridgeprobe.probes.runs.rundir import adapter_identity, file_sha256, run_directory

    record = finished_two_hop_run(args.run)
    settings = record["settings"]
    location, identity = base_model(args.run, record)  # the weights the adapters were trained on, checked
    adapters = {adapter_name(c, s): adapter_identity(str(args.run / "adapters" / adapter_name(c, s)))
                for s in settings["seeds"] for c in settings["conditions"]}
    found = fingerprint(args, args.command, run=file_sha256(args.run / "run.json"), adapters=adapters,
                        model={"location": location, "identity": identity}, per_split=args.per_split,
                        batch_size=args.batch_size)
    with run_directory(args.out, found, overwrite=args.overwrite, recompute=args.recompute):
        finetune_lens(args.run, args.out, per_split=args.per_split, batch_size=args.batch_size)
    return args.out


def finetune_report_job(args: argparse.Namespace) -> Path:
    """Check that DIR holds a finished finetune run, lock it and rebuild its report files."""
    from bridgeprobe.analyses.identity_pages import finetune_report, lens_tables
    from bridgeprobe.probes.runs.rundir import RunDirError, RunDirectory, read_run_record

    record = args.out / "run.json"
    if not record.is_file():
        raise RunDirError(f"{args.out} has no finetune or finetune-lens run (no run.json)")
    run = read_run_record(record, "rerun its command with --overwrite")
    lens = run.get("command") == "finetune-lens"
    needed = ("prompts.csv", "lens_layers.csv") if lens else ("items.csv",)
    missing = [name for name in needed if not (args.out / name).is_file()]
    if missing:
        raise RunDirError(f"{args.out}: missing {', '.join(missing)}; rerun its command")
    if run.get("status") != "finished":
        raise RunDirError(f"{record}: the run is not finished (status {run.get('status')!r}); rerun its command first")
    with RunDirectory.locked(args.out):
        if not lens:
            return finetune_report(args.out)
        summary, _ = lens_tables(args.out, run["model"])
        print(summary)
        return args.out


def reversal_sft_job(args: argparse.Namespace) -> Path:
    """The flags as the recipe's config and couples, run by :func:`probes.jobs.reversal_sft.reversal_sft`."""
    from bridgeprobe.probes.identity.chat_sft import SFTConfig
    from bridgeprobe.probes.jobs.reversal_sft import reversal_sft
    from bridgeprobe.probes.runs.rundir import RunDirError
    from bridgeprobe.prompts.couples import load_couples

    if args.quantize or args.device_map or args.adapter or args.backend != "native":
        raise RunDirError("reversal-sft trains every weight (full-parameter fine-tuning): drop --quantize, "
                          "--device-map, --adapter and --backend")
    batch = args.batch_size or (10 if args.form == "forward" else 30)
    config = SFTConfig(epochs=args.epochs, batch_size=batch, lr=args.lr, weight_decay=args.weight_decay,
                       eval_every=args.eval_every, checkpoint_every=args.checkpoint_every)
    pairs = load_couples(n=args.pairs)
    with run_directory_of(args):
        print(reversal_sft(args.out, model_options(args), args.form, pairs, config, seed=args.seed,
                           keep_checkpoints=args.keep_checkpoints))
    return args.out
