"""``bridgeprobe fidelity``: what quantization (or a lower dtype) costs the probe results of a model."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
from pathlib import Path

import pandas as pd
import torch

from bridgeprobe.analyses.summaries import files_line
from bridgeprobe.probes.runs.checks import check_context_length
from bridgeprobe.probes.cli.common import (EPILOG, check_options, fingerprint, load_items, model_args, model_options,
                                           positive_int, non_negative_int, prompt_args, prompt_settings, rundir_args)
from bridgeprobe.probes.runs.fidelity import COLUMNS, compare_lens, compare_patching, summary
from bridgeprobe.probes.model.hooks import SITES
from bridgeprobe.probes.model.load import DTYPES
from bridgeprobe.probes.runs.pipeline import ModelOptions, Timer, item_pairs, run_lens, run_patching, run_record
from bridgeprobe.probes.io.results import atomic_write_csv, atomic_write_json
from bridgeprobe.probes.runs.rundir import RunDirectory, run_directory
from bridgeprobe.prompts.sampling import sample_pairs
from bridgeprobe.prompts.schema import PromptItem

VARIANTS = ("8bit", "4bit", *sorted(DTYPES))


def register(sub: argparse._SubParsersAction) -> None:
    fidelity = sub.add_parser(
        "fidelity", help="how far 8-bit / 4-bit (or another dtype) moves lens ranks and patching values",
        description="Run the logit lens on the same prompts, and exact patching on the first --patch-pairs pairs, "
                    "with the model in the reference dtype (--dtype) and in each --compare variant (bitsandbytes "
                    "8bit / 4bit nf4 with --dtype compute, or another dtype), then compare them row for row: Spearman "
                    "correlation of ranks, Pearson and Spearman correlation of recoveries, max and mean absolute "
                    "differences, top-1 / top-10 / peak-layer / top-cell agreement. Writes DIR/fidelity.csv (long: variant, probe, site, layer, "
                    "statistic, value), DIR/fidelity.json (overall figures per variant), each run's tables under "
                    "DIR/<variant>/ (resumable) and DIR/run.json (per-variant load and probe times, weight bytes).",
        epilog=EPILOG)
    model_args(fidelity, None)
    prompt_args(fidelity, "curated")
    fidelity.add_argument("--out", required=True, type=Path, help="output directory")
    fidelity.add_argument("--compare", nargs="+", choices=VARIANTS, default=["8bit", "4bit"],
                          help="variants compared with the reference --dtype (default: 8bit 4bit)")
    fidelity.add_argument("--patch-pairs", type=non_negative_int, default=4,
                          help="pairs for the patching comparison (default 4; 0 skips it)")
    fidelity.add_argument("--site", default="resid_pre",
                          help=f"comma-separated patching sites among {', '.join(SITES)} (default resid_pre)")
    fidelity.add_argument("--batch-size", type=positive_int, help="lens queries per forward pass (default: from free memory)")
    fidelity.add_argument("--seed", type=non_negative_int, default=0,
                          help="random seed recorded in run.json (default 0)")
    rundir_args(fidelity)
    fidelity.set_defaults(handler=fidelity_job)


def fidelity_job(args: argparse.Namespace) -> Path:
    """Probe the reference and every variant (one model in memory at a time), compare, write the tables."""
    torch.manual_seed(args.seed)
    if args.quantize:
        raise ValueError("fidelity compares quantizations itself: pass --compare 8bit 4bit, not --quantize")
    sites = [s.strip() for s in args.site.split(",") if s.strip()]
    if not sites or any(s not in SITES for s in sites):
        raise ValueError(f"--site must be among {', '.join(SITES)}, got {args.site!r}")
    if args.patch_pairs < 0:
        raise ValueError(f"--patch-pairs must be 0 (skip) or more, got {args.patch_pairs}")
    check_options(args)
    reference = model_options(args)
    if args.dtype in args.compare:
        raise ValueError(f"--compare {args.dtype} is the reference dtype itself")
    items = load_items(args, limit=args.limit)
    if args.patch_pairs and not any(item.pair for item in items):
        raise ValueError("no item has a 'pair' partner for the patching comparison; pass --patch-pairs 0")
    probe = {"compare": args.compare, "patch_pairs": args.patch_pairs, "sites": sites, "batch_size": args.batch_size}
    with run_directory(args.out, fingerprint(args, "fidelity", **probe), overwrite=args.overwrite,
                       recompute=args.recompute) as run:
        return _fidelity_run(args, items, sites, reference, run)


def _fidelity_run(args: argparse.Namespace, items: list[PromptItem], sites: list[str], reference: ModelOptions,
                  run: RunDirectory) -> Path:
    settings = {**prompt_settings(args), "reference": args.dtype, "compare": args.compare,
                "patch_pairs": args.patch_pairs, "sites": sites, "batch_size": args.batch_size, "seed": args.seed}
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())  # its int8 matmul warns every call
    timer = Timer()
    runs: dict[str, tuple[pd.DataFrame | None, pd.DataFrame | None]] = {}
    loads: dict[str, dict] = {}
    for label in (args.dtype, *args.compare):
        options = _variant(reference, label)
        hooked = None
        gc.collect()  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with timer.section(f"{label}_load_s"):
            hooked = options.load()
        check_context_length(hooked.model, hooked.tokenizer, items)
        loads[label] = {"dtype": options.dtype, "quantize": options.quantize,
                        "weight_bytes": int(hooked.model.get_memory_footprint())}
        tag = {**run.fingerprint, "variant": label}
        with timer.section(f"{label}_lens_s"):
            lens = run_lens(hooked, items, args.out / label, batch_size=args.batch_size, settings=tag)
        patching = None
        if args.patch_pairs:
            pairs, _ = item_pairs(items, hooked.tokenizer, skip_unequal=True)
            pairs = sample_pairs(pairs, items, args.patch_pairs, args.sample, args.seed)
            with timer.section(f"{label}_patching_s"):
                patching = run_patching(hooked, pairs, args.out / label, sites=sites,
                                        method="exact", direction="denoise", settings=tag).frame
        if torch.cuda.is_available():
            loads[label]["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        runs[label] = (lens.frame, patching)
    if runs[args.dtype][0] is None:  # another process of a data-parallel run: rank 0 writes the outputs
        return args.out
    rows = []
    ref_lens, ref_patching = runs[args.dtype]
    for label in args.compare:
        lens_frame, patching_frame = runs[label]
        rows += [{"variant": label, **row} for row in compare_lens(ref_lens, lens_frame)]
        if ref_patching is not None:
            rows += [{"variant": label, **row} for row in compare_patching(ref_patching, patching_frame)]
    table = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"layer": "Int64"})
    atomic_write_csv(args.out / "fidelity.csv", table)
    overall = summary(table)
    atomic_write_json(args.out / "fidelity.json", {"reference": args.dtype, "variants": overall})
    record = run_record("fidelity", hooked, reference, settings, timer, {"variants": loads})
    lines = [f"{args.model}: {len(items)} items, {', '.join(args.compare)} against {args.dtype}"
             + (f", exact patching on {args.patch_pairs} pairs." if args.patch_pairs else ".")]
    for label, probes in overall.items():
        lens = probes["lens"]
        line = (f"{label} vs {args.dtype}: lens rank Spearman {lens['rank_spearman']:.4f}, max |d logprob| "
                f"{lens['logprob_max_abs_diff']:.3g}, top-1 agreement {lens['top1_agreement']:.1%}")
        if "patching" in probes:
            patch = probes["patching"]
            line += (f"; patching Pearson {patch['value_pearson']:.4f}, max |d value| "
                     f"{patch['value_max_abs_diff']:.3g}, top cell agreement {patch['top_cell_agreement']:.1%}")
        lines.append(line)
    lines.append(files_line(args.out, ("fidelity.csv", "fidelity.json", "run.json", *args.compare)))
    run.finish(record, "\n".join(lines))
    print("\n".join(lines))
    return args.out


def _variant(reference: ModelOptions, label: str) -> ModelOptions:
    """The model options of a variant: a bitsandbytes quantization (compute in the reference dtype) or a dtype."""
    if label in ("8bit", "4bit"):
        return dataclasses.replace(reference, quantize=label)
    return dataclasses.replace(reference, dtype=label)


class _Once(logging.Filter):
    """Let each distinct log message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True
