"""Benchmark: the fast activation-patching sweep vs the batched path, the naive loop (one full forward per
patch) and, for resid_pre, TransformerLens' ``patching.get_act_patch_resid_pre`` through ``TransformerBridge``,
on one clean/corrupted pair, every layer x position of one site; all must agree (<= 1e-4).

    python tests/benchmarks/bench_patching.py [--model smollm2-135m] [--site resid_pre] [--threads 1]
        [--clean TEXT --corrupted TEXT --answers Paris Rome] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bridgeprobe.probes.readouts.attribution import attribution_sweep
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.probes.readouts.patching import Pair, SweepResult, sweep


def transformer_lens_sweep(model: torch.nn.Module, pair: Pair, like: SweepResult) -> tuple[dict, SweepResult]:
    """``transformer_lens.patching.get_act_patch_resid_pre`` (one forward per layer x position) on a bridged copy
    of ``model``, as a SweepResult for comparison."""
    from transformer_lens import patching

    from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

    bridge = TransformerLensHooks(model).bridge
    clean, corrupted = pair.ids("clean"), pair.ids("corrupted")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, pair.clean_answer] - logits[0, -1, pair.corrupt_answer]

    start = time.perf_counter()
    grid = patching.get_act_patch_resid_pre(bridge, corrupted, cache, metric)  # [layers, positions]
    seconds = time.perf_counter() - start
    frame = like.frame.copy()
    frame["metric"] = [float(grid[r.layer, r.position]) for r in frame.itertuples()]
    return ({"seconds": round(seconds, 2), "forward_equivalents": float(grid.numel())},
            SweepResult(frame, like.clean_metric, like.corrupted_metric, like.clean_prob, like.corrupted_prob,
                        like.direction, "transformer_lens", float(grid.numel())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--direction", default="denoise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--clean", default="The capital of the country where the Eiffel Tower is located is")
    parser.add_argument("--corrupted", default="The capital of the country where the Colosseum is located is")
    parser.add_argument("--answers", nargs=2, default=["Paris", "Rome"])
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-tl", action="store_true", help="skip TransformerLens' get_act_patch_resid_pre")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    hooked = NativeHooks(model, tokenizer)
    pair = Pair.from_text(tokenizer, args.clean, args.corrupted, *args.answers)
    figures: dict[str, dict] = {}
    results = {}
    runs = [("fast", {}), ("batched", {"method": "batched"})]
    if not args.skip_naive:
        runs.append(("naive", {"method": "naive"}))
    sweep(hooked, pair, args.site, layers=[0], direction=args.direction)  # warm-up
    for name, kwargs in runs:
        start = time.perf_counter()
        results[name] = sweep(hooked, pair, args.site, direction=args.direction, **kwargs)
        figures[name] = {"seconds": round(time.perf_counter() - start, 2),
                         "forward_equivalents": round(results[name].forward_equivalents, 1)}
    if args.site == "resid_pre" and args.direction == "denoise" and not args.skip_tl:
        figures["transformer_lens"], results["transformer_lens"] = transformer_lens_sweep(model, pair, results["fast"])
    start = time.perf_counter()
    attribution_sweep(hooked, pair, direction=args.direction)
    figures["attribution_all_sites"] = {"seconds": round(time.perf_counter() - start, 2), "forward_equivalents": 3}
    reference = results.get("naive", results["batched"])
    for name, result in results.items():
        figures[name]["max_abs_diff"] = float((result.frame["metric"] - reference.frame["metric"]).abs().max())
        figures[name]["speedup_of_fast"] = round(figures[name]["seconds"] / figures["fast"]["seconds"], 1)
    print(json.dumps({
        "model": args.model, "site": args.site, "tokens": pair.length, "layers": hooked.n_layers,
        "cells": hooked.n_layers * pair.length, "threads": args.threads,
        "clean_metric": reference.clean_metric, "corrupted_metric": reference.corrupted_metric, "runs": figures,
    }, indent=2))


if __name__ == "__main__":
    main()
