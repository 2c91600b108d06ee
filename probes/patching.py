"""Activation patching: how much of a clean/corrupted logit difference one site carries, exactly and fast.

A :class:`Pair` is a clean and a corrupted token sequence of equal length and two answer tokens. The metric is
the logit difference at the last position, ``logit[clean_answer] - logit[corrupt_answer]``; a patched run is
reported as its raw metric, the clean answer's probability, and the normalized recovery
``value = (patched - corrupted) / (clean - corrupted)`` (for both directions: ``denoise`` copies clean
activations into the corrupted run, where 1 means the site restores the clean behaviour; ``noise`` copies
corrupted activations into the clean run, where 0 means the site alone destroys it).

Cells are ``(site, layer, position)`` with ``site`` in :data:`~probes.hooks.SITES`, or ``("head", layer,
position, head)``: one attention head's output, patched as that head's slice of the input of the attention output
projection (``o_proj`` / GPT-2's Conv1D ``c_proj`` / ``dense``); heads are concatenated there after attention, so
this is exact for grouped-query attention too.

Three interchangeable methods compute the same numbers (``<= 1e-4`` apart in fp32, see tests/test_patching.py):

- ``naive``: one full forward per cell through :meth:`HookedModel.run` (the reference; any backend);
- ``batched``: many cells per forward, one patched variant per batch row, full forwards (any backend);
- ``fast`` (:class:`~probes.hooks.NativeHooks` only): a patch at block ``l`` and position ``p`` leaves every
  block below ``l``, and every position before ``p``, equal to the receiving run. So each patched variant
  starts at block ``l`` from the receiving run's cached residual (:meth:`NativeHooks.run_from` swaps the blocks
  below ``l`` for pass-throughs) and runs only the positions from ``p0 <= p`` on, with the receiving run's
  keys/values of the positions before ``p0`` as a prefix cache; only the last position is unembedded. Variants of
  one (site, layer) are grouped into batches by a small dynamic programme that trades the work saved by a late
  ``p0`` against the per-forward overhead (``overhead_tokens``) under a memory budget; on out-of-memory
  (``torch.cuda.OutOfMemoryError``, ``RuntimeError('... out of memory')``, ``MemoryError``) the budget halves and
  the rest is re-planned. Cells whose source activation equals the receiving one (a shared prefix) are not run
  at all: their patched run is the receiving run. Block work: ``(L+1)(P+1)/4`` forward-equivalents with
  ``overhead_tokens=0`` (one group per position), ``~L*P/2`` with one batch per layer, instead of ``L*P``;
  measured on SmolLM2-135M (1 CPU thread, 13 tokens): 4.4 s vs 47 s for the naive loop (41.5 vs 390
  forward-equivalents; 7 shared prefix tokens), 10 s vs 43 s with no shared prefix (12 tokens).

  The fast path relies on the HF model forward iterating over its block list and on its attention taking a
  ``DynamicCache`` prefix; it is verified against ``naive`` for the ``model_type`` values in
  :data:`FAST_ARCHITECTURES` (tiny Llama, Qwen2, Qwen3, Mistral, GPT-2, Gemma 2, Gemma 3 text with
  sliding-window layers; real SmolLM2-135M and Gemma 3 270M). ``method="auto"`` uses it only there and falls back to ``batched``
  elsewhere (other architectures, the TransformerLens backend).

All metrics stay on the model's device until the sweep ends.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from probes.hooks import SITES, HookedModel, NativeHooks, Patch, check_sites

HEAD = "head"
DIRECTIONS = ("denoise", "noise")
METHODS = ("auto", "fast", "batched", "naive")
COLUMNS = ("site", "layer", "position", "head", "value", "metric", "clean_prob")
# model_type values whose fast path is tested against the naive loop (tests/test_patching.py)
FAST_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma2", "gemma3_text"})
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
CPU_MEMORY_BUDGET = 2 << 30  # bytes of activations per forward on the CPU


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
                f"{len(self.corrupted)}; rephrase one of them (alignment by spans is not supported yet)"
            )
        if int(self.clean_answer) == int(self.corrupt_answer):
            raise ValueError(f"the clean and corrupted answers are the same token ({self.clean_answer})")

    @classmethod
    def from_text(cls, tokenizer: Any, clean: str, corrupted: str, clean_answer: str, corrupt_answer: str) -> Pair:
        """Tokenize prompts as ``tokenizer(text)`` (special tokens included) and answers as the first token of
        ``tokenizer(answer, add_special_tokens=False)`` (so include the leading space: ``" Paris"``)."""
        answers = []
        for text in (clean_answer, corrupt_answer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"answer {text!r} tokenizes to nothing")
            answers.append(int(ids[0]))
        return cls(tokenizer(clean)["input_ids"], tokenizer(corrupted)["input_ids"], *answers)

    @property
    def length(self) -> int:
        return len(self.clean)

    def ids(self, which: str) -> Tensor:
        """``[1, T]`` token ids of ``which`` in {"clean", "corrupted"}."""
        return torch.tensor([self.clean if which == "clean" else self.corrupted], dtype=torch.long)

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


# --------------------------------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """A long table (:data:`COLUMNS`, one row per cell) and the two unpatched baselines.

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


