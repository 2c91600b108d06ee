"""GPU check: the package's GPU paths measured on one GPU in one prepared run, at real 8B shapes with random weights.

Writes ``OUT/gpu_check.json`` (every figure, each check with the command that reproduces it alone) and
``OUT/gpu_check.txt`` (a short summary), plus ``OUT/gpu_tests.xml`` / ``OUT/gpu_tests.log`` (the ``gpu``-marked
tests). Checks, each independent (a failure is recorded and the next check runs) and all under one time budget
(a check that would start too late is recorded as skipped, and the JSON is rewritten after every check):

- ``gpu_tests``: ``python -m pytest -m gpu`` (junit XML parsed into passed / failed / skipped per test);
- per model shape (``--shapes``; Llama-3-8B and Qwen2.5-7B configs, built on the GPU in bf16 with random
  weights, no file on disk), after ``build`` (seconds, weight bytes against the README's formula):
  ``lens`` (queries/s at ``--batch-sizes`` and at :func:`probes.readouts.lens.auto_batch_size`'s choice, peak memory
  over the weights against :func:`probes.readouts.lens.lens_memory`, rows equal across batch sizes), ``sweep`` (the exact
  resid_pre sweep, fast engine vs one forward per patch on a 20-token pair: seconds, ratio, max |diff|, peak
  memory against the patching memory model), ``attribution`` (attribution patching's time in forwards of the
  pair), ``memory`` (the shared-memory analysis, cross-patching, decoding and back-patching, on up to 8 paired
  items: seconds per item and per analysis, rows, peak memory), ``oom_lens`` / ``oom_sweep`` (an out-of-memory error triggered for real by capping the process's GPU
  memory with ``torch.cuda.set_per_process_memory_fraction``; the backed-off run must end with the rows of a run
  that never ran out);
- ``device_map``: a checkpoint of the first shape cut to ``--ckpt-layers`` blocks, saved once, loaded through
  ``probes.model.load.load_model`` on one GPU and split GPU/CPU by an explicit ``device_map``: lens rows and the fast
  sweep must agree;
- ``quantized``: the same checkpoint loaded in 8-bit and 4-bit nf4 (bitsandbytes; skipped when it is not
  importable) with a lens pass: weight bytes against the formula, agreement with bf16.

``--tiny`` runs the same code on the CPU with tiny Llama/Qwen2 configs in fp32 (what needs CUDA is recorded as
skipped; the out-of-memory back-off is triggered by a simulated ``torch.cuda.OutOfMemoryError``), so that
tests/test_gpu_check.py keeps the script from rotting.

    bash tests/benchmarks/gpu_check.sh                                   # on a GPU host, <= 8 minutes on one H200
    python tests/benchmarks/gpu_check.py --tiny --out /tmp/gpu_check   # CPU dry run, a few seconds
    python tests/benchmarks/gpu_check.py --only sweep --shapes llama3-8b --out /tmp/one   # one check again
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = "tests/benchmarks/gpu_check.py"

CHECKS = ("gpu_tests", "build", "lens", "sweep", "attribution", "memory", "oom_lens", "oom_sweep", "device_map",
          "quantized")
SHAPE_CHECKS = ("build", "lens", "sweep", "attribution", "memory", "oom_lens", "oom_sweep")
# rough seconds each check needs on an H200 (a check is skipped when less than this is left in the budget)
NEEDS_S = {"gpu_tests": 30, "build": 10, "lens": 25, "sweep": 40, "attribution": 10, "memory": 40, "oom_lens": 25,
           "oom_sweep": 25, "device_map": 60, "quantized": 60}
KEYS = ["prompt_id", "prompt_kind", "target", "layer", "position"]
LENGTH = 20  # tokens of the patching pair


def shape_configs(tiny: bool) -> dict[str, Any]:
    """Model configs by shape name: the published Llama-3-8B and Qwen2.5-7B shapes, or tiny ones."""
    from transformers import LlamaConfig, Qwen2Config

    if tiny:
        small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return {"llama-tiny": LlamaConfig(**small), "qwen2-tiny": Qwen2Config(**small)}
    return {
        "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    }


# --------------------------------------------------------------------------------------------------- inputs


def prompt_items(n: int) -> list:
    """``n`` two-hop items with one-hop prompts, every word one token, 12 to 19 tokens per two-hop prompt."""
    from bridgeprobe.prompts.schema import PromptItem

    fillers = ["old", "stone", "tower", "by", "the", "green", "river", "near", "a", "market"]
    items = []
    for k in range(n):
        extra = " ".join(fillers[: k % 8])
        two_hop = f"The capital of the country where landmark{k} {extra} stands is".replace("  ", " ")
        items.append(PromptItem(f"i{k}", two_hop, f"country{k}", f"city{k}", hop1=f"landmark{k} stands in",
                                hop2=f"The capital of country{k} is"))
    return items


def word_tokenizer(items: list, vocab_size: int) -> Any:
    """A word-level HF tokenizer built offline (no hub): every word of the items and pairs one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for item in items for text in (item.two_hop, item.bridge, item.answer, item.hop1, item.hop2)
             for w in text.split()}
    words |= {f"w{k}" for k in range(300)}  # filler words of the patching pairs
    words = sorted(words)
    if len(words) + 1 > vocab_size:
        raise ValueError(f"{len(words) + 1} words do not fit a vocabulary of {vocab_size}")
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


