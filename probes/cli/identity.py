"""``bridgeprobe synth`` (synthetic two-hop knowledge), ``bridgeprobe reproduce`` (from-scratch identity-bridge
runs), ``identity-grid`` and ``scratch-analysis``: the flags, turned into the configs :mod:`probes.jobs.reproduce`
runs; and the synthetic-data flags, run directory and report-rebuilding helpers that :mod:`probes.cli.finetune`
shares."""

from __future__ import annotations

import argparse
import json
import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bridgeprobe.analyses.summaries import files_line
from bridgeprobe.probes.cli.common import (EPILOG, RUNS, check_options, fingerprint, fraction, non_negative_float,
                                           non_negative_int, positive_float, positive_int, rundir_args)
from bridgeprobe.probes.identity.data import REPRODUCE_PRESETS, write_synth
from bridgeprobe.probes.jobs.reproduce import GRID_FILES, reproduce, write_grid
from bridgeprobe.prompts.synthetic import IDENTITY_FORMS, OOD_KINDS, SynthConfig


# ------------------------------------------------------------------------------------------------ arguments


def data_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Synthetic-data flags; unset ones take the preset's (or SynthConfig's) value."""
    group = parser.add_argument_group("synthetic data (unset: the preset's value)")
    group.add_argument("--subjects", type=positive_int, help="|E1|, subject entities")
    group.add_argument("--bridges", type=positive_int, help="|E2|, bridge entities")
    group.add_argument("--objects", type=positive_int, help="|E3|, object entities")
    group.add_argument("--r1", type=positive_int, help="|R1|, relations E1 -> E2")
    group.add_argument("--r2", type=positive_int, help="|R2|, relations E2 -> E3")
    group.add_argument("--ood", choices=OOD_KINDS,
                       help="what the OOD two-hop queries hold out: bridge (default: queries through bridges that no "
                            "trained two-hop query goes through; their hop-2 facts are seen only as one-hop facts) or "
                            "relation_pair (relation pairs never composed in training)")
    group.add_argument("--ood-bridge-fraction", type=fraction,
                       help="bridge OOD: share of the bridges held out as OOD bridges (default 0.5)")
    group.add_argument("--identity-form", choices=IDENTITY_FORMS,
                       help="token-level identity examples: relation (default: e2 r_id -> e2) or zero_hop (the entity "
                            "alone, e2 -> e2)")
    group.add_argument("--ood-pair-fraction", type=fraction,
                       help="relation_pair OOD: share of (r1, r2) pairs never composed in training (default 0.25)")
    group.add_argument("--two-hop-train-fraction", type=fraction,
                       help="share of each in-distribution pair's two-hop queries that are trained")
    group.add_argument("--no-two-hop-training", action="store_true",
                       help="no two-hop training data at all: every two-hop query is out of distribution")
    group.add_argument("--identity-coverage", type=fraction,
                       help="share of the bridges that get an identity example, the dose (default 1: all; drawn at "
                            "random, OOD and in-distribution bridges in the same proportion)")


def data_config(args: argparse.Namespace, base: dict[str, Any], seed: int) -> SynthConfig:
    values = {**base, "seed": seed}
    for flag, field in (("subjects", "n_subjects"), ("bridges", "n_bridges"), ("objects", "n_objects"),
                        ("r1", "n_r1"), ("r2", "n_r2"), ("ood", "ood"), ("ood_bridge_fraction", "ood_bridge_fraction"),
                        ("identity_form", "identity_form"),
                        ("ood_pair_fraction", "ood_pair_fraction"),
                        ("two_hop_train_fraction", "two_hop_train_fraction"),
                        ("identity_coverage", "identity_coverage")):
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.no_two_hop_training:
        values["two_hop_training"] = False
    return SynthConfig(**values)


def register(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser("synth", help="generate synthetic two-hop knowledge and its splits -> DIR",
                           description="Generate a synthetic knowledge base (entities E1/E2/E3, relations R1/R2, "
                                       "atomic facts, two-hop queries, the identity task) and its splits. Writes "
                                       "DIR/synth.json (config, relation-pair split, sizes, names), DIR/examples.csv "
                                       "(every example with its split, token level), DIR/prompts.jsonl (the ID and "
                                       "OOD two-hop test queries in natural language, in the prompt-set schema: "
                                       "bridgeprobe lens --prompts DIR/prompts.jsonl runs on them) and "
                                       "DIR/train.jsonl (the natural-language training sentences).",
                           epilog=EPILOG)
    data_args(synth)
    synth.add_argument("--seed", type=non_negative_int, default=0, help="data seed (default 0)")
    synth.add_argument("--tokenizer-model",
                       help="give bridges and objects distinct first tokens, and counterfactual pairs equal lengths, "
                            "under this model's tokenizer (an embedded alias, directory or hub name)")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    rundir_args(synth)
    synth.set_defaults(handler=synth_job)

    reproduce = sub.add_parser(
        "reproduce", help="from-scratch identity-bridge runs: OOD two-hop accuracy with vs without identity",
        description="Train small models from scratch on token-level synthetic two-hop data, with and without the "
                    "identity task (same data, seed and steps), over seeds x init scales x weight decays x identity "
                    "repeats. Writes DIR/metrics.csv (per evaluated step), alignment.csv (hidden state of (e1, r1) "
                    "vs its bridge, per layer pair), weights.csv (nuclear norms, effective ranks), spectrum.csv "
                    "(final singular values), results.csv and comparison.md (final accuracies, mean and spread over "
                    "seeds), learning-curve PNGs, index.html and run.json; the splits of each seed under DIR/data/. "
                    "A killed run resumes from its last checkpoint when rerun with the same arguments.")
    reproduce.add_argument("--preset", choices=sorted(REPRODUCE_PRESETS), default="cpu",
                           help="named configuration (default cpu: about 12 min on 2 quiet CPU cores, up to about 25 under "
                                "load); flags override it")
    reproduce.add_argument("--model", choices=("gpt2", "emb_mlp"), help="GPT-2 from a GPT2Config, or the Emb-MLP")
    reproduce.add_argument("--seeds", type=non_negative_int, nargs="+",
                           help="seeds (data and init; default: the preset's, 0-4 for cpu)")
    reproduce.add_argument("--init-scales", type=positive_float, nargs="+",
                           help="init std multipliers (default: the preset's, 1.0)")
    reproduce.add_argument("--weight-decays", type=non_negative_float, nargs="+",
                           help="AdamW weight decays (default: the preset's, 1.0 for cpu and gpu)")
    reproduce.add_argument("--identity-repeats", type=positive_int, nargs="+",
                           help="copies of the identity examples in the identity condition's training set, the data "
                                "ratio (default: the preset's, 10 for cpu)")
    train = reproduce.add_argument_group("training (unset: the preset's value)")
    for flag, kind, text in (("--steps", positive_int, "optimizer steps"),
                             ("--batch-size", positive_int, "examples per step"),
                             ("--lr", positive_float, "AdamW learning rate"),
                             ("--layers", positive_int, "transformer blocks"), ("--d-model", positive_int, "width"),
                             ("--heads", positive_int, "attention heads"), ("--d-mlp", positive_int, "MLP width"),
                             ("--eval-every", positive_int, "steps between evaluations"),
                             ("--checkpoint-every", positive_int, "steps between checkpoints")):
        train.add_argument(flag, type=kind, help=text)
    tying = train.add_mutually_exclusive_group()
    tying.add_argument("--untied", action="store_true", help="a separate unembedding matrix")
    tying.add_argument("--tied", action="store_true", help="the unembedding is the embedding matrix transposed")
    train.add_argument("--no-residual", action="store_true",
                       help="emb_mlp: each hop's MLP output replaces the state instead of adding to it")
    data_args(reproduce)
    reproduce.add_argument("--out", type=Path, default=RUNS / "identity" / "reproduce",
                           help="output directory (default runs/identity/reproduce)")
    reproduce.add_argument("--device", default="cpu", help="cpu (default) or cuda on a GPU host")
    reproduce.add_argument("--keep-checkpoints", action="store_true", help="keep DIR/checkpoints after the runs finish")
    rundir_args(reproduce)
    reproduce.set_defaults(handler=reproduce_job)

    grid = sub.add_parser(
        "identity-grid", help="collect finished reproduce runs into one grid table",
        description="Read every finished `bridgeprobe reproduce` run under the given directories and write "
                    "OUT/grid.csv and OUT/grid.md: one row per grid cell (model, tied, residual, width, steps, data, "
                    "OOD notion, identity form, init scale, weight decay, identity repeat) with ID and OOD two-hop "
                    "accuracy per condition (mean over seeds), the OOD difference identity - no_identity with its t "
                    "interval over seeds, the seeds where identity is higher, the exact sign test and the one-sided "
                    "paired sign-flip test, and whether the cell meets the paper's claim (ID >= 0.9 in both, OOD "
                    "without identity within 0.05 of chance, OOD with identity >= 0.5, identity higher in every one "
                    "of >= 5 seeds).", epilog=EPILOG)
    grid.add_argument("runs", type=Path, nargs="+", help="reproduce run directories, or directories holding them")
    grid.add_argument("--out", type=Path, required=True, help="directory for grid.csv and grid.md")
    grid.set_defaults(handler=grid_job)

    analysis = sub.add_parser(
        "scratch-analysis", help="identity dose and the paper's cross-prompt patch on trained from-scratch models",
        description="Rebuild every model of finished `bridgeprobe reproduce` runs from their kept final checkpoints "
                    "(run them with --keep-checkpoints) and measure two things, identity vs no identity with the "
                    "seed as the unit. (1) The dose: each OOD two-hop query answered, split by whether its bridge "
                    "had an identity example (reproduce --identity-coverage F), so accuracy through covered vs "
                    "uncovered bridges is a contrast within one model; the no-identity models carry the same draw "
                    "as a placebo. (2) Sec. 4.1 of the paper: the hidden state at r1 of (a, r1) after source layer "
                    "s written into the bridge position of (b', r2) at target layer t; how often the model then "
                    "answers hop 2 of a's bridge (transfer) or still of b' (own), among items whose three facts it "
                    "knows (GPT-2 only; the Emb-MLP's hop 2 reads only the hop-1 state, so there the patch is the "
                    "two-hop query itself). Writes OUT/ood_items.csv, crosspatch.csv, coverage.csv, "
                    "crosspatch_summary.csv, analysis.md and run.json.", epilog=EPILOG)
    analysis.add_argument("runs", type=Path, nargs="+", help="finished reproduce run directories")
    analysis.add_argument("--items", type=positive_int, default=400,
                          help="queries per split for the patch (a fixed random subset; default 400)")
    analysis.add_argument("--out", type=Path, required=True, help="output directory")
    rundir_args(analysis)
    analysis.set_defaults(handler=scratch_analysis_job)


RUN_FLAGS = ("out", "overwrite", "recompute", "handler", "command", "verbose", "debug", "keep_checkpoints", "seed")
# options added after runs were recorded: absent from a fingerprint while unset, so those runs still resume
LATER_OPTIONS = ("identity_coverage",)
MODEL_FLAGS = ("model", "dtype", "quantize", "device", "device_map", "max_memory", "backend", "trust_remote_code",
               "offline", "adapter")


def run_directory_of(args: argparse.Namespace) -> Any:
    """Lock ``args.out`` for this command with a fingerprint of all its options (:mod:`probes.runs.rundir`)."""
    from bridgeprobe.probes.runs.rundir import run_directory

    check_options(args)
    model_flags = MODEL_FLAGS if hasattr(args, "backend") else ()  # the fingerprint has the model flags already
    options = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS and k not in model_flags
               and not (k in LATER_OPTIONS and v is None)}
    return run_directory(args.out, fingerprint(args, args.command, **options), overwrite=args.overwrite,
                         recompute=args.recompute)


@contextmanager
def finished_report(args: argparse.Namespace, command: str) -> Iterator[None]:
    """Around a job: when its directory holds this run finished (``RunComplete``, exit 0) but report files are
    missing (deleted, or a run killed after its finished mark by an earlier bridgeprobe), rebuild them from the
    run's tables under the lock, without training; the run is still complete."""
    from bridgeprobe.probes.jobs.reproduce import missing_report, rebuild_report
    from bridgeprobe.probes.runs.rundir import RunComplete, RunDirectory

    try:
        yield
    except RunComplete:
        missing = missing_report(args.out, command)
        if not missing:
            raise
        print(f"{args.out}: the run is finished but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
              "missing; rebuilding the report from its tables (no training)")
        with RunDirectory.locked(args.out):
            rebuild_report(args.out, command)


