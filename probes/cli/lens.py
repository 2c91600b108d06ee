"""``bridgeprobe lens``, ``bridgeprobe run`` (the main job) and ``bridgeprobe report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bridgeprobe.analyses.summaries import lens_run_lines, lens_summary
from bridgeprobe.probes.runs.checks import check_context_length
from bridgeprobe.probes.cli.common import (EPILOG, check_options, default_out, fingerprint, load_items, model_args,
                                           model_options, non_negative_int, prompt_args, prompt_settings, run_args,
                                           rundir_args)
from bridgeprobe.probes.cli.memory import (memory_config, memory_flags, memory_report_section, read_memory_csv,
                                           run_memory_section)
from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.model.load import DEFAULT_MODEL
from bridgeprobe.probes.runs.pipeline import (ModelOptions, PatchingRun, Timer, item_pairs, run_lens, run_patching,
                                              run_record)
from bridgeprobe.probes.io.results import read_table
from bridgeprobe.probes.runs.rundir import (RunDirError, RunDirectory, check_prompt_files, check_rows, read_run_record,
                                      run_directory, table_path)
from bridgeprobe.prompts.loaders import load_prompts, parse_columns
from bridgeprobe.prompts.sampling import sample_pairs
from bridgeprobe.prompts.schema import PromptItem


RUN_MEMORY_ITEMS, RUN_MEMORY_MAP_ITEMS, RUN_MEMORY_STRIDE = 24, 12, 6  # memory section of `run`


def register(sub: argparse._SubParsersAction) -> None:
    lens = sub.add_parser("lens", help="logit lens: bridge and answer rank/prob per layer -> DIR/lens.csv",
                          description="Logit-lens bridge probe. Writes DIR/lens.csv (long format) and DIR/run.json; "
                                      "an interrupted run resumes when rerun with the same settings.",
                          epilog=EPILOG)
    model_args(lens, None)
    prompt_args(lens, None)
    lens.add_argument("--out", required=True, type=Path, help="output directory")
    lens.add_argument("--report", action="store_true", help="also write the tables, plots and HTML report")
    run_args(lens)
    rundir_args(lens)
    lens.set_defaults(handler=lambda args: lens_job(args, report=args.report))

    run = sub.add_parser("run", help="main job: logit lens, attribution patching and a shared-memory section, "
                                     "with the report, on the embedded default model -> runs/MODEL/",
                         description="The main job: the logit lens on every item, attribution patching on "
                                     "--patch-pairs counterfactual pairs and a reduced shared-memory analysis "
                                     "(--memory-* flags), with a report (CSV, summary.json, PNG plots, index.html). "
                                     f"Defaults: the embedded {DEFAULT_MODEL} on the bundled curated set, into "
                                     "runs/MODEL (git-ignored). Exact patching, the full memory analysis and the "
                                     "identity experiments are their own commands (patch, memory, reproduce, "
                                     "finetune).",
                         epilog=EPILOG)
    model_args(run, DEFAULT_MODEL)
    prompt_args(run, "curated")
    run.add_argument("--out", type=Path, help="output directory (default: runs/<model name>)")
    run.add_argument("--patch-pairs", type=non_negative_int, default=32,
                     help="pairs for the report's attribution-patching section, chosen like --limit by --sample "
                          "(default 32; 0 skips it)")
    run_args(run)
    rundir_args(run)
    # memory section: defaults sized to keep `run` within a few minutes on 2 CPU cores (`bridgeprobe memory`: all)
    memory_flags(run, "memory-", items=RUN_MEMORY_ITEMS, map_items=RUN_MEMORY_MAP_ITEMS, stride=RUN_MEMORY_STRIDE)
    run.set_defaults(handler=lambda args: lens_job(args, report=True))

    report = sub.add_parser("report", help="rewrite the tables, plots and HTML of a finished lens run",
                            description="Rebuild DIR's report (layers.csv, prompts.csv, summary.json, PNGs, "
                                        "index.html) from DIR/lens.csv and DIR/run.json, without the model.")
    report.add_argument("out", type=Path, metavar="DIR", help="directory of a finished lens or run job")
    report.set_defaults(handler=lambda args: report_job(args.out))


def lens_job(args: argparse.Namespace, report: bool) -> Path:
    """Check the options and prompts, lock the output directory (:mod:`probes.runs.rundir`), load, run the lens
    (resumable) and write run.json, plus the report when asked."""
    torch.manual_seed(args.seed)
    out: Path = args.out or default_out(args.model)
    check_options(args)
    items = load_items(args, limit=args.limit)
    options = model_options(args)
    probe = {"batch_size": args.batch_size, "all_positions": args.all_positions, "report": report}
    if args.command == "run":
        probe.update(patch_pairs=args.patch_pairs, memory=memory_config(args, "memory-").settings()
                     if args.memory_items != 0 else None)
    with run_directory(out, fingerprint(args, args.command, **probe), overwrite=args.overwrite,
                       recompute=args.recompute) as run:
        return _lens_run(args, report, out, items, options, run)


def _lens_run(args: argparse.Namespace, report: bool, out: Path, items: list[PromptItem], options: ModelOptions,
              run: RunDirectory) -> Path:
    timer = Timer()
    with timer.section("load_model_s"):
        hooked: HookedModel = options.load()
    check_context_length(hooked.model, hooked.tokenizer, items)
    settings = {**prompt_settings(args), "n_items": len(items), "batch_size": args.batch_size, "seed": args.seed}
    with timer.section("lens_s"):
        lens = run_lens(hooked, items, out, batch_size=args.batch_size, all_positions=args.all_positions,
                        settings=run.fingerprint)
    attribution = None
    if report and getattr(args, "patch_pairs", 0):
        attribution = _attribution_run(hooked, items, out, args, timer, run.fingerprint)
    memory = None  # memory section
    if report and getattr(args, "memory_items", 0) != 0:
        memory = run_memory_section(hooked, items, out, memory_config(args, "memory-"), run.fingerprint, timer)
    if lens.frame is None:  # another process of a data-parallel run: rank 0 writes the outputs
        return out
    frame = lens.frame
    extra = {"n_queries": int(frame.groupby(["prompt_id", "prompt_kind", "target"]).ngroups),
             "resumed_queries": lens.resumed, "lens_batch_size": lens.batch_size,
             "lens_batch_size_used": lens.batch_size_used}
    if attribution is not None:
        extra["attribution"] = attribution[1]
    if memory is not None:
        extra["memory"] = memory.info
    record = run_record(args.command, hooked, options, settings, timer, extra)
    record["fingerprint"] = run.fingerprint  # for the pages' provenance (run.finish writes the same)
    if report:
        from bridgeprobe.analyses.patching_report import attribution_section
        from bridgeprobe.analyses.report import write_lens_report

        sections = [attribution_section(attribution[0].frame, out, args.model)] if attribution is not None else []
        if memory is not None:
            sections.append(memory_report_section(memory.frame, out, record))
        with timer.section("report_s"):
            summary = write_lens_report(frame, items, out, record, sections)
    else:
        summary = lens_summary(frame)
    lines = lens_run_lines(summary, out, args.model, attribution[0].frame if attribution is not None else None,
                           json.loads((out / "memory_summary.json").read_text()) if memory is not None else None)
    run.finish(record, "\n".join(lines))
    print("\n".join(lines))
    return out


def _attribution_run(hooked: HookedModel, items: list[PromptItem], out: Path, args: argparse.Namespace,
                     timer: Timer, settings: dict) -> tuple[PatchingRun, dict]:
    """Attribution patching of resid_pre / attn_out / mlp_out on --patch-pairs pairs (sampled like --limit), for
    the report; also its entry in run.json."""
    pairs, skipped = item_pairs(items, hooked.tokenizer, skip_unequal=True)
    pairs = sample_pairs(pairs, items, args.patch_pairs, args.sample, args.seed)
    with timer.section("attribution_s"):
        done = run_patching(hooked, pairs, out, sites=["resid_pre", "attn_out", "mlp_out"], method="attribution",
                            direction="denoise", name="attribution", settings=settings)
    return done, {"n_pairs": len(pairs), "skipped_pairs": len(skipped), "sweep_s": done.sweep_s}


def report_job(out: Path) -> None:
    """Regenerate the report of a finished run from its lens.csv and run.json."""
    if not table_path(out, "lens.csv").is_file() or not (out / "run.json").is_file():
        raise RunDirError(f"{out} has no finished run (lens.csv and run.json)")
    with RunDirectory.locked(out):
        _report(out)


def _report(out: Path) -> None:
    from bridgeprobe.analyses.patching_report import attribution_section
    from bridgeprobe.analyses.report import write_lens_report

    record = read_run_record(out / "run.json")
    for name in ("lens.csv", "attribution.csv", "memory.csv"):
        if table_path(out, name).is_file():
            check_rows(out, name, record)
    check_prompt_files(out, record)
    settings = record["settings"]
    columns = parse_columns(settings["columns"]) if settings.get("columns") else None
    items = load_prompts(settings["prompts"], columns=columns, preset=settings.get("preset"),
                         limit=settings.get("limit"), sample=settings.get("sample", "first"),  # older runs: first N
                         seed=settings.get("seed") or 0)
    sections, attribution, memory = [], None, None
    if table_path(out, "attribution.csv").is_file():
        attribution = read_table(table_path(out, "attribution.csv"))
        sections.append(attribution_section(attribution, out, record["model"]))
    if table_path(out, "memory.csv").is_file():
        sections.append(memory_report_section(read_memory_csv(out), out, record))
        memory = json.loads((out / "memory_summary.json").read_text())
    summary = write_lens_report(read_table(table_path(out, "lens.csv")), items, out, record, sections)
    print("\n".join(lens_run_lines(summary, out, record["model"], attribution, memory)))
