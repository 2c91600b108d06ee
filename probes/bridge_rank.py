"""Patching read through the logit lens: does a patch make the bridge entity readable at later layers?

For each ``(layer, position)`` patch of one site (source activations into the receiving run, as in
:mod:`probes.patching`), the bridge token's logit-lens rank (0-based, :mod:`probes.lens` conventions) at the last
position, read at every block from the patched one to the last. ``baseline_rank`` is the receiving run's own rank
at that readout layer, so ``bridge_rank < baseline_rank`` means the patch brought the bridge closer to the top.
This uses batched full forwards through :meth:`HookedModel.run` (any backend), one patched variant per row.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from probes.hooks import SITES, HookedModel, Patch
from probes.patching import Pair, _roles

COLUMNS = ("site", "layer", "position", "readout_layer", "bridge_rank", "baseline_rank")


def _last_ranks(hooked: HookedModel, result_acts: dict, bridge_token: int) -> Tensor:
    """``[layers, rows]`` rank of the bridge at the last position, from resid_post reads gathered there."""
    hidden = torch.stack([result_acts[("resid_post", k)][:, -1] for k in range(hooked.n_layers)])
    logits = hooked.readout(hidden).float()  # [layers, rows, vocab]
    chosen = logits[..., bridge_token]
    return (logits > chosen[..., None]).sum(-1).cpu()


@torch.no_grad()
def bridge_rank_sweep(hooked: HookedModel, pair: Pair, bridge_token: int, site: str = "resid_pre", *,
                      direction: str = "denoise", batch_size: int = 16) -> pd.DataFrame:
    """Long table (:data:`COLUMNS`) of the bridge's lens rank after each single-cell patch of ``site``."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    receiving, source = _roles(direction)
    n_layers, length = hooked.n_layers, pair.length
    reads = [("resid_post", k) for k in range(n_layers)]
    last = torch.tensor([[length - 1]])
    src = hooked.run(pair.ids(source), read=[(site, l) for l in range(n_layers)], logits=False)
    base = hooked.run(pair.ids(receiving), read=reads, positions=last, logits=False)
    baseline = _last_ranks(hooked, base.acts, bridge_token)[:, 0]
    cells = [(l, p) for l in range(n_layers) for p in range(length)]
    rows = []
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        patches = []
        for layer in sorted({l for l, _ in chunk}):
            index = [i for i, (l, _) in enumerate(chunk) if l == layer]
            positions = torch.tensor([chunk[i][1] for i in index])
            patches.append(Patch(site, layer, torch.tensor(index), positions, src.acts[(site, layer)][0, positions]))
        ids = pair.ids(receiving).expand(len(chunk), -1)
        result = hooked.run(ids, read=reads, patches=patches, positions=last.expand(len(chunk), 1), logits=False)
        ranks = _last_ranks(hooked, result.acts, bridge_token)
        for i, (layer, position) in enumerate(chunk):
            for k in range(layer, n_layers):
                rows.append((site, layer, position, k, int(ranks[k, i]), int(baseline[k])))
    return pd.DataFrame(rows, columns=list(COLUMNS))