def synth_job(args: argparse.Namespace) -> Path:
    """Generate, check and save the data, its natural-language prompt set and training sentences."""
    with run_directory_of(args) as run:
        _synth(args, run)
    return args.out


def _synth(args: argparse.Namespace, run: Any) -> None:
    tokenizer = None
    if args.tokenizer_model:
        from transformers import AutoTokenizer

        from bridgeprobe.probes.model.load import resolve

        tokenizer = AutoTokenizer.from_pretrained(resolve(args.tokenizer_model))
    splits = write_synth(data_config(args, {}, args.seed), args.out, tokenizer)
    sizes = ", ".join(f"{k} {v}" for k, v in splits.summary()["sizes"].items())
    summary = "\n".join([f"Synthetic two-hop data, seed {args.seed}: {sizes} examples.",
                         (f"OOD bridges (never a latent bridge in training): {', '.join(splits.ood_bridges)}."
                          if splits.config.ood == "bridge" else
                          f"Relation pairs never composed in training (OOD): {splits.ood_pairs}."),
                         files_line(args.out, ("synth.json", "examples.csv", "prompts.jsonl", "train.jsonl"))])
    run.finish({"command": "synth", "settings": splits.summary()}, summary)
    print(summary)


def _train_config(args: argparse.Namespace, preset: dict[str, Any]) -> Any:
    from bridgeprobe.probes.identity.scratch import TrainConfig

    values = dict(preset)
    for flag, field in (("model", "model"), ("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                        ("layers", "n_layer"), ("d_model", "d_model"), ("heads", "n_head"), ("d_mlp", "d_mlp"),
                        ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.untied or args.tied:
        values["tie_embeddings"] = args.tied
    if args.no_residual:
        values["residual"] = False
    return TrainConfig(**values)


def reproduce_job(args: argparse.Namespace) -> Path:
    """The preset and flags as a training config, data configs per seed and the grid, run by
    :func:`probes.jobs.reproduce.reproduce`."""
    preset = REPRODUCE_PRESETS[args.preset]
    base = _train_config(args, preset["train"])
    grid = list(itertools.product(args.init_scales or [base.init_scale], args.weight_decays or [base.weight_decay],
                                  args.identity_repeats or [base.identity_repeat]))
    data = {seed: data_config(args, preset["data"], seed) for seed in args.seeds or preset["seeds"]}
    with finished_report(args, "reproduce"), run_directory_of(args):
        return reproduce(args.out, base, data, grid, preset=args.preset, device=args.device,
                         keep_checkpoints=args.keep_checkpoints)
    return args.out  # finished before; its missing report files rebuilt


def grid_job(args: argparse.Namespace) -> Path:
    """Collect the runs (:func:`probes.jobs.reproduce.write_grid`) and print the cells that meet the claim, if any."""
    table = write_grid(args.runs, args.out)
    met = int(table["claim met"].sum())
    best = table.iloc[0]
    print(f"{len(table)} grid cells; {met} meet the claim. Largest OOD gain: {best['ood_two_hop_acc delta mean']:+.3f} "
          f"(OOD {best['ood_two_hop_acc no_identity mean']:.2f} -> {best['ood_two_hop_acc identity mean']:.2f}, "
          f"{best['ood_two_hop_acc identity higher']} seeds)")
    print(files_line(args.out, GRID_FILES))
    return args.out


def scratch_analysis_job(args: argparse.Namespace) -> Path:
    """Check the runs (before any model is built), lock OUT with a fingerprint of their records, run
    :func:`probes.identity.scratch_analysis.analyse_run` on each and write the tables of :mod:`analyses.scratch_report`."""
    import pandas as pd
    from tqdm.auto import tqdm

    from bridgeprobe.analyses import scratch_report as report
    from bridgeprobe.probes.jobs.reproduce import reproduce_runs
    from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv
    from bridgeprobe.probes.runs.rundir import RunDirError, file_sha256, run_directory
    from bridgeprobe.probes.identity.scratch_analysis import analyse_run

    empty = [str(path) for path in args.runs if not reproduce_runs([path])]
    if empty:
        raise RunDirError(f"no finished reproduce run in {', '.join(empty)}")
    runs = list(dict.fromkeys(reproduce_runs(args.runs)))
    for run in runs:
        if not (run / "checkpoints").is_dir():
            raise RunDirError(f"{run}/checkpoints is missing: rerun its reproduce command with --keep-checkpoints")
    found = fingerprint(args, args.command, runs={str(r): file_sha256(r / "run.json") for r in runs},
                        items=args.items)
    with run_directory(args.out, found, overwrite=args.overwrite, recompute=args.recompute) as directory:
        tables = [analyse_run(run, args.items) for run in tqdm(runs, desc="scratch-analysis", unit="run dir")]
        items = pd.concat([t[0] for t in tables], ignore_index=True)
        patch = pd.concat([t[1] for t in tables], ignore_index=True)
        coverage, patch_summary = report.coverage_table(items), report.patch_table(patch)
        layers = {json.loads((r / "run.json").read_text())["settings"]["train"]["n_layer"] for r in runs}
        findings = report.finding_lines(coverage, patch_summary, layers.pop() if len(layers) == 1 else None)
        atomic_write_csv(args.out / "ood_items.csv", items)
        atomic_write_csv(args.out / "crosspatch.csv", patch)
        atomic_write_csv(args.out / "coverage.csv", coverage)
        atomic_write_csv(args.out / "crosspatch_summary.csv", patch_summary)
        atomic_write(args.out / "analysis.md", "\n\n".join([
            "# Identity dose and cross-prompt patch\n\n" + "\n".join(f"- {line}" for line in findings),
            "## OOD accuracy through covered and uncovered bridges\n\n" + report.coverage_markdown(coverage),
            "## Cross-prompt patch (Sec. 4.1)\n\n" + report.patch_markdown(patch_summary)]) + "\n")
        names = ("analysis.md", "ood_items.csv", "crosspatch.csv", "coverage.csv", "crosspatch_summary.csv",
                 "run.json")
        summary = "\n".join(findings + [files_line(args.out, names, check=False)])
        directory.finish({"command": "scratch-analysis", "runs": [str(r) for r in runs], "items": args.items},
                         summary)
    print(summary)
    return args.out
