"""The bridge's lens rank after a patch, against plain HF hooks and hidden states, one cell at a time."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from probes.bridge_rank import bridge_rank_sweep
from probes.hooks import NativeHooks
from probes.patching import Pair
from probes.tl_backend import TransformerLensHooks


def _reference(model, receiving: list[int], source: list[int], layer: int, position: int, bridge: int) -> list[int]:
    """Patch resid_pre[layer] at ``position`` with a forward pre-hook, read hidden_states through norm + lm_head."""
    block = model.model.layers[layer]
    captured = {}

    def capture(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def write(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, position] = captured["h"][:, position]
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    with torch.no_grad():
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        model(torch.tensor([source]))
        handle.remove()
        handle = block.register_forward_pre_hook(write, with_kwargs=True)
        out = model(torch.tensor([receiving]), output_hidden_states=True)
        handle.remove()
        n = model.config.num_hidden_layers
        ranks = []
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
