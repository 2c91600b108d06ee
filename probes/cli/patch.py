"""``bridgeprobe patch``: activation patching over clean/corrupted pairs of two-hop prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bridgeprobe.analyses.summaries import PATCH_FILES, files_line, patching_lines
from bridgeprobe.probes.runs.checks import check_context_length
from bridgeprobe.probes.cli.common import (EPILOG, check_options, fingerprint, load_items, model_args, model_options,
                                           prompt_args, non_negative_int, prompt_settings, rundir_args)
from bridgeprobe.probes.model.hooks import SITES
from bridgeprobe.probes.readouts.patching import HEAD
from bridgeprobe.probes.runs.pipeline import ModelOptions, Timer, item_pairs, run_patching, run_record
from bridgeprobe.probes.runs.rundir import RunDirectory, prompt_identity, run_directory
from bridgeprobe.prompts.sampling import sample_pairs
from bridgeprobe.prompts.schema import PromptItem


def register(sub: argparse._SubParsersAction) -> None:
    patch = sub.add_parser("patch", help="activation patching over clean/corrupted pairs -> DIR/patching.csv",
                           description="Activation patching on pairs of two-hop prompts: each item (clean) against "
                                       "its 'pair' partner (corrupted), or line by line against --corrupt-prompts. "
                                       "Metric: logit(clean answer) - logit(corrupted answer) at the last token; "
                                       "value: its normalized recovery. Writes DIR/patching.csv (long format), "
                                       "patching_cells.csv and patching_layers.csv (mean and 95% CI over pairs), "
                                       "heatmaps and DIR/run.json.",
                           epilog=EPILOG)
    model_args(patch, None)
    prompt_args(patch, None)
    patch.add_argument("--corrupt-prompts", nargs="+", help="corrupted items, paired line by line with --prompts")
    patch.add_argument("--out", required=True, type=Path, help="output directory")
    patch.add_argument("--site", default="resid_pre",
                       help="comma-separated: resid_pre, resid_post, attn_out, mlp_out, head (default resid_pre)")
    patch.add_argument("--method", choices=("exact", "attribution"), default="exact",
                       help="exact patching (fast sweep) or its first-order attribution estimate")
    patch.add_argument("--direction", choices=("denoise", "noise"), default="denoise",
                       help="denoise: clean into corrupted (default); noise: corrupted into clean")
    patch.add_argument("--skip-unequal", action="store_true", help="skip pairs of unequal token length")
    patch.add_argument("--bridge-rank", action="store_true",
                       help="also write DIR/patching_bridge.csv: the clean bridge's logit-lens rank at the last token, "
                            "at every layer from the patched one on, after each patch (read in the same sweep; "
                            "exact patching only)")
    patch.add_argument("--seed", type=non_negative_int, default=0, help="random seed recorded in run.json (default 0)")
    rundir_args(patch)
    patch.set_defaults(handler=patch_job)


def patch_job(args: argparse.Namespace) -> Path:
    """Check the options and prompts, lock the output directory (:mod:`probes.runs.rundir`), load, build pairs, sweep
    (resumable), write patching outputs and run.json."""
    torch.manual_seed(args.seed)
    sites = [s.strip() for s in args.site.split(",") if s.strip()]
    unknown = [s for s in sites if s not in (*SITES, HEAD)]
    if unknown or not sites:
        raise ValueError(f"unknown site {unknown[0] if unknown else ''!r}; choose from {', '.join((*SITES, HEAD))}")
    check_options(args)
    items = load_items(args)
    corrupt = load_items(args, args.corrupt_prompts) if args.corrupt_prompts else None
    options = model_options(args)
    probe = {"corrupt_prompts": prompt_identity(args.corrupt_prompts), "sites": sites, "method": args.method,
             "direction": args.direction, "skip_unequal": args.skip_unequal, "bridge_rank": args.bridge_rank}
    with run_directory(args.out, fingerprint(args, "patch", **probe), overwrite=args.overwrite,
                       recompute=args.recompute) as run:
        return _patch_run(args, items, corrupt, sites, options, run)


def _patch_run(args: argparse.Namespace, items: list[PromptItem], corrupt: list[PromptItem] | None,
               sites: list[str], options: ModelOptions, run: RunDirectory) -> Path:
    from bridgeprobe.analyses.patching_report import write_patching_outputs

    timer = Timer()
    with timer.section("load_model_s"):
        hooked = options.load()
    check_context_length(hooked.model, hooked.tokenizer, items + (corrupt or []))
    pairs, skipped = item_pairs(items, hooked.tokenizer, corrupt, skip_unequal=args.skip_unequal)
    pairs = sample_pairs(pairs, items, args.limit, args.sample, args.seed)
    corrupt_paths = [str(Path(p).resolve()) for p in args.corrupt_prompts] if args.corrupt_prompts else None
    settings = {**prompt_settings(args), "corrupt_prompts": corrupt_paths, "sites": sites,
                "method": args.method, "direction": args.direction, "bridge_rank": args.bridge_rank, "seed": args.seed}
    with timer.section("patching_s"):
        done = run_patching(hooked, pairs, args.out, sites=sites, method=args.method, direction=args.direction,
                            bridge_rank=args.bridge_rank, settings=run.fingerprint)
    if done.frame is None:  # another process of a data-parallel run: rank 0 writes the outputs
        return args.out
    timer.timings["sweep_s"] = done.sweep_s
    with timer.section("report_s"):
        write_patching_outputs(done.frame, args.out, f"{args.method} patching ({args.direction}), {args.model}",
                               direction=args.direction)
    record = run_record("patch", hooked, options, settings, timer, {
        "n_pairs": len(pairs), "skipped_pairs": skipped, "forward_equivalents": done.forward_equivalents})
    label = (f"{args.model}, {args.method} patching ({args.direction}) of {', '.join(sites)}"
             + (f", {len(skipped)} unequal pairs skipped" if skipped else ""))
    summary = "\n".join([*patching_lines(done.frame, label, args.direction),
                         f"Sweeps {done.sweep_s:.1f} s. " + files_line(args.out, PATCH_FILES)])
    run.finish(record, summary)
    print(summary)
    return args.out
