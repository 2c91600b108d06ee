"""``bridgeprobe memory`` (the shared-latent-memory analyses) and ``bridgeprobe memory-report`` (rebuild its
tables and plots)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from bridgeprobe.analyses.summaries import MEMORY_FILES, files_line, memory_lines
from bridgeprobe.probes.runs.checks import check_context_length
from bridgeprobe.probes.cli.common import (EPILOG, check_options, fingerprint, load_items, model_args, model_options,
                                           positive_int, non_negative_int, prompt_args, prompt_settings, rundir_args)
from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.memory.analysis import MemoryRun, run_memory
from bridgeprobe.probes.memory.plans import ANALYSES, MemoryConfig
from bridgeprobe.probes.runs.pipeline import ModelOptions, Timer, run_record
from bridgeprobe.probes.io.results import read_table
from bridgeprobe.probes.runs.rundir import RunDirError, RunDirectory, check_rows, run_directory, table_path
from bridgeprobe.probes.readouts.variants import METHODS
from bridgeprobe.prompts.schema import PromptItem

if TYPE_CHECKING:
    from bridgeprobe.analyses.page import Section

DESCRIPTION = """Locate the shared latent memory: where the bridge entity computed inside a two-hop prompt lives
relative to where hop 2 reads an explicitly written bridge. Per item and its 'pair' partner (same composition,
another bridge): cross-prompt patching of the two-hop state into the partner's hop2 prompt at the bridge (source
layer x target layer, with a random-source and an other-relation control), Patchscope-style decoding of the
state in a few-shot identity prompt beside the logit lens, back-patching of later into earlier layers for the
prompts answered wrongly although both hops are right, and the alignment of latent and explicit bridge states
(cosine, linear CKA, a linear probe). Writes DIR/memory.csv (long format: analysis, prompt_id, source_layer,
target_layer, metric, value, ...), aggregated tables, PNG heatmaps and curves, memory_summary.json (the layer band
of the shared memory with its evidence) and DIR/run.json; an interrupted run resumes per item."""


def _count(text: str) -> int | None:
    """An item count: a non-negative integer, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None
    return non_negative_int(text)


def memory_flags(parser: argparse.ArgumentParser, prefix: str = "", *, items: int | None = None,
                 map_items: int | None = None, stride: int = 1) -> None:
    """The memory analysis flags (``--PREFIXitems`` ...), with the given defaults."""
    group = parser.add_argument_group("memory analyses")
    skip = "; 0 skips the section" if prefix else ""
    group.add_argument(f"--{prefix}items", type=_count, default=items, metavar="N|all",
                       help="analyse this many of the loaded items, taken round-robin over the relation "
                            "compositions; every loaded item (--limit chooses those) still serves as a partner or "
                            f"control (default: {'all' if items is None else items}{skip})")
    group.add_argument(f"--{prefix}map-items", type=_count, default=map_items, metavar="N|all",
                       help="of those, this many (round-robin again) get the cross-patch maps and the decoding, the "
                            "costly analyses; back-patching and the alignment use all analysed items "
                            f"(default: {'all' if map_items is None else map_items})")
    group.add_argument(f"--{prefix}stride", type=positive_int, default=stride,
                       help=f"layer stride of the source x target maps; the diagonal is always complete (default {stride})")
    group.add_argument(f"--{prefix}analyses", default=",".join(ANALYSES),
                       help=f"comma-separated subset of {','.join(ANALYSES)} (default: all)")
    group.add_argument(f"--{prefix}decode-layer", type=non_negative_int,
                       help="fixed target layer of the decoding (default: n_layers // 8)")
    group.add_argument(f"--{prefix}batch-items", type=positive_int, default=8,
                       help="items per reference forward and per decoding call (they share the identity prompt); "
                            "an interrupted run resumes after the last finished batch (default 8)")


