"""The bridge's lens rank after a patch, against plain HF hooks and hidden states, one cell at a time."""

from __future__ import annotations

import pytest
import torch

from conftest import plain_hf_patched_run, requires_transformer_lens, tiny_model
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.patching import Pair, sweep
from bridgeprobe.probes.model.tl_backend import TransformerLensHooks


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


@pytest.mark.parametrize("backend, method", [
    (NativeHooks, "fast"), (NativeHooks, "naive"),
    pytest.param(TransformerLensHooks, "batched", marks=requires_transformer_lens, id="TransformerLensHooks-batched")])
def test_bridge_ranks_after_patching_match_plain_hf(backend: type, method: str) -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(1, 128, (2, 7), generator=gen).tolist()
    pair = Pair(clean, corrupted, 3, 4)
    result = sweep(backend(model), pair, "resid_pre", bridge_token=9, method=method, memory_budget=1)
    frame = result.bridge
    assert result.method == method and len(frame) == sum((3 - l) * 7 for l in range(3))
    for (layer, position), cell in frame.groupby(["layer", "position"]):
        expected = _reference(model, corrupted, clean, layer, position, bridge=9)
        assert cell.sort_values("readout_layer")["bridge_rank"].tolist() == expected
    # the baseline is the unpatched receiving run's rank
    with torch.no_grad():
        logits = model(torch.tensor([corrupted])).logits[0, -1]
    assert (frame[frame.readout_layer == 2]["baseline_rank"] == int((logits > logits[9]).sum())).all()


@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out"])
def test_bridge_ranks_fast_equal_naive_for_every_site(site: str) -> None:
    hooked = NativeHooks(tiny_model("gemma3_text"))
    gen = torch.Generator().manual_seed(6)
    clean, corrupted = torch.randint(1, 128, (2, 8), generator=gen).tolist()
    pair = Pair(clean, corrupted, 3, 4)
    fast = sweep(hooked, pair, site, bridge_token=11, method="fast", direction="noise")
    naive = sweep(hooked, pair, site, bridge_token=11, method="naive", direction="noise")
    assert fast.bridge.equals(naive.bridge)
    assert (fast.bridge["bridge_rank"] != fast.bridge["baseline_rank"]).any()  # the patches do move the ranks
