"""Benchmark for GPU hosts: time per prompt, peak memory and throughput vs batch size of the logit lens, and an
exact patching sweep, for each model in fp32 / bf16 / 8-bit / 4-bit. Runs (slowly, with tiny settings) on the CPU.

Per (model, variant):

- ``load``: seconds; weight bytes (``model.get_memory_footprint()``) beside the README's formula (every
  quantized linear layer at 1 byte (8-bit) or 0.5 byte + one fp32 scale per 64 weights (4-bit nf4) per weight,
  everything else at the dtype's size); on a GPU also the bytes allocated after loading;
- ``lens``: the same queries at each ``--batch-sizes`` (batch 1 is the baseline: ``speedup`` is the throughput
  over batch 1's), seconds per query and per prompt item, queries/s, and the peak memory the batches add to the
  weights beside :func:`probes.readouts.lens.lens_memory`'s estimate (``estimate_ratio`` = measured / estimate, <= 1 when
  the estimate bounds it). On a GPU the peak is ``torch.cuda.max_memory_allocated`` over the run minus the
  weights; on the CPU it is the peak bytes of the tensors the first (largest) batch allocates, tracked by
  :class:`PeakTracker`. Also the batch size :func:`probes.readouts.lens.auto_batch_size` would pick;
- ``patching``: a ``resid_pre`` sweep (every layer x position) of the first ``--pairs`` curated pairs with the
  fast engine and, as the obvious alternative, one forward per cell (``naive``): seconds, forward-equivalents,
  peak memory, max |metric difference| between the two.

    python tests/benchmarks/bench_scale.py --device cuda --models smollm2-135m gemma3-270m /models/Llama-3.1-8B \\
        --variants float32 bfloat16 8bit 4bit --batch-sizes 1 8 32 128 --limit 64 --pairs 2 --out scale.json
    python tests/benchmarks/bench_scale.py --device cpu --models smollm2-135m --variants float32 8bit \\
        --batch-sizes 1 8 --limit 4 --pairs 1 --out scale-cpu.json                    # a CPU check

Writes ``--out`` (JSON: environment and every figure) and the same figures as a CSV beside it (one row per model,
variant, probe and batch size).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated by the operations run inside it, on any device (the CPU has no
    ``max_memory_allocated``). A storage counts from the operation that creates it until its last tensor dies;
    views and in-place results of existing storages (weights, inputs) add nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.live.get(pointer)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[pointer]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer == 0 or (pointer in inputs and pointer not in self.live):
                continue
            if pointer in self.live:
                self.live[pointer][1] += 1
            else:
                self.live[pointer] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, pointer)
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(device: str, run: Callable[[], Any], track: Callable[[], Any] | None = None) -> tuple[float, int, Any]:
    """Seconds of ``run()``, the peak bytes it adds (GPU: over the run; CPU: of ``track()`` under
    :class:`PeakTracker`, default ``run``), and ``run()``'s result."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = run()
        _sync(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, result
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    with PeakTracker() as tracker:
        (track or run)()
    return seconds, tracker.peak, result


def weight_formula(model: torch.nn.Module, quantize: str | None, dtype: torch.dtype) -> int:
    """The README's estimate of the weight bytes: quantized linear weights at 1 byte (8-bit) or 0.5 byte + 4 bytes
    per 64 weights (4-bit nf4, fp32 absmax per block), every other parameter at ``dtype``'s size."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    seen: set[int] = set()  # tied weights (embedding = unembedding) count once
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = param.numel()
            if type(module).__name__ == "Linear8bitLt" and name == "weight":
                total += count
            elif type(module).__name__ == "Linear4bit" and name == "weight":
                count *= 2  # two 4-bit weights per stored byte
                total += count // 2 + 4 * (count // 64)
            else:
                total += count * element
    return total


def bench_model(spec: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from bridgeprobe.probes.model.hooks import NativeHooks
    from bridgeprobe.probes.readouts.lens import (_encode, auto_batch_size, batches, lens_batch, lens_memory,
                                                  lens_queries)
    from bridgeprobe.probes.model.load import DTYPES, load_model
    from bridgeprobe.probes.readouts.patching import sweep
    from bridgeprobe.probes.runs.pipeline import item_pairs
    from bridgeprobe.prompts.loaders import load_prompts

    quantize = variant if variant in ("8bit", "4bit") else None
    dtype = args.compute_dtype if quantize else variant
    base = {"model": spec, "variant": variant, "device": args.device}
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, tokenizer = load_model(spec, dtype=dtype, device=args.device, quantize=quantize, offline=True)
    load_s = time.perf_counter() - start
    hooked = NativeHooks(model, tokenizer)
    rows = [{**base, "probe": "load", "seconds": load_s, "weight_bytes": model.get_memory_footprint(),
             "weight_formula_bytes": weight_formula(model, quantize, DTYPES[dtype]),
             "allocated_bytes": torch.cuda.memory_allocated() if args.device.startswith("cuda") else None}]

    items = load_prompts(args.prompts, limit=args.limit)
    queries = lens_queries(items)
    lens_batch(hooked, queries[:2])  # warm-up
    baseline = None
    for size in args.batch_sizes:
        planned = list(batches(queries, tokenizer, size))

        def run(planned: list = planned) -> None:
            for batch in planned:
                lens_batch(hooked, batch)

        seconds, peak, _ = measure(args.device, run, lambda: lens_batch(hooked, planned[0]))
        estimate = 0
        for batch in planned if args.device.startswith("cuda") else planned[:1]:
            encoded = [_encode(tokenizer, q) for q in batch]
            estimate = max(estimate, lens_memory(hooked, len(batch), max(len(e.sequence) for e in encoded),
                                                 n_sequences=len({e.sequence for e in encoded}),
                                                 n_extra=max(len(e.target_ids) for e in encoded) - 1))
        throughput = len(queries) / seconds
        baseline = baseline or throughput
        rows.append({**base, "probe": "lens", "batch_size": size, "queries": len(queries), "items": len(items),
                     "seconds": seconds, "s_per_query": seconds / len(queries), "s_per_item": seconds / len(items),
                     "queries_per_s": throughput, "speedup": throughput / baseline, "peak_bytes": peak,
                     "estimate_bytes": estimate, "estimate_ratio": peak / estimate})
    rows.append({**base, "probe": "lens_auto_batch", "batch_size": auto_batch_size(hooked, queries)})

    pairs, _ = item_pairs(load_prompts(args.prompts), tokenizer, skip_unequal=True)
    for named in pairs[: args.pairs]:
        results = {}
        for method in ("fast", "naive") if args.naive else ("fast",):
            seconds, peak, results[method] = measure(
                args.device, lambda method=method: sweep(hooked, named.pair, "resid_pre", method=method),
                lambda method=method: sweep(hooked, named.pair, "resid_pre", method=method,
                                            layers=[0, hooked.n_layers // 2]))
            rows.append({**base, "probe": f"patching_{method}", "pair": named.clean_id, "tokens": named.pair.length,
                         "cells": hooked.n_layers * named.pair.length, "seconds": seconds, "peak_bytes": peak,
                         "forward_equivalents": results[method].forward_equivalents})
        if "naive" in results:
            rows[-2]["max_abs_diff_vs_naive"] = float(
                (results["fast"].frame["metric"] - results["naive"].frame["metric"]).abs().max())
            rows[-2]["speedup"] = rows[-1]["seconds"] / rows[-2]["seconds"]
    del hooked, model
    gc.collect()
    return rows


def environment(args: argparse.Namespace) -> dict[str, Any]:
    found = {"python": platform.python_version(), "threads": torch.get_num_threads(), "device": args.device}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if args.device.startswith("cuda"):
        found["gpu"] = torch.cuda.get_device_name()
        found["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                        help="embedded aliases or local checkpoint directories (loaded offline)")
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "8bit", "4bit"],
                        choices=["float32", "bfloat16", "float16", "8bit", "4bit"])
    parser.add_argument("--compute-dtype", default=None, help="dtype of the quantized variants' other weights and "
                        "compute (default bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", default="curated")
    parser.add_argument("--limit", type=int, default=64, help="prompt items for the lens (4 queries each)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--pairs", type=int, default=2, help="curated pairs for the patching sweeps")
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the one-forward-per-cell sweep")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="JSON file; the CSV goes beside it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compute_dtype = args.compute_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rows = []
    for spec in args.models:
        for variant in args.variants:
            print(f"{spec} {variant} ...", flush=True)
            rows += bench_model(spec, variant, args)
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"environment": environment(args), "settings": settings, "figures": rows},
                                   indent=2, default=str) + "\n")
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.drop(columns=["device"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()
