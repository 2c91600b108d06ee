"""Benchmark: our batched logit lens vs the obvious TransformerLens loop, on the same prompts, same ranks.

Baseline: one ``TransformerBridge.run_with_cache`` per distinct prompt (caching only the resid_post hooks), then
each layer's last-position residual through ``ln_final`` and ``unembed``, as a TransformerLens user writes the
logit lens. Ours: :func:`probes.readouts.lens.lens_batch` with the native backend, batched and padded. Both are timed in
the same process after loading; the ranks must agree (up to float near-ties).

    python tests/benchmarks/bench_lens.py --model smollm2-135m --prompts curated [--limit N] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import batches, lens_batch, lens_queries
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.loaders import load_prompts


def transformer_lens_loop(model: torch.nn.Module, tokenizer, queries) -> dict[tuple, int]:
    """First-target-token rank per (query key, layer) via one run_with_cache per distinct prompt."""
    from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

    bridge = TransformerLensHooks(model, tokenizer).bridge
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
    by_prompt: dict[str, list] = {}
    for q in queries:
        by_prompt.setdefault(q.prompt, []).append(q)
    ranks = {}
    with torch.no_grad():
        for prompt, group in by_prompt.items():
            tokens = torch.tensor([tokenizer(prompt)["input_ids"]])
            _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in names)
            for layer, name in enumerate(names):
                logits = bridge.unembed(bridge.ln_final(cache[name][0, -1]))
                for q in group:
                    target = target_ids(tokenizer, q.prompt, q.target_text)[0]
                    ranks[(q.key, layer)] = int((logits > logits[target]).sum())
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="curated")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    model.set_attn_implementation("eager")  # TransformerBridge runs eager attention; compare like with like
    queries = lens_queries(load_prompts(args.prompts, limit=args.limit))
    hooked = NativeHooks(model, tokenizer)
    lens_batch(hooked, queries[:4])  # warm-up (first-call allocations) for both paths
    start = time.perf_counter()
    rows = [row for batch in batches(queries, tokenizer, args.batch_size) for row in lens_batch(hooked, batch)]
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = transformer_lens_loop(model, tokenizer, queries)
    tl_s = time.perf_counter() - start

    mismatched = sum(abs(row["rank"] - theirs[((row["prompt_id"], row["prompt_kind"], row["target"]), row["layer"])]) > 1
                     for row in rows)
    result = {
        "model": args.model, "queries": len(queries), "prompts": len({q.prompt for q in queries}),
        "rows": len(rows), "ours_batched_s": round(ours_s, 2), "transformer_lens_loop_s": round(tl_s, 2),
        "speedup": round(tl_s / ours_s, 1), "rank_mismatches": mismatched, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if mismatched:
        raise SystemExit(f"{mismatched} ranks differ by more than a float near-tie")


if __name__ == "__main__":
    main()
