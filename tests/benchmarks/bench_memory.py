"""Benchmark: the shared-memory analysis (``probes.memory.analysis.run_memory``) as it runs now against the code before its
speed-up, same process, same items; the values must agree.

    python tests/benchmarks/bench_memory.py [--model smollm2-135m] [--items 12] [--stride 4] [--threads 2]

"Before" is today's engine with the two changes undone (docs/benchmarks.md, shared memory):
- the logits of every patched variant came from the model's own output head on a slice of the last positions,
  which PyTorch on the CPU multiplies as one matrix-vector product per row against an expanded copy of the
  unembedding (now: one contiguous matrix product, :meth:`NativeHooks.run_from` and
  :func:`probes.model.load.contiguous_head`);
- the ranks of the candidate tokens compared the whole ``[rows, vocab]`` logit matrix once per candidate (now: one
  row at a time, in cache, :func:`probes.memory.rows.candidate_measure`);
- the alignment's probes were fitted one after another with all of torch's intra-op threads (now: on a pool of
  threads, one thread per fit, :func:`probes.memory.alignment.fit_pool`), each from zero (now: a layer's probes without
  some relations' hop2 prompts start from its templates-only probe, ``LinearProbe(start=...)``). The alignment's
  reads of a two-hop prompt's two latent positions in one forward (once two) stay in both runs.

``--analyses alignment --items 160`` times the alignment on a realistic number of classes (docs/benchmarks.md).

Prints seconds per analysis for both, their ratio, and the differences of every ``memory.csv`` value: the largest
absolute difference of the values that are neither ranks nor probe indicators, how many probe indicators (0/1:
the probe named the bridge) differ, and how many ranks differ (by how much) and whether any top-1 / top-10
indicator differs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

import bridgeprobe.probes.memory.alignment as alignment
import bridgeprobe.probes.memory.analysis as memory
import bridgeprobe.probes.memory.plans as plans
import bridgeprobe.probes.memory.rows as rows
import bridgeprobe.probes.readouts.lens as lens
from bridgeprobe.probes.model.architecture import head_logits
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.prompts.loaders import load_prompts

KEYS = ["analysis", "prompt_id", "condition", "source_id", "receiving_id", "source_position", "source_layer",
        "target_layer", "metric"]


def _whole_matrix_measure(tokens):  # the rank computation before the speed-up
    index = torch.tensor(list(tokens))

    def measure(logits, _resid):
        logits = logits.float()
        chosen = logits[:, index.to(logits.device)]
        ranks = torch.stack([(logits > chosen[:, k : k + 1]).sum(-1) for k in range(len(index))], -1)
        return torch.cat([chosen, ranks.float(), chosen - logits.logsumexp(-1, keepdim=True)], -1)

    return measure


def _recentred_jackknife(x, z, rng, groups=alignment.JACKKNIFE_GROUPS):  # the jackknife before the speed-up
    gx, gz = x.astype(np.float64) @ x.T.astype(np.float64), z.astype(np.float64) @ z.T.astype(np.float64)

    def center(gram):
        return gram - gram.mean(0, keepdims=True) - gram.mean(1, keepdims=True) + gram.mean()

    labels = rng.permutation(len(x)) % min(groups, len(x))
    values = []
    for g in np.unique(labels):
        keep = np.flatnonzero(labels != g)
        k, l = center(gx[np.ix_(keep, keep)]), center(gz[np.ix_(keep, keep)])
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))
    values = np.array(values)
    n = len(values)
    se = float(np.sqrt((n - 1) / n * np.nansum((values - np.nanmean(values)) ** 2)))
    k, l = center(gx), center(gz)
    estimate = float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))
    return estimate, estimate - alignment.Z95 * se, estimate + alignment.Z95 * se


class _InCallingThread:
    """The probe fits as they ran before :func:`probes.memory.alignment.fit_pool`: one after another, every intra-op thread."""

    def map(self, fit, layers):
        return map(fit, layers)


class _FromZero(alignment.LinearProbe):
    """The probes as they were fitted before: every one from zero."""

    def __init__(self, *args, start=None, **kwargs):
        super().__init__(*args, **kwargs)


@contextmanager
def _serial_fits(workers: int | None = None) -> Iterator[_InCallingThread]:
    yield _InCallingThread()


@contextmanager
def before_speedup(model: torch.nn.Module) -> Iterator[None]:
    """Undo the changes for the duration: the head multiplies a non-contiguous slice of the normed last
    positions (what the HF forward with ``logits_to_keep`` handed it; rebuilt here as a strided view of the same
    shape), the ranks compare the whole logit matrix once per candidate, the probes are fitted one after
    another with every thread, the reference forwards run one item at a time, each state's lens ranks are one
    unembedding, the alignment reads every prompt itself, and the jackknife recentres per group."""
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    original_readout, original_measure = NativeHooks.readout, rows.candidate_measure

    def readout(self, hidden):
        if hidden.dim() != 3:  # the 2-D readouts (reference runs, lens rows) were contiguous before too
            return original_readout(self, hidden)
        normed = self.modules.final_norm(hidden)
        strided = torch.cat([normed, normed], dim=1)[:, : normed.shape[1]]  # a slice, as the HF forward made it
        return head_logits(self.model.config, head(strided))

    original_pool, original_probe = alignment.fit_pool, alignment.LinearProbe
    original_jackknife, original_states = alignment.jackknife_cka, memory.reference_states
    original_runs, original_ranks = memory.reference_runs, lens.token_ranks
    NativeHooks.readout, rows.candidate_measure, alignment.fit_pool = readout, _whole_matrix_measure, _serial_fits
    alignment.LinearProbe, alignment.jackknife_cka = _FromZero, _recentred_jackknife
    memory.reference_states = lambda plan, sources: {}  # nothing kept: the alignment reads every prompt itself
    memory.reference_runs = lambda hooked, plans: [s for plan in plans for s in original_runs(hooked, [plan])]
    lens.token_ranks = lambda hooked, hidden, token: torch.stack([  # one state ([L, d]) per unembedding
        original_ranks(hooked, state, own)
        for state, own in zip(hidden, torch.as_tensor(token).expand(hidden.shape[:-1]))])
    try:
        yield
    finally:
        NativeHooks.readout, rows.candidate_measure = original_readout, original_measure
        alignment.fit_pool, alignment.LinearProbe = original_pool, original_probe
        alignment.jackknife_cka, memory.reference_states = original_jackknife, original_states
        memory.reference_runs, lens.token_ranks = original_runs, original_ranks
        head._forward_pre_hooks.update(hooks)


def timed_run(hooked: NativeHooks, items, config: plans.MemoryConfig) -> tuple[float, dict, pd.DataFrame]:
    out = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    run = memory.run_memory(hooked, items, out, config, settings={})
    return time.perf_counter() - started, run.timings, pd.read_csv(out / "memory.csv", dtype=str, keep_default_na=False)


def compare(before: pd.DataFrame, after: pd.DataFrame) -> dict:
    merged = before.merge(after, on=KEYS, suffixes=("_before", "_after"), how="outer", indicator=True)
    if (merged["_merge"] != "both").any():
        raise SystemExit(f"the runs wrote different rows: {merged['_merge'].value_counts().to_dict()}")
    a, b = pd.to_numeric(merged["value_before"]), pd.to_numeric(merged["value_after"])
    rank = merged["metric"].str.contains("rank")
    probe = merged["metric"].str.startswith("probe_")
    diff = (a - b).abs()

    def largest(mask: pd.Series) -> float:
        return float(diff[mask].max()) if mask.any() else 0.0

    return {"rows": len(merged), "max_abs_difference_non_rank": largest(~rank & ~probe),
            "probe_indicators": int(probe.sum()), "probe_indicators_differing": int((diff[probe] > 0).sum()),
            "ranks_differing": int((diff[rank] > 0).sum()), "ranks": int(rank.sum()),
            "largest_rank_difference": largest(rank),
            "top1_indicators_differing": int(((a[rank] < 1) != (b[rank] < 1)).sum()),
            "top10_indicators_differing": int(((a[rank] < 10) != (b[rank] < 10)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=12, help="analysed items, all with maps and decoding")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--analyses", default=",".join(plans.ANALYSES), help="comma-separated (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    hooked = NativeHooks(model, tokenizer)
    items = load_prompts("curated")
    config = plans.MemoryConfig(n_items=args.items, stride=args.stride, analyses=tuple(args.analyses.split(",")))
    with before_speedup(model):
        before_s, before_t, before = timed_run(hooked, items, config)
    after_s, after_t, after = timed_run(hooked, items, config)
    figures = {"model": args.model, "items": args.items, "stride": args.stride, "threads": args.threads,
               "analyses": args.analyses,
               "before_s": round(before_s, 1), "after_s": round(after_s, 1), "ratio": round(before_s / after_s, 2),
               "before_by_analysis_s": before_t, "after_by_analysis_s": after_t, **compare(before, after)}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
