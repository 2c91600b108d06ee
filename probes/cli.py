"""``bridgeprobe``: probe where a language model keeps the bridge entity of two-hop questions.

`bridgeprobe run` (no arguments) is the main job: the embedded SmolLM2-135M on the bundled prompt set, writing
a report under reports/. `bridgeprobe lens` runs the logit-lens probe on any model and prompt set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from probes.hooks import HookedModel
from probes.models import DEFAULT_MODEL, DTYPES, EMBEDDED, ModelLoadError
from probes.pipeline import BACKENDS, ModelOptions, Timer, item_pairs, run_lens, run_patching, run_record
from probes.results import ResumeMismatch, atomic_write_json
from prompts.loaders import PRESETS, load_prompts, parse_columns
from prompts.schema import PromptItem, PromptSetError

EPILOG = f"""embedded models (no hub needed): {', '.join(f'{k} ({v.description})' for k, v in EMBEDDED.items())}.
Any other MODEL is a local checkpoint directory, a .gguf file, or a hub name."""


def _model_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help=f"embedded alias, local directory, .gguf file or hub name (default: {default_model})")
    group.add_argument("--backend", choices=BACKENDS, default="native",
                       help="hooks: plain PyTorch hooks on the HF modules (default) or TransformerLens TransformerBridge")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    group.add_argument("--device", help="put the whole model on this device (cpu, cuda, cuda:1, ...)")
    group.add_argument("--device-map", help="shard with accelerate instead: auto, balanced, sequential, ...")
    group.add_argument("--max-memory", help='JSON per-device caps for --device-map, e.g. \'{"0": "20GiB", "cpu": "60GiB"}\'')
    group.add_argument("--quantize", choices=("4bit", "8bit"), help="bitsandbytes quantization (GPU hosts)")
    group.add_argument("--offline", action="store_true", help="never contact the model hub")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")


def _prompt_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts", nargs="+", default=[default] if default else None, required=default is None,
                       help="bundled set name (curated) or JSONL/CSV files (default: %(default)s)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="column mapping for a known external format")
    group.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                       help="column mapping for CSV/JSONL in another format: field=column or field='{col} text'")
    group.add_argument("--limit", type=int, help="use only the first N items (patch: the first N pairs)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--all-positions", action="store_true", help="also read out every prompt position")
    parser.add_argument("--seed", type=int, default=0, help="random seed recorded in run.json (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridgeprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being loaded")
    sub = parser.add_subparsers(dest="command", required=True)

    lens = sub.add_parser("lens", help="logit lens: bridge and answer rank/prob per layer -> DIR/lens.csv",
                          description="Logit-lens bridge probe. Writes DIR/lens.csv (long format) and DIR/run.json; "
                                      "an interrupted run resumes when rerun with the same settings.",
                          epilog=EPILOG)
    _model_args(lens, None)
    _prompt_args(lens, None)
    lens.add_argument("--out", required=True, type=Path, help="output directory")
    lens.add_argument("--report", action="store_true", help="also write the tables, plots and HTML report")
    _run_args(lens)

    run = sub.add_parser("run", help="main job: lens + report on the embedded default model (no arguments needed)",
                         description="The main job: run every probe on a model and prompt set and write a report "
                                     "(CSV, summary.json, PNG plots, index.html). Defaults: the embedded "
                                     f"{DEFAULT_MODEL} on the bundled curated set, into reports/MODEL.",
                         epilog=EPILOG)
    _model_args(run, DEFAULT_MODEL)
    _prompt_args(run, "curated")
    run.add_argument("--out", type=Path, help="output directory (default: reports/<model name>)")
    run.add_argument("--patch-pairs", type=int, default=32,
                     help="pairs for the report's attribution-patching section (default 32; 0 skips it)")
    _run_args(run)

    patch = sub.add_parser("patch", help="activation patching over clean/corrupted pairs -> DIR/patching.csv",
                           description="Activation patching on pairs of two-hop prompts: each item (clean) against "
                                       "its 'pair' partner (corrupted), or line by line against --corrupt-prompts. "
                                       "Metric: logit(clean answer) - logit(corrupted answer) at the last token; "
                                       "value: its normalized recovery. Writes DIR/patching.csv (long format), "
                                       "patching_cells.csv and patching_layers.csv (mean and 95% CI over pairs), "
                                       "heatmaps and DIR/run.json.",
                           epilog=EPILOG)
    _model_args(patch, None)
    _prompt_args(patch, None)
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
                            "at every later layer, after each patch (batched full forwards; slower)")
    patch.add_argument("--seed", type=int, default=0, help="random seed recorded in run.json (default 0)")

    report = sub.add_parser("report", help="rewrite the tables, plots and HTML of a finished lens run",
                            description="Rebuild DIR's report (layers.csv, prompts.csv, summary.json, PNGs, "
                                        "index.html) from DIR/lens.csv and DIR/run.json, without the model.")
    report.add_argument("out", type=Path, metavar="DIR", help="directory of a finished lens or run job")
    return parser


def _load_items(args: argparse.Namespace, paths: Sequence[str] | None = None, limit: int | None = None) -> list[PromptItem]:
    columns = parse_columns(args.columns) if args.columns else None
    return load_prompts(paths or args.prompts, columns=columns, preset=args.preset, limit=limit)


def _options(args: argparse.Namespace) -> ModelOptions:
    max_memory = None
    if args.max_memory:
        raw = json.loads(args.max_memory)
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in raw.items()}
    return ModelOptions(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device, device_map=args.device_map,
        max_memory=max_memory, quantize=args.quantize, offline=args.offline,
        trust_remote_code=args.trust_remote_code,
    )


def _default_out(model: str) -> Path:
    return Path("reports") / Path(model.rstrip("/")).name.removesuffix(".gguf")


def lens_job(args: argparse.Namespace, report: bool) -> Path:
    """Load, run the lens (resumable) and write run.json, plus the report when asked."""
    torch.manual_seed(args.seed)
    out: Path = args.out or _default_out(args.model)
    items = _load_items(args, limit=args.limit)
    options = _options(args)
    timer = Timer()
    with timer.section("load_model_s"):
        hooked: HookedModel = options.load()
    settings = {"prompts": [str(p) for p in args.prompts], "preset": args.preset, "columns": args.columns,
                "limit": args.limit, "n_items": len(items), "batch_size": args.batch_size, "seed": args.seed}
    with timer.section("lens_s"):
        frame, resumed = run_lens(hooked, items, out, batch_size=args.batch_size, all_positions=args.all_positions,
                                  settings={**settings, "model": args.model, "dtype": args.dtype,
                                            "backend": args.backend})
    extra = {"n_queries": int(frame.groupby(["prompt_id", "prompt_kind", "target"]).ngroups),
             "resumed_queries": resumed}
    record = run_record(args.command, hooked, options, settings, timer, extra)
    if report:
        from analyses.report import write_lens_report

        sections = []
        if getattr(args, "patch_pairs", 0):
            sections.append(_attribution_section(hooked, items, out, args, timer, record))
        with timer.section("report_s"):
            summary = write_lens_report(frame, items, out, record, sections)
        acc, bridge = summary["accuracy"], summary["bridge"]
        print(f"{args.model}: two-hop accuracy {acc['two_hop']:.1%} (hop1 {acc['hop1']}, hop2 {acc['hop2']}); "
              f"bridge in top 10 at some layer for {bridge['top10_any_layer']:.1%} of prompts, best layer "
              f"{bridge['best_layer_by_top10_rate']} ({bridge['best_top10_rate']:.1%})")
    atomic_write_json(out / "run.json", record)
    print(f"wrote {out}/" + ("index.html" if report else "lens.csv"))
    return out


def _attribution_section(hooked: HookedModel, items: list[PromptItem], out: Path, args: argparse.Namespace,
                         timer: Timer, record: dict) -> tuple[str, str, list[Path]]:
    """Attribution patching of resid_pre / attn_out / mlp_out on the first --patch-pairs pairs, for the report."""
    pairs, skipped = item_pairs(items, hooked.tokenizer, skip_unequal=True)
    pairs = pairs[: args.patch_pairs]
    with timer.section("attribution_s"):
        done = run_patching(hooked, pairs, out, sites=["resid_pre", "attn_out", "mlp_out"], method="attribution",
                            direction="denoise", name="attribution",
                            settings={"pairs": args.patch_pairs, "model": args.model})
    record["attribution"] = {"n_pairs": len(pairs), "skipped_pairs": len(skipped), "sweep_s": done.sweep_s}
    return attribution_section(done.frame, out, args.model)


def attribution_section(frame: pd.DataFrame, out: Path, model: str) -> tuple[str, str, list[Path]]:
    """Write the attribution tables and plots and return the report section (title, HTML text, figures)."""
    from analyses.patching_report import write_patching_outputs

    figures = write_patching_outputs(frame, out, f"Attribution patching, {model}", prefix="attribution")
    text = (f"First-order (attribution) estimate of how much each site carries of the logit difference between "
            f"an item's answer and its counterfactual partner's, on {frame['clean_id'].nunique()} pairs "
            "(denoising: clean activations into the corrupted run; 1 = the site alone restores the clean answer). "
            "Per-layer means with 95% CIs over pairs; attribution.csv has every cell, attribution_layers.csv the "
            "curves. Attribution is a screen: confirm with <code>bridgeprobe patch --method exact</code>.")
    return "Per-layer attribution", text, figures


def patch_job(args: argparse.Namespace) -> Path:
    """Load, build pairs, sweep (resumable), write patching outputs and run.json."""
    from analyses.patching_report import write_patching_outputs
    from probes.hooks import SITES
    from probes.patching import HEAD

    torch.manual_seed(args.seed)
    sites = [s.strip() for s in args.site.split(",") if s.strip()]
    unknown = [s for s in sites if s not in (*SITES, HEAD)]
    if unknown or not sites:
        raise ValueError(f"unknown site {unknown[0] if unknown else ''!r}; choose from {', '.join((*SITES, HEAD))}")
    items = _load_items(args)
    corrupt = _load_items(args, args.corrupt_prompts) if args.corrupt_prompts else None
    options = _options(args)
    timer = Timer()
    with timer.section("load_model_s"):
        hooked = options.load()
    pairs, skipped = item_pairs(items, hooked.tokenizer, corrupt, skip_unequal=args.skip_unequal)
    pairs = pairs[: args.limit] if args.limit else pairs
    settings = {"prompts": [str(p) for p in args.prompts], "corrupt_prompts": args.corrupt_prompts,
                "preset": args.preset, "columns": args.columns, "limit": args.limit, "sites": sites,
                "method": args.method, "direction": args.direction, "bridge_rank": args.bridge_rank, "seed": args.seed}
    with timer.section("patching_s"):
        done = run_patching(hooked, pairs, args.out, sites=sites, method=args.method, direction=args.direction,
                            bridge_rank=args.bridge_rank,
                            settings={**settings, "model": args.model, "dtype": args.dtype, "backend": args.backend})
    timer.timings["sweep_s"] = done.sweep_s
    if args.bridge_rank:
        timer.timings["bridge_rank_s"] = done.bridge_s
    with timer.section("report_s"):
        write_patching_outputs(done.frame, args.out, f"{args.method} patching ({args.direction}), {args.model}")
    record = run_record("patch", hooked, options, settings, timer, {
        "n_pairs": len(pairs), "skipped_pairs": skipped, "forward_equivalents": done.forward_equivalents})
    atomic_write_json(args.out / "run.json", record)
    print(f"wrote {args.out}/patching.csv ({len(pairs)} pairs, sweeps {done.sweep_s:.1f} s)")
    return args.out


def report_job(out: Path) -> None:
    """Regenerate the report of a finished run from its lens.csv and run.json."""
    from analyses.report import write_lens_report

    if not (out / "lens.csv").is_file() or not (out / "run.json").is_file():
        raise ValueError(f"{out} has no finished run (lens.csv and run.json)")
    record = json.loads((out / "run.json").read_text())
    settings = record["settings"]
    columns = parse_columns(settings["columns"]) if settings.get("columns") else None
    items = load_prompts(settings["prompts"], columns=columns, preset=settings.get("preset"), limit=settings.get("limit"))
    sections = []
    if (out / "attribution.csv").is_file():
        attribution = pd.read_csv(out / "attribution.csv", dtype={"clean_id": str, "corrupt_id": str})
        sections.append(attribution_section(attribution, out, record["model"]))
    write_lens_report(pd.read_csv(out / "lens.csv", dtype={"prompt_id": str}), items, out, record, sections)
    print(f"wrote {out}/index.html")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "lens":
            lens_job(args, report=args.report)
        elif args.command == "run":
            lens_job(args, report=True)
        elif args.command == "patch":
            patch_job(args)
        else:
            report_job(args.out)
    except (PromptSetError, ModelLoadError, ResumeMismatch, ValueError) as err:
        if args.verbose:
            raise
        print(f"bridgeprobe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
