"""The patching engine: run many single-cell patched variants of one receiving prompt, exactly and fast.

A :class:`Variant` overwrites one cell of the receiving run, ``(site, layer, position)`` with ``site`` in
:data:`~probes.model.hooks.SITES`, or ``("head", layer, position, head)`` (one attention head's output,
:mod:`probes.readouts.heads`), with a given vector, wherever that vector comes from: the same position of a counterfactual
prompt (:mod:`probes.readouts.patching`), another prompt altogether, or a later layer of the same prompt
(:mod:`probes.memory.analysis`). Each variant is reduced on the device by a ``measure`` of its last position: the final
logits there (``[B, vocab]``) and, with ``resid=True``, the residual stream after every block there
(``[B, L, d]``, for logit-lens readouts).

Three methods give the same numbers (``<= 1e-4`` apart in fp32, tests/test_patching.py):

- ``naive``: one full forward per variant through :meth:`HookedModel.run` (the reference; any backend);
- ``batched``: one variant per batch row, full forwards (any backend, any architecture);
- ``fast`` (:class:`~probes.model.hooks.NativeHooks` only): a patch at block ``l`` and position ``p`` leaves every
  block below ``l``, and every position before ``p``, equal to the receiving run. So each variant starts at
  block ``l`` from the receiving run's cached residual (:meth:`NativeHooks.run_from` swaps the blocks below ``l``
  for pass-throughs) and runs only the positions from ``p0 <= p`` on, with the receiving run's keys/values of the
  positions before ``p0`` as a prefix cache; only the last position is unembedded. Variants of one (site, layer)
  are grouped into batches by a small dynamic programme (:func:`plan_groups`) that trades the work saved by a late
  ``p0`` against the per-forward overhead (``overhead_tokens``) under a memory budget; on out-of-memory
  (``torch.cuda.OutOfMemoryError``, ``RuntimeError('... out of memory')``, ``MemoryError``) the budget halves and
  the rest is re-planned. Variants whose value equals the receiving activation (e.g. a shared prefix) are not run:
  their result is the receiving run's. Block work: ``(L+1)(P+1)/4`` forward-equivalents for a full sweep with one
  group per position, ``~L*P/2`` with one batch per layer, instead of ``L*P``.

  The fast path relies on the HF model forward iterating over its block list and on its attention taking a
  ``DynamicCache`` prefix; it is verified against ``naive`` for the ``model_type`` values in
  :data:`FAST_ARCHITECTURES` (tiny Llama, Qwen2, Qwen3, Mistral, GPT-2, Gemma 2, Gemma 3 text with
  sliding-window layers; real SmolLM2-135M and Gemma 3 270M). ``method="auto"`` uses it only there and falls back
  to ``batched`` elsewhere (other architectures, the TransformerLens backend).
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bridgeprobe.probes.readouts.heads import HEAD, n_heads, patch_heads, record_heads
from bridgeprobe.probes.model.hooks import HookedModel, NativeHooks, Patch, check_sites
from bridgeprobe.probes.readouts.lens import free_memory

METHODS = ("auto", "fast", "batched", "naive")
# model_type values whose fast path is tested against the naive loop (tests/test_patching.py)
FAST_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma2", "gemma3_text"})
CPU_MEMORY_BUDGET = 1 << 30  # bytes per forward on the CPU (more gains no speed; docs/benchmarks.md)

# (last-position logits [B, vocab], last-position resid_post of every block [B, L, d] or None) -> [B, k]
Measure = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Variant:
    """Overwrite ``site`` at ``layer`` and ``position`` of the receiving run with ``value`` (``[d_model]``; for a
    ``"head"`` site, head ``head``'s output, ``[head_dim]``)."""

    site: str
    layer: int
    position: int
    value: Tensor
    head: int | None = None

    @property
    def start(self) -> int:
        """The first block whose input the patch changes (``resid_post[l]`` is the input of block ``l + 1``)."""
        return self.layer + 1 if self.site == "resid_post" else self.layer


@dataclass
class VariantRun:
    """``values[i]`` is the measure of variant ``i`` (``[N, k]``, on the model's device); ``baseline`` that of the
    unpatched receiving run (``[k]``); ``forward_equivalents`` the block work spent on variants, in full
    single-sequence forwards (the naive loop spends one per variant; the receiving run is not counted)."""

    values: Tensor
    baseline: Tensor
    method: str
    forward_equivalents: float


def check_variants(hooked: HookedModel, variants: Sequence[Variant], length: int) -> None:
    """Raise ValueError for a variant outside the model or the prompt."""
    heads = n_heads(hooked) if any(v.site == HEAD for v in variants) else None
    for v in variants:
        if v.site == HEAD:
            if not isinstance(hooked, NativeHooks):
                raise ValueError("head patching needs the native backend (NativeHooks)")
            if v.head is None or not 0 <= v.head < heads:
                raise ValueError(f"head {v.head} out of range 0..{heads - 1}")
            if not 0 <= v.layer < hooked.n_layers:
                raise ValueError(f"layer {v.layer} out of range 0..{hooked.n_layers - 1}")
        else:
            check_sites([(v.site, v.layer)], hooked.n_layers)
        if not 0 <= v.position < length:
            raise ValueError(f"position {v.position} out of range 0..{length - 1}")


def fast_supported(hooked: HookedModel) -> bool:
    """Whether ``method="auto"`` takes the fast path for this model."""
    return isinstance(hooked, NativeHooks) and getattr(hooked.model.config, "model_type", None) in FAST_ARCHITECTURES


def resolve_method(hooked: HookedModel, method: str) -> str:
    """``auto`` -> ``fast`` where verified, else ``batched``; warn when ``fast`` is forced on an unverified model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "fast" if fast_supported(hooked) else "batched"
    if method == "fast":
        if not isinstance(hooked, NativeHooks):
            raise ValueError("the fast path needs the native backend (NativeHooks); use method='batched'")
        if not fast_supported(hooked):
            warnings.warn(f"the fast patching path is not verified for model_type "
                          f"{hooked.model.config.model_type!r}; check it against method='naive'", stacklevel=3)
    return method


@torch.no_grad()
def run_variants(
    hooked: HookedModel,
    input_ids: Sequence[int],
    variants: Sequence[Variant],
    measure: Measure,
    *,
    resid: bool = False,
    method: str = "auto",
    memory_budget: int | None = None,
    overhead_tokens: int | None = None,
) -> VariantRun:
    """Run each variant of the receiving prompt ``input_ids`` on its own and ``measure`` its last position.

    ``resid=True`` also passes ``measure`` the last position's residual stream after every block. ``memory_budget``
    (bytes per forward: activations and the logits it returns) defaults to half the free GPU memory, or 1 GiB on
    the CPU;
    ``overhead_tokens`` is the fixed cost of one forward in token-rows of block work (default 4096 on a GPU, 32
    on the CPU)."""
    ids = [int(t) for t in input_ids]
    if not ids:
        raise ValueError("the receiving prompt is empty")
    check_variants(hooked, variants, len(ids))
    method = resolve_method(hooked, method)
    engine = _fast if method == "fast" else _batched
    return engine(hooked, ids, list(variants), measure, resid=resid, method=method, memory_budget=memory_budget,
                  overhead_tokens=overhead_tokens)


# --------------------------------------------------------------------------------------------------- shared


def device_of(hooked: HookedModel) -> torch.device:
    """Where the model's inputs go (its input embedding's device)."""
    return hooked.model.get_input_embeddings().weight.device


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error of the GPU or the host."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(err, oom)) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def token_capacity(hooked: HookedModel, length: int, memory_budget: int | None, *, logits: bool = False) -> int:
    """How many token-rows (batch rows x sequence length) one forward may hold within the memory budget
    (``logits``: the forward returns the logits of every position; otherwise of each row's last position, which
    is counted as spread over the row's ``length`` tokens)."""
    if memory_budget is None:
        free = free_memory(hooked)  # the fullest GPU's, for a model sharded over several
        memory_budget = CPU_MEMORY_BUDGET if free is None else free // 2
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
    row_logits = 4 * int(hooked.model.get_output_embeddings().weight.shape[0])  # fp32 logits of one position
    per_token += row_logits if logits else math.ceil(row_logits / length)
    return max(length, int(memory_budget) // per_token)


def _last_resid(acts: dict, n_layers: int) -> Tensor:
    """``[B, L, d]`` from ``resid_post`` reads gathered at the last position (``[B, 1, d]`` each; blocks may sit
    on several devices: the result is on the last block's)."""
    device = acts[("resid_post", n_layers - 1)].device
    return torch.cat([acts[("resid_post", k)].to(device) for k in range(n_layers)], dim=1)


def full_patches(hooked: HookedModel, rows: Sequence[tuple[int, Variant]], stack: ExitStack) -> list[Patch]:
    """Patches for full forwards of the receiving run: batch row ``r`` gets variant ``v`` (head edits are
    registered on ``stack``)."""
    groups: dict[tuple[str, int], list[tuple[int, Variant]]] = {}
    for r, v in rows:
        groups.setdefault((v.site, v.layer), []).append((r, v))
    patches = []
    for (site, layer), items in groups.items():
        r = torch.tensor([i for i, _ in items])
        p = torch.tensor([v.position for _, v in items])
        values = torch.stack([v.value for _, v in items])
        if site == HEAD:
            patch_heads(hooked, layer, r, p, torch.tensor([v.head for _, v in items]), values, stack)
        else:
            patches.append(Patch(site, layer, r, p, values))
    return patches


# --------------------------------------------------------------------------------------------------- batched


def _batched(hooked: HookedModel, ids: list[int], variants: list[Variant], measure: Measure, *, resid: bool,
             method: str, memory_budget: int | None, **_: Any) -> VariantRun:
    """Full forwards of the receiving run, one variant per batch row (``naive``: one row per forward)."""
    length, n_layers = len(ids), hooked.n_layers
    reads = [("resid_post", k) for k in range(n_layers)] if resid else []
    device = device_of(hooked)

    def forward(batch_rows: Sequence[tuple[int, Variant]], rows: int) -> Tensor:
        with ExitStack() as stack:
            patches = full_patches(hooked, batch_rows, stack)
            out = hooked.run(torch.tensor([ids]).expand(rows, -1), read=reads, patches=patches,
                             positions=torch.full((rows, 1), length - 1))
        return measure(out.logits[:, -1], _last_resid(out.acts, n_layers) if resid else None)

    baseline = forward([], 1)[0]
    values = torch.empty((len(variants), baseline.shape[-1]), dtype=baseline.dtype, device=device)
    batch = 1 if method == "naive" else max(1, token_capacity(hooked, length, memory_budget, logits=True) // length)
    start = 0
    while start < len(variants):
        chunk = variants[start : start + batch]
        try:
            values[start : start + len(chunk)] = forward(list(enumerate(chunk)), len(chunk)).to(device)
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err) or batch == 1:
                raise
            _free_memory(device)
            batch = max(1, len(chunk) // 2)
            continue
        start += len(chunk)
    return VariantRun(values, baseline.to(device), method, float(len(variants)))


# --------------------------------------------------------------------------------------------------- fast


def plan_groups(items: Sequence[tuple[int, int, float]], length: int, capacity: int, overhead: float) -> list[list[int]]:
    """Split position-sorted ``items`` ``(position, rows, work)`` into contiguous groups, one pass each.

    A group starting at position ``p0`` computes ``work x (length - p0)`` token-rows (``work``: its rows weighted
    by the fraction of the blocks each runs) and holds about ``rows x length`` (its memory, prefix cache included;
    at most ``capacity`` unless one item alone exceeds it). Minimises total compute plus ``overhead`` per group,
    by dynamic programming. Returns item indices."""
    n = len(items)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        rows, work = 0, 0.0
        for i in range(j - 1, -1, -1):
            rows += items[i][1]
            work += items[i][2]
            if rows * length > capacity and i < j - 1:
                break
            cost = best[i] + work * (length - items[i][0]) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(list(range(cut[j], j)))
        j = cut[j]
    return groups[::-1]


def _fast(hooked: NativeHooks, ids: list[int], variants: list[Variant], measure: Measure, *, resid: bool,
          memory_budget: int | None, overhead_tokens: int | None, **_: Any) -> VariantRun:
    n_layers, length = hooked.n_layers, len(ids)
    device = device_of(hooked)
    if overhead_tokens is None:
        overhead_tokens = 4096 if device.type == "cuda" else 32
    capacity = token_capacity(hooked, length, memory_budget)

    site_keys = {(v.site, v.layer) for v in variants if v.site != HEAD}
    reads = [("resid_pre", l) for l in range(n_layers)] + [("resid_post", l) for l in range(n_layers)]
    reads += sorted(site_keys - set(reads))
    rec_heads: dict[int, Tensor] = {}
    with ExitStack() as stack:
        record_heads(hooked, sorted({v.layer for v in variants if v.site == HEAD}), rec_heads, stack)
        rec, kv = hooked.run_with_kv(torch.tensor([ids]), read=reads)
    # inputs[s]: the receiving run's input of block s (s == n_layers: the final residual)
    inputs = [rec.acts[("resid_pre", l)] for l in range(n_layers)] + [rec.acts[("resid_post", n_layers - 1)]]
    last_device = inputs[-1].device  # where the final norm reads (blocks may sit on several devices)
    rec_last = torch.stack([rec.acts[("resid_post", l)][0, -1].to(last_device) for l in range(n_layers)])  # [L, d]
    baseline = measure(rec.logits[:, -1], rec_last[None] if resid else None)[0]
    receiving = _Receiving(inputs, kv, rec_last, measure, resid)

    values = torch.empty((len(variants), baseline.shape[-1]), dtype=baseline.dtype, device=device)
    # a variant whose value equals the receiving activation patches nothing: its run is the receiving run
    pending = []
    for index, v in enumerate(variants):
        if _unchanged(v, rec.acts, rec_heads):
            values[index] = baseline.to(device)
        else:
            pending.append(index)
    pending.sort(key=lambda i: variants[i].position)

    work = 0.0
    while pending:
        # one item per position, split further where one position alone exceeds the capacity
        per_item = max(1, capacity // length)
        items, members = [], []
        for position in sorted({variants[i].position for i in pending}):
            at = [i for i in pending if variants[i].position == position]
            for k in range(0, len(at), per_item):
                chunk = at[k : k + per_item]
                items.append((position, len(chunk), sum(n_layers - variants[i].start for i in chunk) / n_layers))
                members.append(chunk)
        done: set[int] = set()
        try:
            for group in plan_groups(items, length, capacity, overhead_tokens):
                chosen = [i for g in group for i in members[g]]
                out = _fast_pass(hooked, [variants[i] for i in chosen], receiving)
                values[torch.tensor(chosen, device=device)] = out.to(device)
                p0 = min(variants[i].position for i in chosen)
                work += sum(n_layers - variants[i].start for i in chosen) * (length - p0)
                done.update(chosen)
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err) or capacity <= length:
                raise
            _free_memory(device)
            capacity = max(length, capacity // 2)
        pending = [i for i in pending if i not in done]
    return VariantRun(values, baseline.to(device), "fast", work / (length * n_layers))


def _unchanged(v: Variant, acts: dict, heads: dict[int, Tensor]) -> bool:
    """Whether the variant's value is exactly the receiving run's activation at its cell."""
    current = heads[v.layer][0, v.position, v.head] if v.site == HEAD else acts[(v.site, v.layer)][0, v.position]
    return current.equal(v.value.to(current))


@dataclass(frozen=True)
class _Receiving:
    """What the fast path keeps of the receiving run: each block's input (``[1, T, d]``; index ``L``: the final
    residual), every block's keys and values, and the last position's residual after every block (``[L, d]``)."""

    inputs: list[Tensor]
    kv: list[tuple[Tensor, Tensor]]
    last: Tensor
    measure: Measure
    resid: bool


def _fast_pass(hooked: NativeHooks, group: list[Variant], rec: _Receiving) -> Tensor:
    """Measures of ``group`` (one batch row each) from one pass over positions ``p0..T-1`` (``p0``: the earliest
    patched position): each row joins the pass at the first block its patch changes
    (:meth:`NativeHooks.run_from` ``join``); rows patched after the last block are only read out."""
    n_layers = hooked.n_layers
    order = sorted(range(len(group)), key=lambda i: group[i].start)
    group = [group[i] for i in order]
    p0 = min(v.position for v in group)
    starts = [v.start for v in group]
    relative = torch.tensor([v.position - p0 for v in group])
    # each start block's rows: its input from p0 on (on that block's device), resid patches applied
    entering: dict[int, Tensor] = {}
    for start in dict.fromkeys(starts):
        members = [v for v in group if v.start == start]
        rows = rec.inputs[start][:, p0:].repeat(len(members), 1, 1)
        for r, v in enumerate(members):
            if v.site in ("resid_pre", "resid_post"):
                rows[r, v.position - p0] = v.value.to(rows)
        entering[start] = rows
    patches: list[Patch] = []
    with ExitStack() as stack:
        by_site: dict[tuple[str, int], list[int]] = {}
        for r, v in enumerate(group):
            if v.site not in ("resid_pre", "resid_post"):
                by_site.setdefault((v.site, v.layer), []).append(r)
        for (site, layer), rows in by_site.items():
            index = torch.tensor(rows)
            values = torch.stack([group[r].value for r in rows])
            if site == HEAD:
                patch_heads(hooked, layer, index, relative[index], torch.tensor([group[r].head for r in rows]),
                            values, stack)
            else:
                patches.append(Patch(site, layer, index, relative[index], values))
        first = starts[0]
        logits, acts = [], {}
        if first < n_layers:
            past = [(k[:, :, :p0], v[:, :, :p0]) for k, v in rec.kv] if p0 > 0 else None
            reads = [("resid_post", k) for k in range(first, n_layers)] if rec.resid else []
            join = {k: rows for k, rows in entering.items() if first < k < n_layers}
            out = hooked.run_from(first, entering[first], past_kv=past, join=join, patches=patches, read=reads,
                                  logits_to_keep=1)
            logits.append(out.logits[:, -1])
            acts = out.acts
        if n_layers in entering:  # patched after the last block: the final residual itself is read out
            logits.append(hooked.readout(entering[n_layers][:, -1:])[:, -1])
    last_logits = torch.cat([l.to(logits[0].device) for l in logits])
    resid = _last_resid_of_pass(rec.last, entering, starts, acts, n_layers) if rec.resid else None
    measured = rec.measure(last_logits, resid)
    return measured[torch.argsort(torch.tensor(order)).to(measured.device)]


def _last_resid_of_pass(rec_last: Tensor, entering: dict[int, Tensor], starts: list[int], acts: dict,
                        n_layers: int) -> Tensor:
    """``[B, L, d]`` residual after every block at the last position (on ``rec_last``'s device): the receiving
    run's below a row's start block, the row's own input (patched or not) just below it, and what the pass read
    from there on (block ``k`` held the first rows, those with ``start <= k``)."""
    out = rec_last[None].repeat(len(starts), 1, 1)
    at = 0
    for start, rows in entering.items():
        if start > 0:
            out[at : at + len(rows), start - 1] = rows[:, -1].to(out)
        at += len(rows)
    for (_, k), act in acts.items():
        out[: act.shape[0], k] = act[:, -1].to(out)
    return out
