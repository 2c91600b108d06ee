"""The bridge's lens rank after a patch, against plain HF hooks and hidden states, one cell at a time."""

from __future__ import annotations

import pytest
import torch

from conftest import plain_hf_patched_run, tiny_model
from probes.bridge_rank import bridge_rank_sweep
from probes.hooks import NativeHooks
from probes.patching import Pair
from probes.tl_backend import TransformerLensHooks


def _reference(model, receiving: list[int], source: list[int], layer: int, position: int, bridge: int) -> list[int]:
    """The patched run's hidden states through norm + lm_head (the last layer: its logits), ranked directly."""
    out = plain_hf_patched_run(model, source, receiving, layer, position, output_hidden_states=True)
    n = model.config.num_hidden_layers
    ranks = []
    with torch.no_grad():
        for k in range(layer, n):
            logits = out.logits[0, -1] if k == n - 1 else model.lm_head(model.model.norm(out.hidden_states[k + 1][0, -1]))
            ranks.append(int((logits > logits[bridge]).sum()))
    return ranks


@pytest.mark.parametrize("backend", [NativeHooks, TransformerLensHooks])
def test_bridge_ranks_after_patching_match_plain_hf(backend: type) -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(1, 128, (2, 7), generator=gen).tolist()
    pair = Pair(clean, corrupted, 3, 4)
    frame = bridge_rank_sweep(backend(model), pair, bridge_token=9, batch_size=5)
    assert len(frame) == sum((3 - l) * 7 for l in range(3))
    for (layer, position), cell in frame.groupby(["layer", "position"]):
        expected = _reference(model, corrupted, clean, layer, position, bridge=9)
        assert cell.sort_values("readout_layer")["bridge_rank"].tolist() == expected
    # the baseline is the unpatched receiving run's rank
    with torch.no_grad():
        logits = model(torch.tensor([corrupted])).logits[0, -1]
    assert (frame[frame.readout_layer == 2]["baseline_rank"] == int((logits > logits[9]).sum())).all()
