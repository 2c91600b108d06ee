"""Attribution patching vs exact patching on the bundled pairs: how well the first-order estimate ranks sites,
and what it costs.

For the first N curated pairs and the sites resid_pre, attn_out and mlp_out, runs the exact fast sweep and the
attribution estimate, and reports per site the Pearson and Spearman correlation of their normalized recoveries
over all (pair, layer, position) cells, and the seconds each took.

    python tests/benchmarks/bench_attribution.py [--model smollm2-135m] [--pairs 16]
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from bridgeprobe.probes.readouts.attribution import attribution_sweep
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.probes.readouts.patching import sweep
from bridgeprobe.probes.runs.pipeline import item_pairs
from bridgeprobe.prompts.loaders import load_prompts

SITES = ("resid_pre", "attn_out", "mlp_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    hooked = NativeHooks(model, tokenizer)
    pairs = item_pairs(load_prompts("curated"), tokenizer, skip_unequal=True)[0]
    step = max(1, len(pairs) // args.pairs)  # spread over the compositions
    pairs = pairs[::step][: args.pairs]
    exact, estimate, seconds = [], [], {"exact": 0.0, "attribution": 0.0}
    for named in pairs:
        start = time.perf_counter()
        for site in SITES:
            exact.append(sweep(hooked, named.pair, site).frame.assign(clean_id=named.clean_id))
        seconds["exact"] += time.perf_counter() - start
        start = time.perf_counter()
        estimate.append(attribution_sweep(hooked, named.pair, sites=SITES).frame.assign(clean_id=named.clean_id))
        seconds["attribution"] += time.perf_counter() - start
    keys = ["clean_id", "site", "layer", "position"]
    both = pd.concat(exact).merge(pd.concat(estimate), on=keys, suffixes=("_exact", "_attribution"))
    result = {"model": args.model, "pairs": len(pairs), "cells": len(both),
              "seconds": {k: round(v, 1) for k, v in seconds.items()}, "sites": {}}
    for site, sub in both.groupby("site"):
        result["sites"][site] = {
            "pearson": round(sub["value_exact"].corr(sub["value_attribution"]), 3),
            "spearman": round(sub["value_exact"].rank().corr(sub["value_attribution"].rank()), 3),
            "mean_abs_error": round(float((sub["value_exact"] - sub["value_attribution"]).abs().mean()), 3),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
