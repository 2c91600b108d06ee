"""Attribution patching: a first-order estimate of every cell's patching effect from two forwards and a backward.

For the receiving run ``r`` and source run ``s`` of a direction (see :mod:`probes.readouts.patching`), patching a cell
with activation ``a`` changes the metric by about ``(a_s - a_r) . d metric / d a`` at ``a_r``. One source forward
(no gradient) and one receiving forward + backward give that for every ``(site, layer, position)`` (and, with
``heads=True``, every attention head via the input of the output projection) at once. The estimate is exact
where the metric is linear in the cell (e.g. the last block's ``mlp_out``/``resid_post`` when the final norm is
the identity) and can be far off elsewhere, so :func:`screen_and_confirm` uses it only to pick the cells that
:func:`probes.readouts.patching.patch_cells` then patches exactly. Native backend only.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Iterable

import pandas as pd
import torch
from torch import Tensor

from bridgeprobe.probes.readouts.heads import HEAD, edit_out_projection_input, n_heads
from bridgeprobe.probes.model.hooks import SITES, NativeHooks, _post_hook, _pre_hook
from bridgeprobe.probes.readouts.patching import (Pair, SweepResult, _normalize, _roles, _source_run, cell_frame,
                                                  patch_cells)


def attribution_sweep(
    hooked: NativeHooks,
    pair: Pair,
    *,
    sites: Iterable[str] = SITES,
    heads: bool = False,
    direction: str = "denoise",
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
) -> SweepResult:
    """Attribution estimates for every ``site x layer x position`` (and ``head`` cells with ``heads=True``), in
    the long format of :func:`probes.readouts.patching.sweep`: ``metric`` is the estimated patched metric (receiving
    metric + estimated change), ``value`` its normalized recovery, ``clean_prob`` NaN (not estimated)."""
    if not isinstance(hooked, NativeHooks):
        raise ValueError("attribution patching needs the native backend (NativeHooks)")
    receiving, source = _roles(direction)
    sites = list(sites)
    layers = list(range(hooked.n_layers)) if layers is None else [int(l) for l in layers]
    positions = list(range(pair.length)) if positions is None else [int(p) for p in positions]
    n = n_heads(hooked)
    cells = [(s, l, p) for s in sites for l in layers for p in positions]
    if heads:
        cells += [(HEAD, l, p, h) for l in layers for p in positions for h in range(n)]
    cells = _normalize(cells, hooked.n_layers, pair.length, n)
    site_keys = list(dict.fromkeys((c[0], c[1]) for c in cells if c[0] != HEAD))
    head_layers = sorted({c[1] for c in cells if c[0] == HEAD})

    with torch.no_grad():
        src, src_heads = _source_run(hooked, pair, source, cells)
    acts, head_acts, rec_logits = _run_with_grad(hooked, pair.ids(receiving), site_keys, head_layers)
    rec_metric = pair.score(rec_logits[:, -1])[0][0]
    tensors = list({id(t): t for t in [*acts.values(), *head_acts.values()]}.values())
    grads = torch.autograd.grad(rec_metric, tensors, allow_unused=True)
    grad_of = {id(t): (g if g is not None else torch.zeros_like(t)) for t, g in zip(tensors, grads)}

    with torch.no_grad():
        delta: dict[tuple, Tensor] = {}  # per (site, layer): [T] (sites) or [T, H] (heads)
        device = rec_metric.device  # with a device_map, sites live on their blocks' devices
        for key, act in acts.items():
            delta[key] = ((src.acts[key][0].float() - act[0].float()) * grad_of[id(act)][0].float()).sum(-1).to(device)
        for layer, act in head_acts.items():
            grad = grad_of[id(act)][0].float().unflatten(-1, (n, -1))
            diff = src_heads[layer][0].float() - act[0].detach().float().unflatten(-1, (n, -1))
            delta[(HEAD, layer)] = (diff * grad).sum(-1).to(device)
        estimate = torch.stack([
            delta[(c[0], c[1])][c[2], c[3]] if c[0] == HEAD else delta[(c[0], c[1])][c[2]] for c in cells
        ]) + rec_metric.detach()
        scores, probs = {}, {}
        for role, logits in ((source, src.logits), (receiving, rec_logits)):
            metric, prob = pair.score(logits[:, -1].detach())
            scores[role], probs[role] = float(metric[0]), float(prob[0])
    clean, corrupted = scores["clean"], scores["corrupted"]
    frame = cell_frame(cells, estimate, torch.full_like(estimate, math.nan), clean, corrupted)
    return SweepResult(frame, clean, corrupted, probs["clean"], probs["corrupted"], direction,
                       "attribution", 3.0)


def _run_with_grad(hooked: NativeHooks, input_ids: Tensor, site_keys: list[tuple[str, int]],
                   head_layers: list[int]) -> tuple[dict[tuple[str, int], Tensor], dict[int, Tensor], Tensor]:
    """A forward with autograd on, keeping the live (non-detached) site tensors and out-projection inputs."""
    acts: dict[tuple[str, int], Tensor] = {}
    head_acts: dict[int, Tensor] = {}

    def keep(store: dict, key: Any) -> Any:
        def transform(hidden: Tensor) -> Tensor:
            if not hidden.requires_grad:  # the earliest kept site: make it the leaf the graph starts from
                hidden = hidden.detach().requires_grad_(True)
            store[key] = hidden
            return hidden
        return transform

    device = hooked.model.get_input_embeddings().weight.device
    with ExitStack() as stack, torch.enable_grad():
        for key in site_keys:
            module, pre = hooked._site_hook(*key)
            handle = (module.register_forward_pre_hook(_pre_hook(keep(acts, key)), with_kwargs=True) if pre
                      else module.register_forward_hook(_post_hook(keep(acts, key))))
            stack.callback(handle.remove)
        for layer in head_layers:
            edit_out_projection_input(hooked, layer, keep(head_acts, layer), stack)
        ids = input_ids.to(device)
        out = hooked.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return acts, head_acts, out.logits


def screen_and_confirm(
    hooked: NativeHooks,
    pair: Pair,
    *,
    top_k: int = 20,
    sites: Iterable[str] = SITES,
    heads: bool = False,
    direction: str = "denoise",
    method: str = "auto",
    memory_budget: int | None = None,
) -> SweepResult:
    """Screen every cell with :func:`attribution_sweep`, then patch the ``top_k`` cells with the largest
    estimated ``|metric change|`` exactly. The frame has the exact :data:`~probes.readouts.patching.COLUMNS` plus
    ``estimate`` (estimated recovery), ``estimate_metric`` and ``rank`` (0 = largest estimate), best first."""
    screened = attribution_sweep(hooked, pair, sites=sites, heads=heads, direction=direction)
    frame = screened.frame
    receiving_metric = screened.corrupted_metric if direction == "denoise" else screened.clean_metric
    # resid_post[l] is resid_pre[l+1]: screen each residual cell once
    residual = frame["site"].isin(["resid_pre", "resid_post"])
    block = frame["layer"] + (frame["site"] == "resid_post")
    duplicate = residual & pd.DataFrame({"b": block, "p": frame["position"], "r": residual}).duplicated()
    effect = (frame["metric"] - receiving_metric).abs()[~duplicate]
    top = frame.loc[effect.sort_values(ascending=False, kind="stable").index[:top_k]]
    cells = [(r.site, r.layer, r.position, r.head) for r in top.itertuples()]
    exact = patch_cells(hooked, pair, cells, direction=direction, method=method, memory_budget=memory_budget)
    out = exact.frame.copy()
    out["estimate"] = top["value"].to_numpy()
    out["estimate_metric"] = top["metric"].to_numpy()
    out["rank"] = range(len(out))
    exact.frame = out
    exact.method = f"attribution+{exact.method}"
    exact.forward_equivalents += screened.forward_equivalents
    return exact