def memory_config(args: argparse.Namespace, prefix: str = "") -> MemoryConfig:
    """The memory flags as a :class:`~probes.memory.plans.MemoryConfig`."""
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    analyses = tuple(a.strip() for a in get("analyses").split(",") if a.strip())
    return MemoryConfig(analyses=analyses, n_items=get("items"), map_items=get("map_items"), stride=get("stride"),
                        decode_layer=get("decode_layer"), batch_items=get("batch_items"),
                        seed=getattr(args, "seed", 0), method=getattr(args, "method", "auto"))


def register(sub: argparse._SubParsersAction) -> None:
    memory = sub.add_parser("memory", help="locate the shared latent memory (cross-patching, decoding, alignment, "
                                           "back-patching) -> DIR/memory.csv", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(memory, None)
    prompt_args(memory, None)
    memory.add_argument("--out", required=True, type=Path, help="output directory")
    memory_flags(memory)
    memory.add_argument("--method", choices=METHODS, default="auto",
                        help="patching engine: fast (resume from the patched block), batched, naive, or auto (fast "
                             "where verified; default)")
    memory.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the control choices and the CKA jackknife groups (default 0)")
    rundir_args(memory)
    memory.set_defaults(handler=memory_job)

    report = sub.add_parser("memory-report", help="rebuild the memory tables, plots and summary from DIR/memory.csv",
                            description="Rewrite DIR's memory tables, PNGs and memory_summary.json from "
                                        "DIR/memory.csv and DIR/run.json, without the model.")
    report.add_argument("out", type=Path, metavar="DIR", help="directory of a finished memory or run job")
    report.set_defaults(handler=lambda args: memory_report_job(args.out))

    controls = sub.add_parser(
        "memory-controls", help="write the positive and negative control sets of the memory analysis",
        description="Write DIR/present.jsonl and DIR/absent.jsonl from a prompt set: the same items with e1 in each "
                    "two-hop prompt replaced by the item's own bridge (present: the state at e1's last token is the "
                    "bridge written out, so `bridgeprobe memory` must find a band there) or by another bridge of "
                    "the same type (absent: it must find none). Run each through `bridgeprobe memory` like any set "
                    "(docs/memory.md, positive controls).", formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt_args(controls, "curated")
    controls.add_argument("--out", required=True, type=Path, help="output directory")
    controls.add_argument("--seed", type=non_negative_int, default=0, help="seed of the replacement bridges of 'absent' (default 0)")
    controls.set_defaults(handler=controls_job)


def run_memory_section(hooked: HookedModel, items: list[PromptItem], out: Path, config: MemoryConfig,
                       settings: dict, timer: Timer) -> MemoryRun:
    """Run the analyses (resumable) under ``timer``'s ``memory_s``, adding the per-analysis seconds to it. A
    resumed run's ``memory_s`` and per-analysis seconds include its earlier sessions: the whole analysis."""
    with timer.section("memory_s"):
        done = run_memory(hooked, items, out, config, settings=settings)
    timer.timings["memory_s"] = round(timer.timings["memory_s"] + done.info["earlier_sessions_s"], 3)
    timer.timings.update({f"memory_{k}": v for k, v in done.timings.items()})
    return done


def read_memory_csv(out: Path) -> pd.DataFrame:
    """``DIR/memory.csv`` (or ``memory.csv.gz``) as :func:`~probes.memory.analysis.run_memory` returns it."""
    return read_table(table_path(out, "memory.csv"))


def memory_report_section(frame: pd.DataFrame, out: Path, record: dict) -> Section:
    """Write the memory tables, plots and summary into ``out`` and return the HTML report's section."""
    from bridgeprobe.analyses.memory_report import memory_section, write_memory_outputs

    summary = write_memory_outputs(frame, out, record)
    return memory_section(summary, [out / name for name in summary["figures"]])


def memory_job(args: argparse.Namespace) -> Path:
    """Check the options and prompts, lock the output directory (:mod:`probes.runs.rundir`), load, run the memory
    analyses (resumable), then write the tables, plots, summary and run.json."""
    torch.manual_seed(args.seed)
    config = memory_config(args)
    check_options(args)
    items = load_items(args, limit=args.limit)
    warn_undecidable(items, config)
    options = model_options(args)
    with run_directory(args.out, fingerprint(args, "memory", **config.settings()), overwrite=args.overwrite,
                       recompute=args.recompute) as run:
        return _memory_run(args, config, items, options, run)


FEW_ITEMS = 90  # the full SmolLM2 analysis decided at the last token with 94-115 items per test


def warn_undecidable(items: list[PromptItem], config: MemoryConfig) -> None:
    """Before loading: say on stderr when the run cannot decide (no item for the other-relation test) or likely
    cannot (fewer than :data:`FEW_ITEMS` per test), with what would help."""
    from bridgeprobe.probes.memory.plans import other_relation_candidates
    from bridgeprobe.prompts.sampling import sample_items

    analysed = sample_items(items, config.n_items, seed=config.seed)
    if "crosspatch" not in config.analyses:
        return
    other = other_relation_candidates(items, analysed)
    if other == 0:
        print(f"warning: none of the {len(analysed)} items has its bridge under another relation in the set, so the "
              "other-relation test has no items and the statement cannot be a band; use more items (--items, "
              "--limit) or a set whose bridges recur under several relations (the curated set)", file=sys.stderr)
    elif min(other, len(analysed)) < FEW_ITEMS:
        print(f"warning: {len(analysed)} items ({other} for the other-relation test): the full SmolLM2 analysis "
              "decided at the last token with 94-115 items per test, so this run will likely say 'not decided'; "
              "take it as a preview", file=sys.stderr)


def _memory_run(args: argparse.Namespace, config: MemoryConfig, items: list[PromptItem], options: ModelOptions,
                run: RunDirectory) -> Path:
    timer = Timer()
    with timer.section("load_model_s"):
        hooked = options.load()
    check_context_length(hooked.model, hooked.tokenizer, items)
    settings = {**prompt_settings(args), "n_items": len(items), **config.settings()}
    done = run_memory_section(hooked, items, args.out, config, run.fingerprint, timer)
    if done.frame is None:  # another process of a data-parallel run: rank 0 writes the outputs
        return args.out
    record = run_record("memory", hooked, options, settings, timer, {"memory": done.info})
    record["fingerprint"] = run.fingerprint  # for the pages' provenance (run.finish writes the same)
    from bridgeprobe.analyses.memory_report import write_memory_outputs

    print("memory: writing the tables, plots and page", file=sys.stderr)
    with timer.section("report_s"):
        summary = write_memory_outputs(done.frame, args.out, record)
    lines = [f"{args.model}: shared-memory analyses ({', '.join(config.analyses)}) on {done.info['n_items']} items "
             f"in {timer.timings['memory_s']:.0f} s.", *memory_lines(summary), files_line(args.out, MEMORY_FILES)]
    run.finish(record, "\n".join(lines))
    print("\n".join(lines))
    return args.out


def memory_report_job(out: Path) -> None:
    """Rebuild the memory outputs of a finished run from its memory.csv and run.json."""
    from bridgeprobe.analyses.memory_report import write_memory_outputs

    if not table_path(out, "memory.csv").is_file() or not (out / "run.json").is_file():
        raise RunDirError(f"{out} has no finished memory run (memory.csv or memory.csv.gz, and run.json)")
    with RunDirectory.locked(out):
        check_rows(out, "memory.csv")
        record = json.loads((out / "run.json").read_text())
        summary = write_memory_outputs(read_memory_csv(out), out, record)
    print("\n".join([*memory_lines(summary), files_line(out, MEMORY_FILES)]))


def controls_job(args: argparse.Namespace) -> None:
    """Write the two control sets of :mod:`prompts.controls`."""
    from bridgeprobe.probes.io.results import atomic_write
    from bridgeprobe.prompts.controls import KINDS, control_items

    items = load_items(args, limit=args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        kept = control_items(items, kind, seed=args.seed)
        atomic_write(args.out / f"{kind}.jsonl", "".join(json.dumps(i.to_dict()) + "\n" for i in kept))
        print(f"{kind}: {len(kept)} of {len(items)} items -> {args.out / f'{kind}.jsonl'}")