# --------------------------------------------------------------------------------------------------- heads


def out_projection(hooked: NativeHooks, layer: int) -> nn.Module:
    """The attention output projection of block ``layer``: its input is the per-head outputs, concatenated."""
    block = hooked.modules.blocks[layer]
    for attn_name in _ATTN_NAMES:
        attn = getattr(block, attn_name, None)
        if isinstance(attn, nn.Module):
            for name in _OUT_PROJ_NAMES:
                proj = getattr(attn, name, None)
                if isinstance(proj, nn.Module):
                    return proj
    raise ValueError(f"cannot find the attention output projection of {type(block).__name__}")


def n_heads(hooked: HookedModel) -> int:
    config = hooked.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError("cannot find the number of attention heads in the model config")


def _head_hook(edit: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple) -> Any:
        return (edit(args[0]), *args[1:])
    return hook


def _record_heads(hooked: NativeHooks, layers: Iterable[int], store: dict[int, Tensor], stack: ExitStack) -> None:
    """Record ``[B, T, H, head_dim]`` per-head outputs of ``layers`` into ``store`` during the next forward."""
    heads = n_heads(hooked)
    for layer in layers:
        def edit(x: Tensor, layer: int = layer) -> Tensor:
            store[layer] = x.detach().unflatten(-1, (heads, -1))
            return x
        stack.callback(out_projection(hooked, layer).register_forward_pre_hook(_head_hook(edit)).remove)


def _patch_heads(hooked: NativeHooks, layer: int, rows: Tensor, positions: Tensor, heads: Tensor, values: Tensor,
                 stack: ExitStack) -> None:
    """Overwrite head ``heads[i]`` at ``(rows[i], positions[i])`` with ``values[i]`` (``[N, head_dim]``)."""
    n = n_heads(hooked)

    def edit(x: Tensor) -> Tensor:
        out = x.unflatten(-1, (n, -1)).clone()
        dev = x.device
        out[rows.to(dev), positions.to(dev), heads.to(dev)] = values.to(device=dev, dtype=x.dtype)
        return out.flatten(-2)
    stack.callback(out_projection(hooked, layer).register_forward_pre_hook(_head_hook(edit)).remove)


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


