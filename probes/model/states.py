"""Residual-stream states at chosen positions, read in one batched forward: the shared reader of the
shared-memory analyses (:mod:`probes.memory.analysis`) and the alignment statistics (:mod:`probes.memory.alignment`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from bridgeprobe.probes.model.hooks import HookedModel, pad_right


@torch.no_grad()
def read_states(hooked: HookedModel, prompts: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[Tensor, Tensor]:
    """One batched forward of ``prompts`` (token ids, positions to read): ``resid_post`` of every block at those
    positions (``[B, K, L, d]``, shorter position lists repeat their last entry) and the final logits at each
    prompt's last token (``[B, vocab]``)."""
    width = max(len(p) for _, p in prompts)
    ids, mask = pad_right([list(i) for i, _ in prompts])
    positions = torch.tensor([list(p) + [p[-1]] * (width - len(p)) + [len(i) - 1] for i, p in prompts])
    layers = range(hooked.n_layers)
    out = hooked.run(ids, mask, read=[("resid_post", l) for l in layers], positions=positions, logits=False)
    states = torch.stack([out.acts[("resid_post", l)] for l in layers], dim=2)  # [B, K + 1, L, d]
    logits = hooked.readout(states[:, -1, -1]).float()
    return states[:, :width].cpu(), logits.cpu()
