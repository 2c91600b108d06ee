"""Locate the shared latent memory: where the bridge entity that hop 1 computes inside a two-hop prompt lives
relative to where hop 2 reads an explicitly written bridge.

Per item ``A`` (two-hop prompt, bridge ``B_A``, answer ``Y_A``; its ``pair`` partner ``C`` has the same relation
composition, another bridge and answer), four analyses, all on ``resid_post`` (layer ``l`` = the output of block
``l``, as in the logit lens) and all through the patching engine (:func:`probes.readouts.variants.run_variants`):

- ``crosspatch``: A's two-hop state at source layer ``s`` (at its last token, or at the last token of ``e1``) is
  written into C's ``hop2`` prompt ("The capital of Italy is") at the last token of C's bridge, at target layer
  ``t``. Metric at the last position: ``logit(Y_A) - logit(Y_C)`` (``logit_diff``), the rank and probability of
  ``Y_A``, and ``value`` = ``(patched - C's own hop2) / (A's hop2 - C's own hop2)``: 1 = as good as writing A's
  bridge out. Any foreign state written there also *erases* C's bridge, which alone moves ``value`` a long way
  toward 1 (about half of it in SmolLM2), so the ``random`` control is paired with the main map cell by cell:
  the state of a random other item of the same composition whose bridge differs from both, same receiving
  prompt, cells and metric; the bridge-specific effect is ``main - random``. ``other_relation`` (on the
  diagonal ``s = t``): A's state written into the hop2 prompt of an item ``D`` of another second relation whose
  bridge the set also has with A's bridge (item ``E``): "The main language spoken in Italy is" with the state of
  "... where the Eiffel Tower is": ``transfer_value`` (toward French, A's bridge under D's relation) and
  ``answer_value`` (toward Paris, A's answer), both logit differences against ``Y_D`` normalized by E's hop2
  prompt over D's; a state that holds the bridge moves toward French, one that holds the answer toward Paris.
  Its control ``other_relation_random`` writes the random item's state there: the relation a state carries
  (a "capital" question pushes toward capitals) moves both alike, so the bridge-specific reading is A's
  ``transfer - answer`` minus the random item's.
- ``decoding`` (Patchscope-style): the state is written into the placeholder of a few-shot identity prompt
  (:func:`~probes.memory.plans.identity_prompt`; demonstration entities that occur in no item of the set) at the
  same layer (``t = s``) and at a fixed early layer, and the bridge's first-token rank is read at the last
  position; the partner's bridge gives the chance rate of decoding an entity of the same type that is not this
  one. The same is done for the explicit bridge (the hop2 prompt's state at the bridge's last token): the sanity
  check.
  ``lens`` rows: the logit-lens rank of the bridge (and the answer) read from the same states.
- ``backpatch``: for two-hop prompts answered wrongly although both one-hop prompts are right
  (``hops_ok_composition_failed``), and as a control for the correct ones, the last token's state at a later
  layer ``s`` is written into an earlier layer ``t < s`` of the same prompt; rank/prob of ``Y_A``.
- ``alignment`` (:mod:`probes.memory.alignment`): cosine and linear CKA between latent and explicit bridge states per
  layer against mismatched pairs, and a linear probe trained on explicit states, tested on latent ones.

Every item's rows go into ``memory.csv`` (long format, :data:`~probes.memory.plans.COLUMNS`) as soon as its
chunk is done, so an interrupted run resumes per item; the alignment, which needs all items, runs once after them.
The seconds of the work each session committed are kept beside the partial file (:func:`_read_ledger`), so a
resumed run reports the time of the whole analysis, not only of its last session.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
from tqdm.auto import tqdm

from bridgeprobe.probes.runs import distributed
from bridgeprobe.probes.memory.alignment import alignment_rows
from bridgeprobe.probes.memory.plans import (COLUMNS, PLACEHOLDER, SORT_BY, MemoryConfig, Plan, backpatch_cells,
                                             crosspatch_cells, decoding_cells, default_decode_layer, encode,
                                             identity_prompt, make_plans, span_end_position)
from bridgeprobe.probes.memory.rows import (backpatch_rows, crosspatch_rows, decoding_rows, group_of, item_rows,
                                            lens_rows, reference_runs, reference_states)
from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.io.results import atomic_write_json
from bridgeprobe.prompts.sampling import sample_items
from bridgeprobe.prompts.schema import PromptItem


# --------------------------------------------------------------------------------------------------- job


@dataclass
class MemoryRun:
    """What :func:`run_memory` wrote: the memory table (None on the other processes of a data-parallel run), the
    seconds spent per analysis (summed over processes and over the sessions of a resumed run), and counts for
    run.json (``sessions``; ``earlier_sessions_s``, the wall seconds the earlier sessions spent up to their last
    committed rows, which a caller adds to the wall time it measured for this session)."""

    frame: pd.DataFrame | None
    timings: dict[str, float]
    info: dict[str, Any]


def run_memory(hooked: HookedModel, items: Sequence[PromptItem], out_dir: Path, config: MemoryConfig, *,
               settings: dict[str, Any], name: str = "memory") -> MemoryRun:
    """Write ``out_dir/NAME.csv`` for ``items`` (partners and controls may be any item of the set; the analysed
    ones are :func:`~prompts.sampling.sample_items` of ``config.n_items``), resuming an interrupted run. Data-parallel
    (:mod:`probes.runs.distributed`): the processes share the chunks of items; rank 0 runs the alignment and writes
    the file."""
    started = time.perf_counter()
    tokenizer, n_layers = hooked.tokenizer, hooked.n_layers
    encoded = {item.id: encode(tokenizer, item) for item in items}
    analysed = sample_items(items, config.n_items, seed=config.seed)
    plans = make_plans(encoded, [item.id for item in analysed], config.seed,
                       maps=[item.id for item in sample_items(analysed, config.map_items, seed=config.seed)])
    decode_layer = default_decode_layer(n_layers) if config.decode_layer is None else config.decode_layer
    cells = {"crosspatch": crosspatch_cells(n_layers, config.stride),
             "diagonal": [(l, l) for l in range(n_layers - 1)],
             "backpatch": backpatch_cells(n_layers, config.stride),
             "decoding": decoding_cells(n_layers, decode_layer)}
    prompt, demos = identity_prompt(items)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    placeholder = span_end_position(tokenizer, prompt, f"\n{PLACEHOLDER}")
    if placeholder is None or placeholder != len(prompt_ids) - 2:
        raise ValueError(f"the identity prompt's placeholder {PLACEHOLDER!r} must be one token right before the "
                         f"last one; got tokens {[tokenizer.decode([t]) for t in prompt_ids[-4:]]}")

    shards = distributed.context()
    store = shards.store(out_dir, name, COLUMNS, {**settings, **config.settings(), "identity_prompt": prompt})
    done_keys = store.done(["analysis", "prompt_id"])
    done = shards.union({pid for analysis, pid in done_keys if analysis == "item"})
    alignment_done = bool(shards.union({pid for analysis, pid in done_keys if analysis == "alignment"}))
    ledger = store.partial.with_name(f".{name}.timings.json")
    earlier = _read_ledger(ledger if done_keys else None)  # no committed rows: a fresh run, a stale ledger
    todo = [p for p in plans if p.a.item.id not in done]
    chunks = shards.shard([todo[i : i + config.batch_items] for i in range(0, len(todo), config.batch_items)])
    timings: dict[str, float] = defaultdict(float)

    def commit(rows: list[dict[str, Any]]) -> None:
        store.append(rows)
        _write_ledger(ledger, earlier, timings, time.perf_counter() - started)

    wanted = set(config.analyses)
    # the reference forwards' states of the items' own prompts, which the alignment reads again (this session's)
    states_read: dict[tuple[tuple[int, ...], int], Any] = {}
    keep_states = "alignment" in wanted and not alignment_done and shards.is_main
    total = sum(len(c) for c in chunks)
    with tqdm(total=total, desc="memory", unit="item", disable=not total or not shards.is_main) as bar:
        for chunk in chunks:
            rows, ran = [], []
            with _timed(timings, "reference_s"):
                chunk_sources = reference_runs(hooked, chunk)
            for plan, sources in zip(chunk, chunk_sources):
                if keep_states:
                    states_read.update(reference_states(plan, sources))
                group = group_of(plan, sources)
                if "crosspatch" in wanted and plan.maps and plan.c is not None:
                    with _timed(timings, "crosspatch_s"):
                        rows += crosspatch_rows(hooked, plan, sources, cells["crosspatch"], cells["diagonal"],
                                                config.method)
                if "backpatch" in wanted and group in config.backpatch_groups:
                    with _timed(timings, "backpatch_s"):
                        rows += backpatch_rows(hooked, plan, sources, group, cells["backpatch"], config.method)
                ran.append((plan, sources))
                rows += item_rows(plan, group, sources)
                bar.update(1)  # per item; the chunk's decoding runs after its items
            if "decoding" in wanted:
                bar.set_postfix_str("decoding the chunk")
                with _timed(timings, "decoding_s"):
                    rows += lens_rows(hooked, ran)
                    rows += decoding_rows(hooked, [(p, s) for p, s in ran if p.maps], prompt_ids, placeholder,
                                          cells["decoding"], config.method)
            commit(rows)
            bar.set_postfix_str("")
    if "alignment" in wanted and not alignment_done and shards.is_main:
        with _timed(timings, "alignment_s"):
            rows = alignment_rows(hooked, plans, encoded, seed=config.seed, known=states_read)
        commit(rows)
    totals: dict[str, float] = defaultdict(float)
    parts = shards.all_gather((dict(timings), earlier))
    for current, previous in parts:
        for key, value in [*current.items(), *previous["analyses"].items()]:
            totals[key] += value
    ledger.unlink(missing_ok=True)  # before the partial file goes: a ledger never outlives its rows
    frame = shards.finish(store, sort_by=list(SORT_BY))
    info = {"n_items": len(plans), "map_items": sum(p.maps for p in plans), "resumed_items": len(plans) - len(todo),
            "sessions": max(previous["sessions"] for _, previous in parts) + 1,
            "earlier_sessions_s": round(max(previous["elapsed_s"] for _, previous in parts), 3),
            "identity_prompt": prompt, "demonstrations": demos, "decode_layer": decode_layer, "cells": {k: len(v) for k, v in cells.items()},
            "skipped": _skip_counts(plans)}
    return MemoryRun(frame, {k: round(v, 3) for k, v in totals.items()}, info)


def _read_ledger(path: Path | None) -> dict[str, Any]:
    """The timings of the earlier sessions of an interrupted run, from ``path`` (``.NAME.timings.json`` beside
    the partial file): ``sessions``, ``elapsed_s`` (their wall seconds up to their last committed rows) and
    ``analyses`` (seconds per analysis). None or no file: no earlier session."""
    if path is None or not path.is_file():
        return {"sessions": 0, "elapsed_s": 0.0, "analyses": {}}
    try:
        ledger = json.loads(path.read_text())
        return {"sessions": int(ledger["sessions"]), "elapsed_s": float(ledger["elapsed_s"]),
                "analyses": {str(k): float(v) for k, v in ledger["analyses"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable timings of an interrupted run ({error}); delete the file to resume "
                         "without the earlier sessions' time") from error


def _write_ledger(path: Path, earlier: dict[str, Any], timings: dict[str, float], elapsed: float) -> None:
    """Commit this session's seconds so far, added to ``earlier``'s (written right after each committed batch of
    rows, so it counts exactly the work a resumed run keeps)."""
    analyses = defaultdict(float, earlier["analyses"])
    for key, value in timings.items():
        analyses[key] += value
    atomic_write_json(path, {"sessions": earlier["sessions"] + 1,
                             "elapsed_s": round(earlier["elapsed_s"] + elapsed, 3),
                             "analyses": {k: round(v, 3) for k, v in analyses.items()}})


def _skip_counts(plans: Iterable[Plan]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for plan in plans:
        for analysis, why in plan.skipped.items():
            counts[f"{analysis}: {why}"] += 1
    return dict(counts)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``."""
    started = time.perf_counter()
    yield
    timings[key] += time.perf_counter() - started
