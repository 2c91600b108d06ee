"""Both hooking backends against plain HF computations, on tiny random models and the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_CONFIGS, requires_gemma3, requires_transformer_lens, tiny_model, tl_hooks
from bridgeprobe.probes.model.hooks import SITES, NativeHooks, Patch, pad_right
from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

TOL = 1e-4
ALL_SITES = lambda n: [(s, l) for s in SITES for l in range(n)]  # noqa: E731


def _ids(n_seq: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (n_seq, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_native_sites_match_hf_hidden_states(kind: str) -> None:
    model = tiny_model(kind)
    hooked = NativeHooks(model)
    ids = _ids()
    result = hooked.run(ids, read=ALL_SITES(hooked.n_layers))
    ref = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(result.logits, ref.logits, rtol=0, atol=TOL)
    for layer in range(hooked.n_layers):
        # HF's hidden_states[l] is the input of block l (the last entry is after the final norm, so not used)
        torch.testing.assert_close(result.acts[("resid_pre", layer)], ref.hidden_states[layer], rtol=0, atol=TOL)
        delta = result.acts[("resid_post", layer)] - result.acts[("resid_pre", layer)]
        parts = result.acts[("attn_out", layer)] + result.acts[("mlp_out", layer)]
        torch.testing.assert_close(parts, delta, rtol=0, atol=TOL)
    last = hooked.readout(result.acts[("resid_post", hooked.n_layers - 1)])
    torch.testing.assert_close(last, ref.logits, rtol=0, atol=TOL)


@requires_transformer_lens
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_transformer_lens_backend_matches_native(kind: str) -> None:
    model = tiny_model(kind)
    native, bridge = NativeHooks(model), TransformerLensHooks(model)
    ids = _ids()
    a = native.run(ids, read=ALL_SITES(native.n_layers))
    b = bridge.run(ids, read=ALL_SITES(bridge.n_layers))
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=TOL)
    for key in a.acts:
        torch.testing.assert_close(b.acts[key], a.acts[key], rtol=0, atol=TOL, msg=f"{kind} {key}")
    h = a.acts[("resid_post", 1)]
    torch.testing.assert_close(bridge.readout(h), native.readout(h), rtol=0, atol=TOL)


@pytest.mark.parametrize("backend", [NativeHooks, tl_hooks()])
@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_batched_with_padding_equals_one_at_a_time(kind: str, backend: type) -> None:
    hooked = backend(tiny_model(kind))
    seqs = [_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6, 12)]
    ids, mask = pad_right(seqs)
    batch = hooked.run(ids, mask, read=ALL_SITES(hooked.n_layers))
    for i, seq in enumerate(seqs):
        single = hooked.run(torch.tensor([seq]), read=ALL_SITES(hooked.n_layers))
        n = len(seq)
        torch.testing.assert_close(batch.logits[i, :n], single.logits[0], rtol=0, atol=TOL)
        for key, value in single.acts.items():
            torch.testing.assert_close(batch.acts[key][i, :n], value[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("backend", [NativeHooks, tl_hooks()])
def test_early_stop_and_position_gather(backend: type) -> None:
    hooked = backend(tiny_model("llama"))
    ids = _ids()
    full = hooked.run(ids, read=[("resid_post", 1)])
    positions = torch.tensor([[9, 0], [4, 5]])
    early = hooked.run(ids, read=[("resid_post", 1)], positions=positions, logits=False)
    assert early.logits is None
    expected = torch.stack([full.acts[("resid_post", 1)][b, positions[b]] for b in range(2)])
    torch.testing.assert_close(early.acts[("resid_post", 1)], expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [NativeHooks, tl_hooks()])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_patching_all_of_layer0_gives_the_clean_run(kind: str, backend: type) -> None:
    hooked = backend(tiny_model(kind))
    clean, corrupt = _ids(1, 8, seed=3), _ids(1, 8, seed=4)
    cached = hooked.run(clean, read=[("resid_pre", 0)])
    plain = hooked.run(corrupt)
    everywhere = Patch("resid_pre", 0, torch.zeros(8, dtype=torch.long), torch.arange(8),
                       cached.acts[("resid_pre", 0)][0])
    torch.testing.assert_close(hooked.run(corrupt, patches=[everywhere]).logits, cached.logits, rtol=0, atol=TOL)
    assert hooked.run(corrupt, patches=[]).logits.equal(plain.logits)
    # a patch at the last position of a late site changes only that position's logits
    late = Patch("resid_post", 2, torch.tensor([0]), torch.tensor([7]), cached.acts[("resid_pre", 0)][0, :1])
    patched = hooked.run(corrupt, patches=[late]).logits
    torch.testing.assert_close(patched[0, :7], plain.logits[0, :7], rtol=0, atol=0)
    assert not torch.allclose(patched[0, 7], plain.logits[0, 7])


def test_bad_site_and_layer_are_rejected() -> None:
    hooked = NativeHooks(tiny_model("llama"))
    with pytest.raises(ValueError, match="unknown site"):
        hooked.run(_ids(), read=[("resid_mid", 0)])
    with pytest.raises(ValueError, match="out of range"):
        hooked.run(_ids(), read=[("resid_post", 3)])


@pytest.mark.slow
@requires_transformer_lens
def test_real_smollm2_backends_match_plain_hf(smollm2) -> None:
    model, tokenizer = smollm2
    texts = ["The Eiffel Tower is located in the country of", "Mount Fuji is in"]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    ids, mask = pad_right(seqs)
    reference = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    native = NativeHooks(model, tokenizer).run(ids, mask, read=[("resid_post", 29)])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(native.logits[i, : len(s)], reference[i], rtol=0, atol=TOL)
        last = NativeHooks(model).readout(native.acts[("resid_post", 29)][i, : len(s)])
        torch.testing.assert_close(last, reference[i], rtol=0, atol=TOL)
    # TransformerLens runs eager attention; compare it with an eager copy of the plain HF model
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    bridge = TransformerLensHooks(model, tokenizer).run(ids, mask, read=ALL_SITES(30))
    plain = NativeHooks(eager).run(ids, mask, read=ALL_SITES(30))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(bridge.logits[i, : len(s)], plain.logits[i, : len(s)], rtol=0, atol=TOL)
        for key in plain.acts:
            torch.testing.assert_close(bridge.acts[key][i, : len(s)], plain.acts[key][i, : len(s)], rtol=0, atol=TOL)


@pytest.mark.slow
@requires_gemma3
def test_real_gemma3_native_matches_plain_hf() -> None:
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model("gemma3-270m")
    seqs = [tokenizer(t)["input_ids"] for t in ("Mount Fuji is located in the country of", "The capital of Japan is")]
    ids, mask = pad_right(seqs)
    hooked = NativeHooks(model, tokenizer)
    result = hooked.run(ids, mask, read=[("resid_post", hooked.n_layers - 1)])
    for i, s in enumerate(seqs):
        reference = model(input_ids=torch.tensor([s])).logits[0]
        torch.testing.assert_close(result.logits[i, : len(s)], reference, rtol=0, atol=TOL)
        last = hooked.readout(result.acts[("resid_post", hooked.n_layers - 1)][i, : len(s)])
        torch.testing.assert_close(last, reference, rtol=0, atol=TOL)
