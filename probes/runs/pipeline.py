"""Jobs behind the CLI: load a model, hook it, run a probe over a prompt set with resumable output, and record
``run.json`` (model, versions, seed, settings, timings)."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from bridgeprobe.probes.runs import distributed
from bridgeprobe.probes.model.hooks import HookedModel, NativeHooks
from bridgeprobe.probes.readouts.lens import COLUMNS, LensQuery, auto_batch_size, batches, lens_batch, lens_queries
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.probes.readouts.patching import Pair
from bridgeprobe.probes.io.results import IncrementalCSV
from bridgeprobe.probes.runs.rundir import model_location
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.probes.readouts.variants import is_oom
from bridgeprobe.prompts.schema import PromptItem

BACKENDS = ("native", "transformer-lens")
COMMAND_LINE: str | None = None  # the command as typed (set by the CLI's main), kept in run.json for the pages
log = logging.getLogger(__name__)


def hook_model(model: torch.nn.Module, tokenizer: Any, backend: str = "native") -> HookedModel:
    """Wrap a loaded HF model in the chosen hooking backend."""
    if backend == "native":
        return NativeHooks(model, tokenizer)
    if backend == "transformer-lens":
        from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

        return TransformerLensHooks(model, tokenizer)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


@dataclass
class ModelOptions:
    """How to load and hook the model (the CLI's model flags)."""

    model: str
    backend: str = "native"
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    max_memory: dict[int | str, str] | None = None
    quantize: str | None = None
    offline: bool = False
    trust_remote_code: bool = False
    adapter: str | None = None  # a peft adapter directory applied to the model (probes.model.load.apply_adapter)

    def load(self) -> HookedModel:
        """Load and hook the model; in a data-parallel run, this process's replica on its own GPU(s)
        (:meth:`probes.runs.distributed.Shards.placement`)."""
        implied_map = "auto" if self.quantize and self.device is None else None  # load_model's choice for it
        device, max_memory = distributed.context().placement(self.device, self.device_map or implied_map,
                                                             self.max_memory)
        model, tokenizer = load_model(
            self.model, dtype=self.dtype, device=device, device_map=self.device_map,
            max_memory=max_memory, quantize=self.quantize, offline=self.offline,
            trust_remote_code=self.trust_remote_code, adapter=self.adapter,
        )
        return hook_model(model, tokenizer, self.backend)


def placement(model: Any) -> str:
    """Where the model's weights are: one device (``cpu``, ``cuda:0``), or the devices of a sharded model."""
    devices = sorted({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(devices) > 1:
        return "sharded over " + ", ".join(devices)
    return str(next(model.parameters()).device)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("bridgeprobe", "torch", "transformers", "accelerate", "transformer-lens", "bitsandbytes", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


class Timer:
    """Named wall-clock timings in seconds, for ``run.json``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 3)


@dataclass
class LensRun:
    """What :func:`run_lens` wrote: ``lens.csv`` (None on the other processes of a data-parallel run), the queries
    that an interrupted run had already done (all processes), the batch size planned and the one in force at the
    end (smaller after an out-of-memory back-off in any process)."""

    frame: pd.DataFrame | None
    resumed: int
    batch_size: int
    batch_size_used: int


def run_lens(
    hooked: HookedModel,
    items: Sequence[PromptItem],
    out_dir: Path,
    *,
    settings: dict[str, Any],
    batch_size: int | None = None,
    all_positions: bool = False,
) -> LensRun:
    """Write ``out_dir/lens.csv`` for ``items``, resuming an interrupted run. ``batch_size`` (queries per forward)
    None: :func:`~probes.readouts.lens.auto_batch_size` (from free GPU memory; 16 on the CPU). A batch that runs out of
    memory is halved and retried, and the batches after it keep the smaller size. Data-parallel
    (:mod:`probes.runs.distributed`): the processes take turns over the same batches a single process would run, and
    rank 0 writes ``lens.csv``."""
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch size must be at least 1")
    shards = distributed.context()
    # target_tokens: lens.csv files of the first-token-of-" target" convention must not be resumed into
    store = shards.store(out_dir, "lens", COLUMNS, {**settings, "all_positions": all_positions,
                                                    "target_tokens": "in_context"})
    done = shards.union(store.done(["prompt_id", "prompt_kind", "target"]))
    queries = lens_queries(items, hooked.tokenizer)
    todo = [q for q in queries if q.key not in done]
    if batch_size is None:  # every process must plan the same batches: take the smallest choice
        batch_size = min(shards.all_gather(auto_batch_size(hooked, todo, all_positions=all_positions)))
    planned = shards.shard(list(batches(todo, hooked.tokenizer, batch_size)))
    total = sum(len(b) for b in planned)
    with tqdm(total=total, desc="logit lens", unit="query", disable=not total or not shards.is_main) as bar:
        used = _lens_batches(hooked, planned, store, all_positions, bar, batch_size)
    frame = shards.finish(store, sort_by=["prompt_kind", "target", "prompt_id", "layer", "position"])
    return LensRun(frame, len(queries) - len(todo), batch_size, min(shards.all_gather(used)))


def _lens_batches(hooked: HookedModel, planned: Sequence[list[LensQuery]], store: IncrementalCSV,
                  all_positions: bool, bar: tqdm, size: int) -> int:
    """Run and store the planned batches (of ``size`` queries) in order; on out-of-memory halve the failed batch
    and every later one. Returns the batch size in force at the end."""
    pending = deque(planned)
    while pending:
        batch = pending.popleft()
        try:
            rows = lens_batch(hooked, batch, all_positions=all_positions)
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err) or len(batch) == 1:
                raise
            rows = None  # leave the except block first, so that the failed batch's tensors can be freed
        if rows is None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = len(batch) // 2
            log.warning("logit lens: out of memory with %d queries per batch; retrying with %d", len(batch), size)
            rest = [q for b in (batch, *pending) for q in b]
            pending = deque(rest[i : i + size] for i in range(0, len(rest), size))
            continue
        store.append(rows)
        bar.update(len(batch))
    return size


def run_record(command: str, hooked: HookedModel, options: ModelOptions, settings: dict[str, Any],
               timer: Timer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``run.json``; ``timer.timings`` is shared, so later sections still land in it."""
    return {
        "command": command,
        **({"command_line": COMMAND_LINE} if COMMAND_LINE else {}),
        "model": options.model,
        "model_path": model_location(options.model),  # absolute for local paths: what later readers load
        "model_class": type(hooked.model).__name__,
        "n_layers": hooked.n_layers,
        "d_model": hooked.d_model,
        "backend": options.backend,
        "load": {k: v for k, v in vars(options).items() if k not in ("model", "backend")},
        "placement": placement(hooked.model),
        "versions": versions(),
        "seed": settings.get("seed"),
        "settings": settings,
        "timings": timer.timings,
        **({"processes": distributed.context().world_size} if distributed.context().active else {}),
        **(extra or {}),
    }


PATCH_COLUMNS = ("clean_id", "corrupt_id", "site", "layer", "position", "position_from_end", "head", "token",
                 "value", "metric", "clean_prob", "clean_metric", "corrupt_metric")


@dataclass(frozen=True)
class NamedPair:
    """A patching pair built from two prompt items: the clean item's two-hop prompt and answer vs its partner's."""

    clean_id: str
    corrupt_id: str
    pair: Pair
    tokens: tuple[str, ...]  # the clean prompt's tokens, for heatmap labels
    bridge_token: int  # first token of the clean item's bridge after its two-hop prompt, for the lens-rank readout


def item_pairs(items: Sequence[PromptItem], tokenizer: Any, corrupt_items: Sequence[PromptItem] | None = None,
               *, skip_unequal: bool = False) -> tuple[list[NamedPair], list[str]]:
    """Ordered (clean, corrupted) pairs: each item against its ``pair`` partner, or against the item on the same
    line of ``corrupt_items``. Pairs whose prompts tokenize to different lengths are an error naming them, or
    skipped (and returned as messages) with ``skip_unequal``."""
    if corrupt_items is not None:
        if len(corrupt_items) != len(items):
            raise ValueError(f"{len(items)} clean items but {len(corrupt_items)} corrupted items; pair them line by line")
        matches = list(zip(items, corrupt_items))
    else:
        by_id = {item.id: item for item in items}
        matches = [(item, by_id[item.pair]) for item in items if item.pair in by_id]
        if not matches:
            raise ValueError("no item has a 'pair' partner in the set; pass --corrupt-prompts FILE instead")
    pairs, skipped = [], []
    for clean, corrupt in matches:
        try:
            pair = Pair.from_text(tokenizer, clean.two_hop, corrupt.two_hop, clean.answer, corrupt.answer)
        except ValueError as err:
            message = f"pair {clean.id} / {corrupt.id}: {err}"
            if not skip_unequal:
                raise ValueError(message + " (or pass --skip-unequal)") from err
            skipped.append(message)
            continue
        tokens = tuple(tokenizer.decode([t]) for t in pair.clean)
        bridge = target_ids(tokenizer, clean.two_hop, clean.bridge)[0]
        pairs.append(NamedPair(clean.id, corrupt.id, pair, tokens, bridge))
    return pairs, skipped


@dataclass
class PatchingRun:
    """What :func:`run_patching` wrote: the patching table, the bridge-rank table (when asked for), the seconds
    spent in the sweeps themselves and their forward-equivalents (summed over the processes of a data-parallel
    run, whose other processes get None for both tables)."""

    frame: pd.DataFrame | None
    bridge: pd.DataFrame | None
    sweep_s: float
    forward_equivalents: float


def run_patching(
    hooked: HookedModel,
    pairs: Sequence[NamedPair],
    out_dir: Path,
    *,
    sites: Sequence[str],
    method: str,
    direction: str,
    settings: dict[str, Any],
    name: str = "patching",
    bridge_rank: bool = False,
) -> PatchingRun:
    """Write ``out_dir/NAME.csv`` (resumable, one batch of rows per pair) and, with ``bridge_rank`` (exact
    patching only), ``NAME_bridge.csv``: the clean bridge's logit-lens rank after each patch, read in the same
    sweep (:class:`probes.readouts.patching.SweepResult` ``bridge``). ``method``: ``exact`` or ``attribution``;
    ``sites``: any of :data:`probes.model.hooks.SITES` and ``head``."""
    from bridgeprobe.probes.readouts.attribution import attribution_sweep
    from bridgeprobe.probes.readouts.patching import BRIDGE_COLUMNS, HEAD, head_sweep, sweep

    if method not in ("exact", "attribution"):
        raise ValueError(f"method must be exact or attribution, got {method!r}")
    if bridge_rank and method != "exact":
        raise ValueError("the bridge-rank readout needs exact patching (--method exact)")
    shards = distributed.context()  # data-parallel: each process sweeps every N-th pair not done yet
    store = shards.store(out_dir, name, PATCH_COLUMNS, settings)
    done = shards.union({key[0] for key in store.done(["clean_id"])})
    bridge_store, bridge_done = None, done
    if bridge_rank:
        bridge_store = shards.store(out_dir, f"{name}_bridge", ("clean_id", "corrupt_id", *BRIDGE_COLUMNS), settings)
        bridge_done = shards.union({key[0] for key in bridge_store.done(["clean_id"])})
    # a pair is redone unless both tables have it; each table then gets only the rows it lacks (a run stopped
    # between the two appends must not leave a pair twice in one of them)
    finished = done & bridge_done
    todo = shards.shard([p for p in pairs if p.clean_id not in finished])
    sweep_s = forwards = 0.0
    for named in tqdm(todo, desc=f"{method} patching", unit="pair", disable=not todo or not shards.is_main):
        started = time.perf_counter()
        if method == "attribution":
            results = [attribution_sweep(hooked, named.pair, sites=[s for s in sites if s != HEAD],
                                         heads=HEAD in sites, direction=direction)]
        else:
            bridge_token = named.bridge_token if bridge_rank else None
            results = [head_sweep(hooked, named.pair, direction=direction, bridge_token=bridge_token) if site == HEAD
                       else sweep(hooked, named.pair, site, direction=direction, bridge_token=bridge_token)
                       for site in sites]
        sweep_s += time.perf_counter() - started
        rows = []
        for result in results:
            forwards += result.forward_equivalents
            frame = result.frame.assign(
                clean_id=named.clean_id, corrupt_id=named.corrupt_id,
                position_from_end=result.frame["position"] - (named.pair.length - 1),
                token=[named.tokens[p] for p in result.frame["position"]],
                clean_metric=result.clean_metric, corrupt_metric=result.corrupted_metric,
            )
            rows.extend(frame.to_dict("records"))
        if bridge_store is not None and named.clean_id not in bridge_done:
            bridge_store.append(pd.concat([r.bridge for r in results])
                                .assign(clean_id=named.clean_id, corrupt_id=named.corrupt_id).to_dict("records"))
        if named.clean_id not in done:
            store.append(rows)
    frame = shards.finish(store, sort_by=["clean_id", "site", "layer", "position", "head"])
    bridge = (shards.finish(bridge_store, sort_by=["clean_id", "site", "layer", "position", "head", "readout_layer"])
              if bridge_store else None)
    sweep_s, forwards = map(sum, zip(*shards.all_gather((sweep_s, forwards))))  # totals over processes
    return PatchingRun(frame, bridge, round(sweep_s, 3), forwards)
