"""Activation patching over clean/corrupted pairs: how much of a logit difference one site carries.

A :class:`Pair` is a clean and a corrupted token sequence of equal length and two answer tokens. The metric is
the logit difference at the last position, ``logit[clean_answer] - logit[corrupt_answer]``; a patched run is
reported as its raw metric, the clean answer's probability, and the normalized recovery
``value = (patched - corrupted) / (clean - corrupted)`` (for both directions: ``denoise`` copies clean
activations into the corrupted run, where 1 means the site restores the clean behaviour; ``noise`` copies
corrupted activations into the clean run, where 0 means the site alone destroys it). With ``bridge_token`` the
sweep also reads, after each patch, the bridge token's logit-lens rank at the last position at every layer from
the patched one on (``SweepResult.bridge``), beside the receiving run's own rank there.

Cells are ``(site, layer, position)`` with ``site`` in :data:`~probes.model.hooks.SITES`, or ``("head", layer,
position, head)`` (:mod:`probes.readouts.heads`). Each cell becomes one :class:`~probes.readouts.variants.Variant` of the receiving
run carrying the source run's activation, and :func:`probes.readouts.variants.run_variants` runs them (``method``:
``fast``, ``batched``, ``naive`` or ``auto``; see there). All metrics stay on the model's device until the sweep
ends.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bridgeprobe.probes.readouts.heads import HEAD, n_heads, record_heads
from bridgeprobe.probes.model.hooks import SITES, HookedModel, NativeHooks, check_sites
from bridgeprobe.probes.readouts.lens import token_ranks
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.probes.readouts.variants import Measure, Variant, full_patches, run_variants

DIRECTIONS = ("denoise", "noise")
COLUMNS = ("site", "layer", "position", "head", "value", "metric", "clean_prob")
BRIDGE_COLUMNS = ("site", "layer", "position", "head", "readout_layer", "bridge_rank", "baseline_rank")


# --------------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """A clean and a corrupted prompt (token ids, equal length) and the two answer tokens of the metric."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    clean_answer: int
    corrupt_answer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean", tuple(int(t) for t in self.clean))
        object.__setattr__(self, "corrupted", tuple(int(t) for t in self.corrupted))
        if not self.clean or not self.corrupted:
            raise ValueError("clean and corrupted prompts must not be empty")
        if len(self.clean) != len(self.corrupted):
            raise ValueError(
                f"clean and corrupted prompts must have the same number of tokens, got {len(self.clean)} and "
                f"{len(self.corrupted)}; rephrase one of them (alignment by spans is not supported)"
            )
        if int(self.clean_answer) == int(self.corrupt_answer):
            raise ValueError(f"the clean and corrupted answers are the same token ({self.clean_answer})")

    @classmethod
    def from_text(cls, tokenizer: Any, clean: str, corrupted: str, clean_answer: str, corrupt_answer: str,
                  sep: str = " ") -> Pair:
        """Tokenize prompts as ``tokenizer(text)`` (special tokens included) and each answer as the first of the
        tokens it gets after its prompt and ``sep`` (:func:`probes.model.targets.target_ids`; ``"Paris"``, no space)."""
        answers = [target_ids(tokenizer, prompt, answer, sep)[0]
                   for prompt, answer in ((clean, clean_answer), (corrupted, corrupt_answer))]
        return cls(tokenizer(clean)["input_ids"], tokenizer(corrupted)["input_ids"], *answers)

    @property
    def length(self) -> int:
        return len(self.clean)

    def tokens(self, which: str) -> tuple[int, ...]:
        """Token ids of ``which`` in {"clean", "corrupted"}."""
        return self.clean if which == "clean" else self.corrupted

    def ids(self, which: str) -> Tensor:
        """``[1, T]`` token ids of ``which`` in {"clean", "corrupted"}."""
        return torch.tensor([self.tokens(which)], dtype=torch.long)

    def score(self, last_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Metric and clean-answer probability of last-position logits ``[B, vocab]`` (both ``[B]``, fp32)."""
        logits = last_logits.float()
        diff = logits[:, self.clean_answer] - logits[:, self.corrupt_answer]
        return diff, logits.softmax(-1)[:, self.clean_answer]


def _roles(direction: str) -> tuple[str, str]:
    """(receiving run, source run) of a direction."""
    if direction == "denoise":
        return "corrupted", "clean"
    if direction == "noise":
        return "clean", "corrupted"
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _measure(hooked: HookedModel, pair: Pair, bridge_token: int | None) -> Measure:
    """[metric, clean-answer probability, (bridge rank at every layer)] of each variant."""
    def measure(logits: Tensor, resid: Tensor | None) -> Tensor:
        columns = list(pair.score(logits))
        if bridge_token is not None:
            columns.extend(token_ranks(hooked, resid, bridge_token).float().unbind(-1))
        return torch.stack(columns, dim=-1)
    return measure


# --------------------------------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """A long table (:data:`COLUMNS`, one row per cell) and the two unpatched baselines; with a bridge token, also
    ``bridge`` (:data:`BRIDGE_COLUMNS`, one row per cell and readout layer from the cell's layer on).

    ``forward_equivalents`` is the block work spent on patched variants, in full single-sequence forwards
    (the naive loop spends one per cell); the two baseline runs are not counted."""

    frame: pd.DataFrame
    clean_metric: float
    corrupted_metric: float
    clean_prob: float  # the clean answer's probability in the clean run
    corrupted_prob: float  # ... and in the corrupted run
    direction: str
    method: str
    forward_equivalents: float
    bridge: pd.DataFrame | None = None

    def recovery(self, metric: float) -> float:
        return _recovery(metric, self.clean_metric, self.corrupted_metric)

    def grid(self, column: str = "value") -> pd.DataFrame:
        """``column`` as a layer x position table (site sweeps; head sweeps: layer x (position, head))."""
        heads = self.frame["head"].notna().any()
        return self.frame.pivot_table(index="layer", columns=["position", "head"] if heads else "position",
                                      values=column, aggfunc="first")


def _recovery(metric: float, clean: float, corrupted: float) -> float:
    span = clean - corrupted
    return (metric - corrupted) / span if span != 0 else math.nan


def cell_frame(cells: list[tuple], metric: Tensor, prob: Tensor, clean: float, corrupted: float) -> pd.DataFrame:
    """The :data:`COLUMNS` table of ``cells`` with their patched metrics and clean-answer probabilities."""
    metric_list, prob_list = metric.cpu().tolist(), prob.cpu().tolist()
    rows = [
        {"site": site, "layer": layer, "position": position, "head": head,
         "value": _recovery(m, clean, corrupted), "metric": m, "clean_prob": pr}
        for (site, layer, position, head), m, pr in zip(cells, metric_list, prob_list)
    ]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["head"] = pd.Series([cell[3] for cell in cells], dtype=object)  # ints, None for site cells
    return frame


def _bridge_frame(cells: list[tuple], ranks: Tensor, baseline: Tensor) -> pd.DataFrame:
    """:data:`BRIDGE_COLUMNS` rows: each cell at every readout layer from its own layer on."""
    ranks, baseline = ranks.cpu().numpy().astype(int), baseline.cpu().numpy().astype(int)
    cell_index, readout = np.nonzero(np.arange(ranks.shape[1])[None, :] >= np.array([c[1] for c in cells])[:, None])
    frame = pd.DataFrame({
        "site": [cells[i][0] for i in cell_index], "layer": [cells[i][1] for i in cell_index],
        "position": [cells[i][2] for i in cell_index],
        "head": pd.Series([cells[i][3] for i in cell_index], dtype=object),
        "readout_layer": readout, "bridge_rank": ranks[cell_index, readout], "baseline_rank": baseline[readout],
    })
    return frame[list(BRIDGE_COLUMNS)]


# --------------------------------------------------------------------------------------------------- cells

Cell = tuple  # (site, layer, position) or ("head", layer, position, head)


def _normalize(cells: Iterable[Sequence[Any]], n_layers: int, length: int, heads: int | None) -> list[tuple]:
    out = []
    for cell in cells:
        site, layer, position = cell[0], int(cell[1]), int(cell[2])
        head = cell[3] if len(cell) > 3 else None
        head = None if head is None or (isinstance(head, float) and math.isnan(head)) else int(head)
        if site == HEAD:
            if head is None:
                raise ValueError(f"head cell {cell} needs a head index")
            if heads is not None and not 0 <= head < heads:
                raise ValueError(f"head {head} out of range 0..{heads - 1}")
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} out of range 0..{n_layers - 1}")
        else:
            check_sites([(site, layer)], n_layers)
            head = None
        if not 0 <= position < length:
            raise ValueError(f"position {position} out of range 0..{length - 1}")
        out.append((site, layer, position, head))
    return out


def _source_run(hooked: HookedModel, pair: Pair, which: str, cells: list[tuple]) -> tuple[Any, dict[int, Tensor]]:
    """The source run, reading every site the cells need (and per-head outputs for head cells)."""
    reads = list(dict.fromkeys((c[0], c[1]) for c in cells if c[0] != HEAD))
    head_layers = sorted({c[1] for c in cells if c[0] == HEAD})
    if head_layers and not isinstance(hooked, NativeHooks):
        raise ValueError("head patching needs the native backend (NativeHooks)")
    store: dict[int, Tensor] = {}
    with ExitStack() as stack:
        if head_layers:
            record_heads(hooked, head_layers, store, stack)
        result = hooked.run(pair.ids(which), read=reads)
    return result, store


def _variants(cells: list[tuple], src: Any, src_heads: dict[int, Tensor]) -> list[Variant]:
    """One variant per cell, carrying the source run's activation there."""
    return [Variant(site, layer, position,
                    src_heads[layer][0, position, head] if site == HEAD else src.acts[(site, layer)][0, position],
                    head)
            for site, layer, position, head in cells]


# --------------------------------------------------------------------------------------------------- public API


def sweep(
    hooked: HookedModel,
    pair: Pair,
    site: str = "resid_pre",
    *,
    direction: str = "denoise",
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    method: str = "auto",
    memory_budget: int | None = None,
    overhead_tokens: int | None = None,
    bridge_token: int | None = None,
) -> SweepResult:
    """Patch ``site`` (one of :data:`~probes.model.hooks.SITES`) at every ``layer x position`` (default: all), one
    cell at a time; see :func:`probes.readouts.variants.run_variants` for ``method``, ``memory_budget`` and
    ``overhead_tokens``."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    layers = range(hooked.n_layers) if layers is None else layers
    positions = range(pair.length) if positions is None else positions
    cells = [(site, int(l), int(p)) for l in layers for p in positions]
    return patch_cells(hooked, pair, cells, direction=direction, method=method, memory_budget=memory_budget,
                       overhead_tokens=overhead_tokens, bridge_token=bridge_token)


def head_sweep(
    hooked: NativeHooks,
    pair: Pair,
    *,
    direction: str = "denoise",
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    method: str = "auto",
    memory_budget: int | None = None,
    overhead_tokens: int | None = None,
    bridge_token: int | None = None,
) -> SweepResult:
    """Patch each attention head's output at every ``layer x head x position`` (default: all); rows have
    ``site == "head"``. Native backend only."""
    layers = range(hooked.n_layers) if layers is None else layers
    positions = range(pair.length) if positions is None else positions
    heads = range(n_heads(hooked)) if heads is None else heads
    cells = [(HEAD, int(l), int(p), int(h)) for l in layers for p in positions for h in heads]
    return patch_cells(hooked, pair, cells, direction=direction, method=method, memory_budget=memory_budget,
                       overhead_tokens=overhead_tokens, bridge_token=bridge_token)


def patch_cells(
    hooked: HookedModel,
    pair: Pair,
    cells: Iterable[Sequence[Any]],
    *,
    direction: str = "denoise",
    method: str = "auto",
    memory_budget: int | None = None,
    overhead_tokens: int | None = None,
    bridge_token: int | None = None,
) -> SweepResult:
    """Patch each cell on its own (``(site, layer, position)`` or ``("head", layer, position, head)``) and
    return one row per cell, in the order given."""
    receiving, source = _roles(direction)
    heads = n_heads(hooked) if isinstance(hooked, NativeHooks) else None
    cells = _normalize(cells, hooked.n_layers, pair.length, heads)
    with torch.no_grad():
        src, src_heads = _source_run(hooked, pair, source, cells)
    measure = _measure(hooked, pair, bridge_token)
    run = run_variants(hooked, pair.tokens(receiving), _variants(cells, src, src_heads), measure,
                       resid=bridge_token is not None, method=method, memory_budget=memory_budget,
                       overhead_tokens=overhead_tokens)
    metric, prob = (float(x[0]) for x in pair.score(src.logits[:, -1]))
    scores = {source: (metric, prob), receiving: (float(run.baseline[0]), float(run.baseline[1]))}
    clean, corrupted = scores["clean"][0], scores["corrupted"][0]
    if clean == corrupted:
        warnings.warn("the clean and corrupted runs have the same metric: recovery is undefined (NaN)", stacklevel=2)
    frame = cell_frame(cells, run.values[:, 0], run.values[:, 1], clean, corrupted)
    bridge = _bridge_frame(cells, run.values[:, 2:], run.baseline[2:]) if bridge_token is not None else None
    return SweepResult(frame, clean, corrupted, scores["clean"][1], scores["corrupted"][1], direction, run.method,
                       run.forward_equivalents, bridge)


@dataclass(frozen=True)
class JointPatch:
    """One forward with several cells patched together."""

    metric: float
    value: float
    clean_prob: float
    clean_metric: float
    corrupted_metric: float


def patch_jointly(hooked: HookedModel, pair: Pair, cells: Iterable[Sequence[Any]], *,
                  direction: str = "denoise") -> JointPatch:
    """Patch all ``cells`` at once in one full forward (e.g. every position of a layer); no cells: the
    receiving run itself."""
    receiving, source = _roles(direction)
    heads = n_heads(hooked) if isinstance(hooked, NativeHooks) else None
    cells = _normalize(cells, hooked.n_layers, pair.length, heads)
    with torch.no_grad():
        src, src_heads = _source_run(hooked, pair, source, cells)
        rec = hooked.run(pair.ids(receiving))
        with ExitStack() as stack:
            patches = full_patches(hooked, [(0, v) for v in _variants(cells, src, src_heads)], stack)
            out = hooked.run(pair.ids(receiving), patches=patches)
        metric, prob = pair.score(out.logits[:, -1])
        base = {role: float(pair.score(r.logits[:, -1])[0][0]) for role, r in ((source, src), (receiving, rec))}
    metric_value = float(metric[0])
    return JointPatch(metric_value, _recovery(metric_value, base["clean"], base["corrupted"]), float(prob[0]),
                      base["clean"], base["corrupted"])