def _grid(site: str, layers: Iterable[int] | None, positions: Iterable[int] | None, hooked: HookedModel,
          pair: Pair) -> tuple[list[int], list[int]]:
    layers = list(range(hooked.n_layers)) if layers is None else [int(l) for l in layers]
    positions = list(range(pair.length)) if positions is None else [int(p) for p in positions]
    return layers, positions


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
) -> SweepResult:
    """Patch ``site`` (one of :data:`~probes.hooks.SITES`) at every ``layer x position`` (default: all), one
    cell at a time; see the module docstring for ``method``. ``memory_budget`` (bytes of activations per
    forward) defaults to half the free GPU memory, or 2 GiB on the CPU; ``overhead_tokens`` is the fixed cost of
    one forward in token-rows of block work (default 4096 on a GPU, 32 on the CPU)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    layers, positions = _grid(site, layers, positions, hooked, pair)
    cells = [(site, l, p) for l in layers for p in positions]
    return patch_cells(hooked, pair, cells, direction=direction, method=method, memory_budget=memory_budget,
                       overhead_tokens=overhead_tokens)


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
) -> SweepResult:
    """Patch each attention head's output at every ``layer x head x position`` (default: all); rows have
    ``site == "head"``. Native backend only."""
    layers, positions = _grid(HEAD, layers, positions, hooked, pair)
    heads = list(range(n_heads(hooked))) if heads is None else [int(h) for h in heads]
    cells = [(HEAD, l, p, h) for l in layers for p in positions for h in heads]
    return patch_cells(hooked, pair, cells, direction=direction, method=method, memory_budget=memory_budget,
                       overhead_tokens=overhead_tokens)


def patch_cells(
    hooked: HookedModel,
    pair: Pair,
    cells: Iterable[Sequence[Any]],
    *,
    direction: str = "denoise",
    method: str = "auto",
    memory_budget: int | None = None,
    overhead_tokens: int | None = None,
) -> SweepResult:
    """Patch each cell on its own (``(site, layer, position)`` or ``("head", layer, position, head)``) and
    return one row per cell, in the order given."""
    _roles(direction)
    heads = n_heads(hooked) if isinstance(hooked, NativeHooks) else None
    cells = _normalize(cells, hooked.n_layers, pair.length, heads)
    method = _resolve_method(hooked, method, cells)
    engine = {"fast": _fast, "batched": _batched, "naive": _naive}[method]
    with torch.no_grad():
        return engine(hooked, pair, cells, direction, memory_budget=memory_budget, overhead_tokens=overhead_tokens)


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
        rows = [(0, cell) for cell in cells]
        with ExitStack() as stack:
            patches = _full_patches(hooked, rows, src, src_heads, stack)
            out = hooked.run(pair.ids(receiving), patches=patches)
        metric, prob = pair.score(out.logits[:, -1])
        base = {role: float(pair.score(r.logits[:, -1])[0][0]) for role, r in ((source, src), (receiving, rec))}
    metric_value = float(metric[0])
    return JointPatch(metric_value, _recovery(metric_value, base["clean"], base["corrupted"]), float(prob[0]),
                      base["clean"], base["corrupted"])


def fast_supported(hooked: HookedModel) -> bool:
    """Whether ``method="auto"`` takes the fast path for this model."""
    return isinstance(hooked, NativeHooks) and getattr(hooked.model.config, "model_type", None) in FAST_ARCHITECTURES


def _resolve_method(hooked: HookedModel, method: str, cells: list[tuple]) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if any(cell[0] == HEAD for cell in cells) and not isinstance(hooked, NativeHooks):
        raise ValueError("head patching needs the native backend (NativeHooks)")
    if method == "auto":
        return "fast" if fast_supported(hooked) else "batched"
    if method == "fast":
        if not isinstance(hooked, NativeHooks):
            raise ValueError("the fast path needs the native backend (NativeHooks); use method='batched'")
        if not fast_supported(hooked):
            warnings.warn(f"the fast patching path is not verified for model_type "
                          f"{hooked.model.config.model_type!r}; check it against method='naive'", stacklevel=3)
    return method


# --------------------------------------------------------------------------------------------------- shared


def _device(hooked: HookedModel) -> torch.device:
    return hooked.model.get_input_embeddings().weight.device


def _source_run(hooked: HookedModel, pair: Pair, which: str, cells: list[tuple]) -> tuple[Any, dict[int, Tensor]]:
    """The source run, reading every site the cells need (and per-head outputs for head cells)."""
    reads = list(dict.fromkeys((c[0], c[1]) for c in cells if c[0] != HEAD))
    head_layers = sorted({c[1] for c in cells if c[0] == HEAD})
    store: dict[int, Tensor] = {}
    with ExitStack() as stack:
        if head_layers:
            _record_heads(hooked, head_layers, store, stack)
        result = hooked.run(pair.ids(which), read=reads)
    return result, store


def _full_patches(hooked: HookedModel, rows: list[tuple[int, tuple]], src: Any, src_heads: dict[int, Tensor],
                  stack: ExitStack) -> list[Patch]:
    """Patches for full forwards: batch row ``r`` gets cell ``cell``'s source activation (head edits are
    registered on ``stack``)."""
    groups: dict[tuple[str, int], list[tuple[int, int, int | None]]] = {}
    for r, (site, layer, position, head) in rows:
        groups.setdefault((site, layer), []).append((r, position, head))
    patches = []
    for (site, layer), items in groups.items():
        r = torch.tensor([i[0] for i in items])
        p = torch.tensor([i[1] for i in items])
        if site == HEAD:
            h = torch.tensor([i[2] for i in items])
            values = src_heads[layer][0, p.to(src_heads[layer].device), h.to(src_heads[layer].device)]
            _patch_heads(hooked, layer, r, p, h, values, stack)
        else:
            act = src.acts[(site, layer)]
            patches.append(Patch(site, layer, r, p, act[0, p.to(act.device)]))
    return patches


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(err, oom)) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _token_capacity(hooked: HookedModel, length: int, memory_budget: int | None) -> int:
    """How many token-rows (batch rows x sequence length) one forward may hold within the memory budget."""
    device = _device(hooked)
    if memory_budget is None:
        if device.type == "cuda":
            memory_budget = torch.cuda.mem_get_info(device)[0] // 2
        else:
            memory_budget = CPU_MEMORY_BUDGET
    config = hooked.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = hooked.d_model
    heads = n_heads(hooked)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    elt = hooked.model.get_input_embeddings().weight.element_size()
    # per token: the prefix cache of every block, the widest activations, fp32 attention scores
    per_token = elt * (hooked.n_layers * 2 * kv_heads * head_dim + 6 * d + 3 * inner) + 4 * heads * length
    return max(length, int(memory_budget) // per_token)


def _frame(cells: list[tuple], metric: Tensor, prob: Tensor, clean: float, corrupted: float) -> pd.DataFrame:
    metric_list, prob_list = metric.cpu().tolist(), prob.cpu().tolist()
    rows = [
        {"site": site, "layer": layer, "position": position, "head": head,
         "value": _recovery(m, clean, corrupted), "metric": m, "clean_prob": pr}
        for (site, layer, position, head), m, pr in zip(cells, metric_list, prob_list)
    ]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["head"] = pd.Series([cell[3] for cell in cells], dtype=object)  # ints, None for site cells
    return frame


def _result(cells: list[tuple], metric: Tensor, prob: Tensor, pair: Pair, direction: str, method: str,
            runs: dict[str, Tensor], cost: float) -> SweepResult:
    """``runs``: last-position logits of the clean and corrupted runs."""
    scores = {role: pair.score(logits) for role, logits in runs.items()}
    clean, corrupted = float(scores["clean"][0][0]), float(scores["corrupted"][0][0])
    if clean == corrupted:
        warnings.warn("the clean and corrupted runs have the same metric: recovery is undefined (NaN)", stacklevel=3)
    return SweepResult(_frame(cells, metric, prob, clean, corrupted), clean, corrupted,
                       float(scores["clean"][1][0]), float(scores["corrupted"][1][0]), direction, method, cost)


# --------------------------------------------------------------------------------------------------- naive


def _naive(hooked: HookedModel, pair: Pair, cells: list[tuple], direction: str, **_: Any) -> SweepResult:
    """One full forward of the receiving run per cell."""
    receiving, source = _roles(direction)
    src, src_heads = _source_run(hooked, pair, source, cells)
    rec = hooked.run(pair.ids(receiving))
    device = _device(hooked)
    metric = torch.empty(len(cells), device=device)
    prob = torch.empty(len(cells), device=device)
    for i, cell in enumerate(cells):
        with ExitStack() as stack:
            patches = _full_patches(hooked, [(0, cell)], src, src_heads, stack)
            out = hooked.run(pair.ids(receiving), patches=patches)
        m, p = pair.score(out.logits[:, -1])
        metric[i], prob[i] = m[0], p[0]
    runs = {source: src.logits[:, -1], receiving: rec.logits[:, -1]}
    return _result(cells, metric, prob, pair, direction, "naive", runs, float(len(cells)))


# --------------------------------------------------------------------------------------------------- batched


def _batched(hooked: HookedModel, pair: Pair, cells: list[tuple], direction: str, *,
             memory_budget: int | None = None, **_: Any) -> SweepResult:
    """Full forwards of the receiving run, one cell per batch row (any backend, any architecture)."""
    receiving, source = _roles(direction)
    src, src_heads = _source_run(hooked, pair, source, cells)
    rec = hooked.run(pair.ids(receiving))
    device = _device(hooked)
    metric = torch.empty(len(cells), device=device)
    prob = torch.empty(len(cells), device=device)
    batch = max(1, _token_capacity(hooked, pair.length, memory_budget) // pair.length)
    start = 0
    while start < len(cells):
        chunk = cells[start : start + batch]
        try:
            with ExitStack() as stack:
                patches = _full_patches(hooked, list(enumerate(chunk)), src, src_heads, stack)
                ids = pair.ids(receiving).expand(len(chunk), -1)
                out = hooked.run(ids, patches=patches)
        except (RuntimeError, MemoryError) as err:
            if not (_is_oom(err) or isinstance(err, MemoryError)) or batch == 1:
                raise
            _free_memory(device)
            batch = max(1, len(chunk) // 2)
            continue
        m, p = pair.score(out.logits[:, -1])
        metric[start : start + len(chunk)], prob[start : start + len(chunk)] = m, p
        start += len(chunk)
    runs = {source: src.logits[:, -1], receiving: rec.logits[:, -1]}
    return _result(cells, metric, prob, pair, direction, "batched", runs, float(len(cells)))


# --------------------------------------------------------------------------------------------------- fast


def plan_groups(items: Sequence[tuple[int, int]], length: int, capacity: int, overhead: int) -> list[list[int]]:
    """Split position-sorted ``items`` ``(position, rows)`` into contiguous groups, one forward each.

    A group starting at position ``p0`` runs ``rows x (length - p0)`` token-rows (its compute) and holds about
    ``rows x length`` (its memory, prefix cache included; at most ``capacity`` unless one item alone exceeds
    it). Minimises total compute plus ``overhead`` per group, by dynamic programming. Returns item indices."""
    n = len(items)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        rows = 0
        for i in range(j - 1, -1, -1):
            rows += items[i][1]
            if rows * length > capacity and i < j - 1:
                break
            cost = best[i] + rows * (length - items[i][0]) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(list(range(cut[j], j)))
        j = cut[j]
    return groups[::-1]


def _fast(hooked: NativeHooks, pair: Pair, cells: list[tuple], direction: str, *,
          memory_budget: int | None = None, overhead_tokens: int | None = None) -> SweepResult:
    receiving, source = _roles(direction)
    n_layers, length = hooked.n_layers, pair.length
    device = _device(hooked)
    if overhead_tokens is None:
        overhead_tokens = 4096 if device.type == "cuda" else 32
    capacity = _token_capacity(hooked, length, memory_budget)

    src, src_heads = _source_run(hooked, pair, source, cells)
    reads = [("resid_pre", l) for l in range(n_layers)] + [("resid_post", n_layers - 1)]
    reads += [(c[0], c[1]) for c in cells if c[0] != HEAD]
    rec_heads: dict[int, Tensor] = {}
    with ExitStack() as stack:
        _record_heads(hooked, sorted({c[1] for c in cells if c[0] == HEAD}), rec_heads, stack)
        rec, kv = hooked.run_with_kv(pair.ids(receiving), read=list(dict.fromkeys(reads)))
    # resid[s]: the receiving run's input of block s (s == n_layers: the final residual)
    resid = [rec.acts[("resid_pre", l)] for l in range(n_layers)] + [rec.acts[("resid_post", n_layers - 1)]]
    rec_metric, rec_prob = pair.score(rec.logits[:, -1])

    metric = torch.empty(len(cells), device=device)
    prob = torch.empty(len(cells), device=device)
    # a cell whose source activation equals the receiving one (e.g. in a shared prefix) patches nothing: its
    # patched run is the receiving run, bit for bit
    same = _unchanged(cells, src, src_heads, rec, rec_heads)
    metric[same.to(device)] = rec_metric.to(device)
    prob[same.to(device)] = rec_prob.to(device)
    by_site: dict[tuple[str, int], list[int]] = {}
    for index, cell in enumerate(cells):
        if not same[index]:
            by_site.setdefault((cell[0], cell[1]), []).append(index)

    work = 0.0
    for (site, layer), indices in by_site.items():
        start = layer + 1 if site == "resid_post" else layer
        pending = sorted(indices, key=lambda i: cells[i][2])
        while pending:
            positions = sorted({cells[i][2] for i in pending})
            counts = {p: 0 for p in positions}
            for i in pending:
                counts[cells[i][2]] += 1
            # one item per position, split further where one position alone exceeds the capacity
            per_item = max(1, capacity // length)
            items, members = [], []
            at = 0
            for p in positions:
                group = pending[at : at + counts[p]]
                at += counts[p]
                for k in range(0, len(group), per_item):
                    items.append((p, len(group[k : k + per_item])))
                    members.append(group[k : k + per_item])
            done: set[int] = set()
            try:
                for group in plan_groups(items, length, capacity, overhead_tokens):
                    chosen = [i for g in group for i in members[g]]
                    m, p = _fast_group(hooked, pair, cells, chosen, start, resid, kv, src, src_heads)
                    index = torch.tensor(chosen, device=device)
                    metric[index], prob[index] = m.to(device), p.to(device)
                    p0 = min(cells[i][2] for i in chosen)
                    work += len(chosen) * (length - p0) * (n_layers - start)
                    done.update(chosen)
            except (RuntimeError, MemoryError) as err:
                if not (_is_oom(err) or isinstance(err, MemoryError)) or capacity <= length:
                    raise
                _free_memory(device)
                capacity = max(length, capacity // 2)
            pending = [i for i in pending if i not in done]

    runs = {source: src.logits[:, -1], receiving: rec.logits[:, -1]}
    return _result(cells, metric, prob, pair, direction, "fast", runs, work / (length * n_layers))


def _unchanged(cells: list[tuple], src: Any, src_heads: dict[int, Tensor], rec: Any,
               rec_heads: dict[int, Tensor]) -> Tensor:
    """``[n_cells]`` bool: the source and receiving activations of the cell are identical."""
    diff: dict[tuple[str, int], Tensor] = {}  # per (site, layer): [T] or [T, H] bool
    for site, layer, _, _ in cells:
        if (site, layer) not in diff:
            if site == HEAD:
                diff[(site, layer)] = (src_heads[layer][0] == rec_heads[layer][0].to(src_heads[layer].device)).all(-1)
            else:
                a, b = src.acts[(site, layer)][0], rec.acts[(site, layer)][0]
                diff[(site, layer)] = (a == b.to(a.device)).all(-1)
    flags = [diff[(c[0], c[1])][c[2], c[3]] if c[0] == HEAD else diff[(c[0], c[1])][c[2]] for c in cells]
    return torch.stack(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def _fast_group(hooked: NativeHooks, pair: Pair, cells: list[tuple], chosen: list[int], start: int,
                resid: list[Tensor], kv: list[tuple[Tensor, Tensor]], src: Any,
                src_heads: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """Patched variants of the cells ``chosen`` (one (site, layer)), one batch row each, from block ``start`` and
    position ``p0`` (the earliest patched position) on."""
    site, layer = cells[chosen[0]][0], cells[chosen[0]][1]
    positions = torch.tensor([cells[i][2] for i in chosen])
    p0 = int(positions.min())
    base = resid[start][:, p0:]
    rows = torch.arange(len(chosen))
    relative = positions - p0
    hidden = base.expand(len(chosen), *base.shape[1:])
    patches: list[Patch] = []
    with ExitStack() as stack:
        if site in ("resid_pre", "resid_post"):
            act = src.acts[(site, layer)]
            hidden = hidden.clone()
            hidden[rows.to(hidden.device), relative.to(hidden.device)] = act[0, positions.to(act.device)].to(
                hidden.device)
        elif site == HEAD:
            heads = torch.tensor([cells[i][3] for i in chosen])
            store = src_heads[layer]
            values = store[0, positions.to(store.device), heads.to(store.device)]
            _patch_heads(hooked, layer, rows, relative, heads, values, stack)
        else:
            act = src.acts[(site, layer)]
            patches.append(Patch(site, layer, rows, relative, act[0, positions.to(act.device)]))
        past = None
        if p0 > 0 and start < hooked.n_layers:
            past = [(k[:, :, :p0], v[:, :, :p0]) for k, v in kv]
        out = hooked.run_from(start, hidden, past_kv=past, patches=patches, logits_to_keep=1)
    return pair.score(out.logits[:, -1])