def patch_pair(tokenizer: Any, length: int) -> Any:
    """A clean/corrupted pair of ``length`` tokens that differ in one word, answers ``city1`` vs ``city2``."""
    from bridgeprobe.probes.readouts.patching import Pair

    words = [f"w{k % 300}" for k in range(length - 1)]
    clean = " ".join(["landmark1", *words])
    corrupted = " ".join(["landmark2", *words])
    return Pair.from_text(tokenizer, clean, corrupted, "city1", "city2")


# --------------------------------------------------------------------------------------------------- helpers


class Clock:
    """The global time budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


USE_CUDA = {"on": torch.cuda.is_available()}  # off with --tiny, also on a GPU host


def cuda() -> bool:
    """Whether the checks use the GPU."""
    return USE_CUDA["on"]


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free_cuda() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any]) -> tuple[float, int | None, Any]:
    """(seconds, peak GPU bytes allocated above what was allocated before (None without CUDA), result)."""
    free_cuda()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda() else None
    return seconds, peak, result


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def num_ooms() -> int:
    return int(torch.cuda.memory_stats().get("num_ooms", 0)) if cuda() else 0


@contextlib.contextmanager
def capped_gpu(headroom: int) -> Iterator[None]:
    """Let this process's allocator hold only what it holds now plus ``headroom`` bytes (a real out-of-memory
    error beyond that)."""
    free_cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + headroom) / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        free_cuda()


@contextlib.contextmanager
def replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def simulated_oom(module: Any, name: str, too_big: Callable[..., bool],
                  raised: list[int]) -> contextlib.AbstractContextManager:
    """Replace ``module.name`` by a function that raises ``torch.cuda.OutOfMemoryError`` where ``too_big(*args)``
    (the CPU stand-in for a real out-of-memory error), counting the errors in ``raised[0]``."""
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if too_big(*args):
            raised[0] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by gpu_check --tiny)")
        return real(*args, **kwargs)

    return replaced(module, name, wrapper)


def bench_scale() -> Any:
    """tests/benchmarks/bench_scale.py (its weight formula is the README's)."""
    spec = importlib.util.spec_from_file_location("bench_scale", HERE / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lens_rows(hooked: Any, queries: list, size: int) -> list[dict]:
    """Lens rows of ``queries`` in batches of ``size`` (as :func:`bridgeprobe.probes.runs.pipeline.run_lens` plans them)."""
    from bridgeprobe.probes.readouts.lens import batches, lens_batch

    return [row for batch in batches(queries, hooked.tokenizer, size) for row in lens_batch(hooked, batch)]


def lens_and_sweep(hooked: Any, queries: list, pair: Any) -> tuple[list[dict], Any]:
    from bridgeprobe.probes.readouts.patching import sweep

    return lens_rows(hooked, queries, 8), sweep(hooked, pair, "resid_pre", method="fast")


def lens_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).sort_values(KEYS).reset_index(drop=True)


def compare_lens_rows(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """Row-for-row agreement of two lens tables on the same queries."""
    joined = a.merge(b, on=KEYS, suffixes=("_a", "_b"))
    return {"rows": len(a), "rows_other": len(b), "rows_joined": len(joined),
            "logprob_max_abs_diff": float((joined["logprob_a"] - joined["logprob_b"]).abs().max()),
            "rank_equal_fraction": float((joined["rank_a"] == joined["rank_b"]).mean()),
            "rank_max_abs_diff": int((joined["rank_a"] - joined["rank_b"]).abs().max())}


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of two computations of one sweep: fp32 (tests/test_patching.py), or bf16, where other
    batch shapes take other kernels and round differently (its GPU test's 5e-2)."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def sweep_diff(a: Any, b: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Max |difference| of two sweeps' metric (logit difference) and recovery, cell by cell; ``agrees`` when the
    metric's is within :func:`tolerance` times the metric's scale."""
    joined = a.frame.merge(b.frame, on=["site", "layer", "position"], suffixes=("_a", "_b"))
    diff = float((joined["metric_a"] - joined["metric_b"]).abs().max())
    scale = float(max(abs(a.clean_metric), abs(a.corrupted_metric), 1.0))
    return {"cells": len(joined), "metric_max_abs_diff": diff,
            "value_max_abs_diff": float((joined["value_a"] - joined["value_b"]).abs().max()), "metric_scale": scale,
            "tolerance": tolerance(dtype), "agrees": len(joined) == len(a.frame) and diff <= tolerance(dtype) * scale}


# --------------------------------------------------------------------------------------------------- model


class Shape:
    """One random model at a shape, its tokenizer, prompts and pair."""

    def __init__(self, name: str, config: Any, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM

        from bridgeprobe.probes.model.hooks import NativeHooks

        self.name, self.config = name, config
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.device = "cuda" if cuda() else "cpu"
        self.items = prompt_items(args.items)
        self.tokenizer = word_tokenizer(self.items, config.vocab_size)
        torch.manual_seed(0)
        free_cuda()
        before = torch.cuda.memory_allocated() if cuda() else 0
        start = time.perf_counter()
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        sync()
        self.build_s = time.perf_counter() - start
        self.allocated = torch.cuda.memory_allocated() - before if cuda() else None
        self.hooked = NativeHooks(model.eval().requires_grad_(False), self.tokenizer)
        self.pair = patch_pair(self.tokenizer, LENGTH)

    def close(self) -> None:
        del self.hooked
        free_cuda()


def check_build(shape: Shape) -> dict[str, Any]:
    model = shape.hooked.model
    formula = bench_scale().weight_formula(model, None, shape.dtype)
    return {"device": shape.device, "dtype": str(shape.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()), "n_layers": shape.hooked.n_layers,
            "seconds": round(shape.build_s, 2), "weight_bytes_formula": formula,
            "weight_bytes_footprint": int(model.get_memory_footprint()), "weight_bytes_allocated": shape.allocated,
            "allocated_over_formula": ratio(shape.allocated, formula)}


# --------------------------------------------------------------------------------------------------- lens


def check_lens(shape: Shape, args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    from bridgeprobe.probes.readouts.lens import (_encode, auto_batch_size, batches, free_memory, lens_batch,
                                                  lens_memory, lens_queries)

    hooked = shape.hooked
    queries = lens_queries(shape.items)
    auto = auto_batch_size(hooked, queries)
    encoded = [_encode(shape.tokenizer, q) for q in queries]
    n_tokens = max(len(e.sequence) for e in encoded)
    n_extra = max(len(e.target_ids) for e in encoded) - 1
    free = free_memory(hooked)

    def estimate(batch: list) -> int:
        enc = [_encode(shape.tokenizer, q) for q in batch]
        return lens_memory(hooked, len(batch), max(len(e.sequence) for e in enc),
                           n_sequences=len({e.sequence for e in enc}), n_extra=max(len(e.target_ids) for e in enc) - 1)

    runs, frames = [], {}
    for size in sorted(set(args.batch_sizes) | {auto}):
        if clock.left() < 5:
            runs.append({"batch_size": size, "status": "skipped: time budget"})
            continue
        planned = list(batches(queries, shape.tokenizer, size))
        lens_batch(hooked, planned[0])  # warm-up (kernels, allocator)
        seconds, peak, rows = timed(partial(lens_rows, hooked, queries, size))
        bound = max(estimate(batch) for batch in planned)
        frames[size] = lens_frame(rows)
        runs.append({"batch_size": size, "auto": size == auto, "queries": len(queries), "batches": len(planned),
                     "seconds": round(seconds, 3), "queries_per_s": round(len(queries) / seconds, 1),
                     "peak_over_weights_bytes": peak, "estimate_bytes": bound, "peak_over_estimate": ratio(peak, bound)})
    reference = min(frames)
    agreement = {str(size): compare_lens_rows(frames[reference], frame) for size, frame in frames.items()
                 if size != reference}
    auto_estimate = max(lens_memory(hooked, auto, n_tokens, n_extra=n_extra),
                        lens_memory(hooked, auto, n_tokens, n_sequences=-(-auto // 2), n_extra=n_extra))
    return {"queries": len(queries), "longest_sequence": n_tokens, "auto_batch_size": auto,
            "free_bytes_at_start": free, "auto_estimate_bytes": auto_estimate,
            "auto_estimate_over_half_free": ratio(auto_estimate, None if free is None else free / 2),
            "runs": runs, "rows_vs_batch_size": {"reference_batch_size": reference, "by_batch_size": agreement}}


# --------------------------------------------------------------------------------------------------- patching


def patching_memory(shape: Shape, length: int) -> dict[str, int]:
    """The README's patching memory model: the receiving run's cache and residuals, and each patched variant."""
    c = shape.config
    e = torch.empty((), dtype=shape.dtype).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    d, inner, layers, heads = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads
    return {"cache_bytes": e * layers * length * (2 * kv + 2 * d),
            "per_variant_bytes": length * (e * (layers * 2 * kv + 6 * d + 3 * inner) + 4 * heads * length)
                                 + 4 * c.vocab_size}  # and its last position's fp32 logits


def check_sweep(shape: Shape) -> dict[str, Any]:
    from bridgeprobe.probes.readouts.lens import free_memory
    from bridgeprobe.probes.readouts.patching import sweep

    hooked, pair = shape.hooked, shape.pair
    free = free_memory(hooked)
    sweep(hooked, pair, "resid_pre", layers=[0], positions=[0, 1], method="fast")  # warm-up
    sweep(hooked, pair, "resid_pre", layers=[0], positions=[0], method="naive")
    fast_s, fast_peak, fast = timed(lambda: sweep(hooked, pair, "resid_pre", method="fast"))
    naive_s, naive_peak, naive = timed(lambda: sweep(hooked, pair, "resid_pre", method="naive"))
    model = patching_memory(shape, pair.length)
    n_cells = hooked.n_layers * pair.length
    budget = None if free is None else free // 2
    return {"pair_tokens": pair.length, "cells": n_cells, "method": fast.method,
            "fast_s": round(fast_s, 3), "naive_s": round(naive_s, 3), "speedup": ratio(naive_s, fast_s),
            "fast_forward_equivalents": round(fast.forward_equivalents, 2),
            "naive_forward_equivalents": naive.forward_equivalents,
            **sweep_diff(fast, naive, shape.dtype), "clean_metric": fast.clean_metric, "corrupted_metric": fast.corrupted_metric,
            "fast_peak_bytes": fast_peak, "naive_peak_bytes": naive_peak, **model,
            "memory_budget_bytes": budget,
            "fast_peak_over_model": ratio(fast_peak, model["cache_bytes"] + n_cells * model["per_variant_bytes"]),
            "fast_peak_over_budget": ratio(fast_peak, budget)}


def check_attribution(shape: Shape) -> dict[str, Any]:
    from bridgeprobe.probes.readouts.attribution import attribution_sweep

    hooked, pair = shape.hooked, shape.pair
    ids = pair.ids("corrupted")
    with torch.no_grad():
        hooked.run(ids)  # warm-up
        forward_s, _, _ = timed(lambda: [hooked.run(ids) for _ in range(5)])
    forward_s /= 5
    attribution_sweep(hooked, pair, sites=["resid_pre"])  # warm-up
    seconds, peak, result = timed(lambda: attribution_sweep(hooked, pair, sites=["resid_pre"]))
    return {"pair_tokens": pair.length, "cells": len(result.frame), "seconds": round(seconds, 4),
            "forward_s": round(forward_s, 5), "forward_equivalents_measured": round(seconds / forward_s, 2),
            "forward_equivalents_nominal": result.forward_equivalents,
            "naive_forward_equivalents": hooked.n_layers * pair.length, "peak_bytes": peak}


def memory_items(items: list) -> list:
    """Up to 8 of the shape's items as the memory analysis reads them: ``e1``, the relations, and a pair partner of
    the same composition (items 0-1, 2-3, ...), every hop2 prompt of one length."""
    from dataclasses import replace

    chosen = items[: min(8, len(items) - len(items) % 2)]
    return [replace(item, e1=item.hop1.split()[0], r1="located_in", r2="capital", pair=chosen[k ^ 1].id)
            for k, item in enumerate(chosen)]


def check_memory(shape: Shape) -> dict[str, Any]:
    from bridgeprobe.probes.memory.analysis import run_memory
    from bridgeprobe.probes.memory.plans import MemoryConfig

    items = memory_items(shape.items)
    # random weights answer nothing: back-patch the hop_failed group too, so that every analysis runs
    config = MemoryConfig(analyses=("crosspatch", "decoding", "backpatch"), stride=4,
                          backpatch_groups=("hops_ok_composition_failed", "correct", "hop_failed"))
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak, run = timed(lambda: run_memory(shape.hooked, items, Path(tmp), config, settings={}))
    frame = run.frame
    return {"items": len(items), "stride": config.stride, "rows": len(frame), "seconds": round(seconds, 3),
            "seconds_per_item": round(seconds / len(items), 3),
            "timings": {k: round(v, 3) for k, v in run.timings.items()},
            "rows_per_analysis": frame["analysis"].value_counts().to_dict(), "peak_bytes": peak}


# --------------------------------------------------------------------------------------------------- back-off


def check_oom_lens(shape: Shape) -> dict[str, Any]:
    import bridgeprobe.probes.runs.pipeline
    from bridgeprobe.probes.readouts.lens import MAX_AUTO_BATCH, _encode, lens_memory, lens_queries
    from bridgeprobe.probes.runs.pipeline import run_lens

    hooked = shape.hooked
    first = MAX_AUTO_BATCH if cuda() else 16
    simulated = [0]
    with tempfile.TemporaryDirectory() as tmp:
        before = num_ooms()
        if cuda():  # room for the estimate of 16 queries (an upper bound), far from enough for 256
            longest = max(len(_encode(shape.tokenizer, q).sequence) for q in lens_queries(shape.items))
            headroom = lens_memory(hooked, 16, longest, n_extra=0)
            trigger, cap = "real: torch.cuda.set_per_process_memory_fraction", capped_gpu(headroom)
        else:
            headroom = None
            trigger = "simulated: torch.cuda.OutOfMemoryError above 4 queries (no CUDA)"
            cap = simulated_oom(bridgeprobe.probes.runs.pipeline, "lens_batch", lambda h, batch, *a: len(batch) > 4, simulated)
        with cap:
            backed = run_lens(hooked, shape.items, Path(tmp) / "oom", settings={}, batch_size=first)
        ooms = num_ooms() - before
        plain = run_lens(hooked, shape.items, Path(tmp) / "plain", settings={}, batch_size=backed.batch_size_used)
        same_bytes = (Path(tmp) / "oom" / "lens.csv").read_bytes() == (Path(tmp) / "plain" / "lens.csv").read_bytes()
        agreement = compare_lens_rows(lens_frame(backed.frame.to_dict("records")),
                                      lens_frame(plain.frame.to_dict("records")))
    return {"trigger": trigger, "headroom_bytes": headroom, "batch_size_planned": backed.batch_size,
            "batch_size_used": backed.batch_size_used, "cuda_ooms": ooms, "simulated_ooms": simulated[0],
            "backed_off": backed.batch_size_used < first,
            "same_file_as_plain_run": same_bytes, **agreement}


def check_oom_sweep(shape: Shape) -> dict[str, Any]:
    import bridgeprobe.probes.readouts.variants
    from bridgeprobe.probes.readouts.patching import sweep

    hooked = shape.hooked
    pair = patch_pair(shape.tokenizer, 256 if cuda() else 24)
    layers = sorted({0, hooked.n_layers // 2, hooked.n_layers - 1})
    plain = sweep(hooked, pair, "resid_pre", layers=layers, method="fast")
    before, simulated = num_ooms(), [0]
    if cuda():
        huge = 10 * torch.cuda.get_device_properties(0).total_memory
        trigger, cap, budget = "real: torch.cuda.set_per_process_memory_fraction", capped_gpu(1 << 30), huge
    else:
        trigger = "simulated: torch.cuda.OutOfMemoryError above 2 variants per pass (no CUDA)"
        cap = simulated_oom(bridgeprobe.probes.readouts.variants, "_fast_pass", lambda h, group, *a: len(group) > 2, simulated)
        budget = None
    with cap:
        backed = sweep(hooked, pair, "resid_pre", layers=layers, method="fast", memory_budget=budget)
    return {"trigger": trigger, "pair_tokens": pair.length, "layers": layers, "cuda_ooms": num_ooms() - before,
            "simulated_ooms": simulated[0], **sweep_diff(backed, plain, shape.dtype)}


# --------------------------------------------------------------------------------------------------- checkpoint


def save_checkpoint(config: Any, tokenizer: Any, layers: int, path: Path) -> None:
    """A random model of ``config``'s shape cut to ``layers`` blocks, saved with its tokenizer (safetensors)."""
    from transformers import AutoModelForCausalLM

    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": layers})
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]]
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda() else torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    free_cuda()


def split_map(path: Path) -> dict[str, Any]:
    """An explicit device_map: the embedding, the first half of the blocks and the modules without weights (rotary
    embedding) on GPU 0, the other blocks, the final norm and the unembedding on the CPU (everything on the CPU
    without CUDA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    inner_name, inner = next((n, m) for n, m in model.named_children() if hasattr(m, "layers"))
    gpu = 0 if cuda() else "cpu"
    mapping: dict[str, Any] = {}
    seen_layers = False
    for name, module in inner.named_children():
        if name == "layers":
            n = len(inner.layers)
            mapping.update({f"{inner_name}.layers.{i}": gpu if i < n // 2 else "cpu" for i in range(n)})
            seen_layers = True
        else:
            weighted = any(True for _ in module.parameters())
            mapping[f"{inner_name}.{name}"] = "cpu" if seen_layers and weighted else gpu
    for name, _ in model.named_children():
        if name != inner_name:
            mapping[name] = "cpu"
    return mapping


def check_device_map(ckpt: Path, items: list) -> dict[str, Any]:
    from bridgeprobe.probes.model.hooks import NativeHooks
    from bridgeprobe.probes.readouts.lens import lens_queries
    from bridgeprobe.probes.model.load import load_model

    queries = lens_queries(items[:16])
    results = {}
    mapping = split_map(ckpt)
    for name, options in (("single", {"device": "cuda" if cuda() else "cpu"}), ("split", {"device_map": mapping})):
        model, tokenizer = load_model(str(ckpt), dtype="float32", **options)
        hooked = NativeHooks(model, tokenizer)
        pair = patch_pair(tokenizer, LENGTH)
        seconds, _, (rows, result) = timed(partial(lens_and_sweep, hooked, queries, pair))
        results[name] = {"frame": lens_frame(rows), "sweep": result, "seconds": round(seconds, 3),
                         "parameter_devices": sorted({str(p.device) for p in model.parameters()})}
        model = hooked = None  # free the copy before loading the next
        free_cuda()
    placed = pd.Series([str(v) for v in mapping.values()]).value_counts().to_dict()
    return {"dtype": "float32", "modules_per_device": placed,
            "split_exercised": cuda() or "no: everything on the CPU (no CUDA)",
            **{f"{k}_parameter_devices": v["parameter_devices"] for k, v in results.items()},
            **{f"{k}_s": v["seconds"] for k, v in results.items()},
            "lens": compare_lens_rows(results["single"]["frame"], results["split"]["frame"]),
            "sweep": sweep_diff(results["single"]["sweep"], results["split"]["sweep"], torch.float32)}


def bitsandbytes_version() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        importlib.import_module("bitsandbytes")  # a broken install fails here, not in the middle of a check
    except Exception as err:  # noqa: BLE001  (any import failure means: not available)
        return f"unusable: {type(err).__name__}: {err}"
    return importlib.metadata.version("bitsandbytes")


def quantized_unavailable() -> str | None:
    """Why the quantized check cannot run here, or None."""
    version = bitsandbytes_version()
    if not cuda():
        return "skipped: needs CUDA"
    if version is None or version.startswith("unusable"):
        return f"skipped: bitsandbytes not available ({version or 'not installed'})"
    return None


def check_quantized(ckpt: Path, items: list) -> dict[str, Any]:
    from bridgeprobe.probes.runs.fidelity import spearman
    from bridgeprobe.probes.model.hooks import NativeHooks
    from bridgeprobe.probes.readouts.lens import auto_batch_size, lens_queries
    from bridgeprobe.probes.model.load import load_model

    version = bitsandbytes_version()
    weights = bench_scale().weight_formula
    queries = lens_queries(items)
    out: dict[str, Any] = {"bitsandbytes": version}
    frames = {}
    for variant in ("bfloat16", "8bit", "4bit"):
        quantize = None if variant == "bfloat16" else variant
        free_cuda()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model, tokenizer = load_model(str(ckpt), dtype="bfloat16", quantize=quantize,
                                      **({} if quantize else {"device": "cuda"}))
        load_s = time.perf_counter() - start
        allocated = torch.cuda.memory_allocated() - before
        hooked = NativeHooks(model, tokenizer)
        size = auto_batch_size(hooked, queries)
        seconds, peak, rows = timed(partial(lens_rows, hooked, queries, size))
        frames[variant] = lens_frame(rows)
        formula = weights(model, quantize, torch.bfloat16)
        out[variant] = {"load_s": round(load_s, 2), "weight_bytes_formula": formula,
                        "weight_bytes_footprint": int(model.get_memory_footprint()), "weight_bytes_allocated": allocated,
                        "allocated_over_formula": ratio(allocated, formula), "lens_batch_size": size,
                        "lens_queries_per_s": round(len(queries) / seconds, 1), "lens_peak_bytes": peak}
        if variant != "bfloat16":
            joined = frames["bfloat16"].merge(frames[variant], on=KEYS, suffixes=("_ref", "_q"))
            out[variant]["vs_bfloat16"] = {
                **compare_lens_rows(frames["bfloat16"], frames[variant]),
                "rank_spearman": spearman(joined["rank_ref"], joined["rank_q"])}
        model = hooked = None  # free the copy before loading the next
        free_cuda()
    return out


# --------------------------------------------------------------------------------------------------- tests


def check_gpu_tests(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess, its junit XML parsed; with --tiny only tests/test_models.py (collecting
    every test module would cost more than the rest of the dry run)."""
    files = ["tests/test_models.py"] if args.tiny else ["tests"]
    xml = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
               "--continue-on-collection-errors", f"--junitxml={xml}", *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    log_path = out / "gpu_tests.log"
    with log_path.open("w") as log:
        # a session of its own, so that a timeout also ends what the tests started (torchrun workers)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.tests_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
            log.write(f"\n[gpu_check] pytest stopped after {args.tests_timeout} s\n")
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome, message = ("failed" if tag == "failure" else tag), node.get("message", "")
                    break
            counts[outcome] += 1
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time", 0)), "message": message[:300]})
    return {"pytest_command": shlex.join(["python", *command[1:]]), "returncode": returncode,
            "timed_out": returncode is None,
            "seconds": round(time.perf_counter() - start, 1), "counts": counts, "tests": tests,
            "log": "gpu_tests.log", "junit": "gpu_tests.xml"}


# --------------------------------------------------------------------------------------------------- driver


def environment() -> dict[str, Any]:
    found = {"python": platform.python_version(), "platform": platform.platform(),
             "cuda_available": torch.cuda.is_available(), "checks_use_cuda": cuda()}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "tokenizers", "bridgeprobe"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(device=props.name, device_memory_bytes=props.total_memory, cuda_version=torch.version.cuda)
    found["bitsandbytes_usable"] = bitsandbytes_version()
    return found


class Report:
    """The JSON under construction, rewritten (atomically) after every check."""

    def __init__(self, args: argparse.Namespace, out: Path, clock: Clock) -> None:
        self.args, self.out, self.clock = args, out, clock
        self.data: dict[str, Any] = {"script": SCRIPT, "command": shlex.join(["python", SCRIPT, *args.argv]),
                                     "tiny": args.tiny, "budget_s": args.budget_s, "environment": environment(),
                                     "checks": {}}

    def command(self, check: str, shape: str | None) -> str:
        parts = ["python", SCRIPT, *(["--tiny"] if self.args.tiny else []), "--only", check]
        if shape:
            parts += ["--shapes", shape]
        return shlex.join(parts)

    def run(self, check: str, shape: str | None, fn: Callable[[], dict[str, Any]]) -> None:
        key = f"{shape}/{check}" if shape else check
        entry: dict[str, Any] = {"command": self.command(check, shape)}
        if self.clock.left() < NEEDS_S[check] * (0.05 if self.args.tiny else 1):
            entry["status"] = f"skipped: time budget ({self.clock.left():.0f} s left)"
        else:
            start = time.perf_counter()
            try:
                result = fn()
                entry["status"] = result.pop("status", "ok")
                entry.update(result)
            except Exception as err:  # noqa: BLE001  (record any failure and go on with the next check)
                entry["status"] = f"failed: {type(err).__name__}: {str(err)[:500]}"
                entry["traceback"] = traceback.format_exc()[-3000:]
            entry["check_s"] = round(time.perf_counter() - start, 2)
            free_cuda()
        print(f"[gpu_check] {key}: {entry['status']} ({entry.get('check_s', 0)} s)", flush=True)
        self.data["checks"][key] = entry
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.clock.budget_s - self.clock.left(), 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")
        (self.out / "gpu_check.txt").write_text(summary(self.data))


def summary(data: dict[str, Any]) -> str:
    """A few lines per check: its status and headline figures."""
    env = data["environment"]
    lines = [f"gpu_check ({'tiny, CPU' if data['tiny'] else env.get('device', 'no CUDA')}; torch {env['torch']}, "
             f"transformers {env['transformers']}, bitsandbytes {env['bitsandbytes_usable']}); "
             f"{data.get('elapsed_s')} s of {data['budget_s']} s", f"command: {data['command']}"]
    for key, c in data["checks"].items():
        lines.append(f"- {key}: {c['status']}")
        if not c["status"].startswith("ok"):
            continue
        check = key.split("/")[-1]
        if check == "gpu_tests":
            lines.append(f"    {c['counts']} in {c['seconds']} s")
        elif check == "build":
            lines.append(f"    {c['parameters'] / 1e9:.2f} B parameters in {c['seconds']} s; weights "
                         f"{gib(c['weight_bytes_allocated'])} GiB allocated vs {gib(c['weight_bytes_formula'])} GiB formula")
        elif check == "lens":
            for r in c["runs"]:
                if "queries_per_s" in r:
                    lines.append(f"    batch {r['batch_size']}{' (auto)' if r['auto'] else ''}: {r['queries_per_s']} "
                                 f"queries/s, peak {gib(r['peak_over_weights_bytes'])} GiB vs estimate "
                                 f"{gib(r['estimate_bytes'])} GiB")
            worst = max((a["logprob_max_abs_diff"] for a in c["rows_vs_batch_size"]["by_batch_size"].values()),
                        default=0.0)
            lines.append(f"    rows across batch sizes: max |logprob diff| {worst:.2e}")
        elif check == "sweep":
            lines.append(f"    {c['cells']} cells: fast {c['fast_s']} s vs naive {c['naive_s']} s ({c['speedup']}x; "
                         f"{c['fast_forward_equivalents']} vs {c['naive_forward_equivalents']} forward-equivalents), "
                         f"max |metric diff| {c['metric_max_abs_diff']:.2e} (scale {c['metric_scale']:.3g}, agrees: "
                         f"{c['agrees']}); peak "
                         f"{gib(c['fast_peak_bytes'])} / {gib(c['naive_peak_bytes'])} GiB")
        elif check == "attribution":
            lines.append(f"    {c['seconds']} s = {c['forward_equivalents_measured']} forwards of the pair "
                         f"(naive sweep: {c['naive_forward_equivalents']})")
        elif check == "memory":
            lines.append(f"    {c['items']} items, stride {c['stride']}: {c['seconds']} s ({c['seconds_per_item']} s "
                         f"per item; {c['timings']}), {c['rows']} rows, peak {gib(c['peak_bytes'])} GiB")
        elif check == "oom_lens":
            lines.append(f"    {c['trigger']}: batch {c['batch_size_planned']} -> {c['batch_size_used']} "
                         f"({c['cuda_ooms']} CUDA OOMs, {c['simulated_ooms']} simulated); same file as a plain run: "
                         f"{c['same_file_as_plain_run']}")
        elif check == "oom_sweep":
            lines.append(f"    {c['trigger']}: {c['cuda_ooms']} CUDA OOMs, {c['simulated_ooms']} simulated; max "
                         f"|metric diff| vs plain {c['metric_max_abs_diff']:.2e} (agrees: {c['agrees']})")
        elif check == "device_map":
            lines.append(f"    {c['modules_per_device']}: lens max |logprob diff| "
                         f"{c['lens']['logprob_max_abs_diff']:.2e}, sweep max |metric diff| "
                         f"{c['sweep']['metric_max_abs_diff']:.2e} (agrees: {c['sweep']['agrees']})")
        elif check == "quantized":
            for v in ("8bit", "4bit"):
                q = c.get(v)
                if q:
                    lines.append(f"    {v}: weights {gib(q['weight_bytes_allocated'])} GiB vs "
                                 f"{gib(q['weight_bytes_formula'])} GiB formula; lens {q['lens_queries_per_s']} "
                                 f"queries/s; rank Spearman vs bf16 {q['vs_bfloat16']['rank_spearman']:.3f}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU in fp32 (the CI dry run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check"),
                        help="output folder (default: $OUT, else ./gpu_check)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="checks to run (default all)")
    parser.add_argument("--shapes", nargs="+", help="model shapes (default: both of the mode)")
    parser.add_argument("--budget-s", type=float, help="stop starting checks after this (default 420; tiny 120)")
    parser.add_argument("--tests-timeout", type=float, help="seconds for pytest -m gpu (default 150; tiny 60)")
    parser.add_argument("--items", type=int, help="prompt items (a lens query per probe each; default 64, tiny 4)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="lens batch sizes, besides the automatic one (default 8 32 128; tiny 4)")
    parser.add_argument("--ckpt-layers", type=int, default=3, help="blocks of the saved checkpoint (device_map, "
                        "quantized)")
    args = parser.parse_args(argv)
    args.argv = argv
    defaults = {"budget_s": (120.0, 420.0), "tests_timeout": (60.0, 150.0), "items": (4, 64),
                "batch_sizes": ([4], [8, 32, 128])}
    for name, (tiny, gpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    USE_CUDA["on"] = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        torch.set_num_threads(1)
    report = Report(args, args.out, clock)
    configs = shape_configs(args.tiny)
    shapes = args.shapes or list(configs)
    unknown = set(shapes) - set(configs)
    if unknown:
        print(f"unknown shape(s) {sorted(unknown)}; choose from {sorted(configs)}", file=sys.stderr)
        return 2
    if "gpu_tests" in args.only:
        report.run("gpu_tests", None, lambda: check_gpu_tests(args, args.out))
    wanted = [c for c in SHAPE_CHECKS if c in args.only or (c == "build" and set(args.only) & set(SHAPE_CHECKS))]
    for index, name in enumerate(shapes):
        if index == 1:  # the checkpoint checks before the second shape: they matter more than its repeat
            checkpoint_checks(report, args, configs[shapes[0]], shapes[0])
        if wanted:
            shape_checks(report, args, clock, name, configs[name], wanted)
    if len(shapes) == 1:
        checkpoint_checks(report, args, configs[shapes[0]], shapes[0])
    report.write()
    print(summary(report.data), end="")
    return 0


def shape_checks(report: Report, args: argparse.Namespace, clock: Clock, name: str, config: Any,
                 wanted: list[str]) -> None:
    """Build the model of one shape and run its checks (``wanted``, "build" first)."""
    holder: dict[str, Shape] = {}

    def build() -> dict[str, Any]:
        holder["shape"] = Shape(name, config, args)
        return check_build(holder["shape"])

    report.run("build", name, build)
    checks = {"lens": lambda shape: check_lens(shape, args, clock), "sweep": check_sweep,
              "attribution": check_attribution, "memory": check_memory, "oom_lens": check_oom_lens, "oom_sweep": check_oom_sweep}
    for check in wanted[1:]:
        if "shape" not in holder:
            report.data["checks"][f"{name}/{check}"] = {"command": report.command(check, name),
                                                        "status": "skipped: the model was not built"}
            continue
        report.run(check, name, lambda fn=checks[check]: fn(holder["shape"]))
    if "shape" in holder:
        holder.pop("shape").close()
    report.write()


def checkpoint_checks(report: Report, args: argparse.Namespace, config: Any, base: str) -> None:
    """device_map and quantized, on one checkpoint of ``base``'s shape saved once (when one of them runs)."""
    ckpt_checks = [c for c in ("device_map", "quantized") if c in args.only]
    if ckpt_checks:
        with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt") as tmp:
            ckpt = Path(tmp) / "model"
            items = prompt_items(args.items)
            saved: dict[str, bool] = {}

            def save() -> None:
                if not saved:
                    save_checkpoint(config, word_tokenizer(items, config.vocab_size), args.ckpt_layers, ckpt)
                    saved["ok"] = True

            def run_on_checkpoint(check: str) -> dict[str, Any]:
                if check == "quantized" and quantized_unavailable():
                    return {"status": quantized_unavailable()}
                save()
                fn = check_device_map if check == "device_map" else check_quantized
                return {"checkpoint": f"{base}, {args.ckpt_layers} blocks", **fn(ckpt, items)}

            for check in ckpt_checks:
                report.run(check, None, lambda check=check: run_on_checkpoint(check))


if __name__ == "__main__":
    sys.exit(main())
