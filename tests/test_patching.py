"""Activation patching: the fast engine against the naive one-forward-per-patch loop, head patching, attribution
patching, on tiny random models (several architectures) and the real SmolLM2-135M."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, GPTNeoXConfig, MistralConfig, Qwen3Config
from transformers.models.gemma3 import Gemma3TextConfig

from conftest import TINY_CONFIGS, CharTokenizer, requires_gemma3, requires_smollm2, requires_transformer_lens
from bridgeprobe.probes.readouts.attribution import attribution_sweep, screen_and_confirm
from bridgeprobe.probes.model.hooks import SITES, NativeHooks
from bridgeprobe.probes.readouts.heads import n_heads
from bridgeprobe.probes.readouts.patching import COLUMNS, Pair, head_sweep, patch_cells, patch_jointly, sweep
from bridgeprobe.probes.readouts.variants import FAST_ARCHITECTURES, fast_supported, plan_groups
from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

TOL = 1e-4

# more architectures for the fast path: a Gemma 3 mixing sliding-window and full layers (block numbers must stay
# aligned with layer_types), Gemma 2 (attention soft-capping, alternating windows), Qwen 3, Mistral (window)
EXTRA_CONFIGS = {
    "gemma3_mixed": lambda: Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "gemma2": lambda: Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=3,
    ),
    "qwen3": lambda: Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
    ),
    # not in FAST_ARCHITECTURES: method="auto" must fall back to the batched path
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64,
    ),
}
FAST_KINDS = sorted(TINY_CONFIGS) + ["gemma3_mixed", "gemma2", "qwen3", "mistral"]


def model_of(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random model; weights drawn 10x wider than HF's default (std 0.2) so that patches move the metric
    by O(1), not by amounts near float resolution that any implementation would reproduce."""
    torch.manual_seed(seed)
    config = (TINY_CONFIGS.get(kind) or EXTRA_CONFIGS[kind])()
    config.architectures = None
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pair(length: int = 9, shared: int = 2, seed: int = 0) -> Pair:
    """Two random sequences sharing their first ``shared`` tokens (as real pairs share a prefix)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 128, (length,), generator=g).tolist()
    corrupt = clean[:shared] + torch.randint(1, 128, (length - shared,), generator=g).tolist()
    return Pair(clean, corrupt, clean_answer=3, corrupt_answer=4)


def assert_same(a, b, tol: float = TOL) -> None:
    assert list(a.frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    keys = ["site", "layer", "position"]
    assert a.frame[keys].equals(b.frame[keys])
    assert list(a.frame["head"]) == list(b.frame["head"])
    for column in ("metric", "value", "clean_prob"):
        diff = (a.frame[column] - b.frame[column]).abs().max()
        assert diff <= tol, f"{column} differs by {diff}"
    assert abs(a.clean_metric - b.clean_metric) <= tol and abs(a.corrupted_metric - b.corrupted_metric) <= tol


# ------------------------------------------------------------------------------------------------- pairs


def test_pair_validation_and_tokenization() -> None:
    with pytest.raises(ValueError, match="same number of tokens"):
        Pair([1, 2, 3], [1, 2], 5, 6)
    with pytest.raises(ValueError, match="same token"):
        Pair([1, 2], [1, 3], 5, 5)
    tok = CharTokenizer()
    pair = Pair.from_text(tok, "ab", "ac", "x", "y", sep="")
    assert pair.clean == (0, 1 + ord("a"), 1 + ord("b")) and pair.clean_answer == 1 + ord("x")
    with pytest.raises(ValueError, match="same number of tokens"):
        Pair.from_text(tok, "ab", "abc", "x", "y", sep="")
    hooked = NativeHooks(model_of("llama"))
    with pytest.raises(ValueError, match="direction"):
        sweep(hooked, random_pair(), direction="sideways")
    with pytest.raises(ValueError, match="out of range"):
        sweep(hooked, random_pair(), positions=[9])


# ------------------------------------------------------------------------------------------------- exact sweeps


@pytest.mark.parametrize("kind", FAST_KINDS)
@pytest.mark.parametrize("site", SITES)
def test_fast_sweep_matches_naive_loop(kind: str, site: str) -> None:
    hooked = NativeHooks(model_of(kind))
    assert fast_supported(hooked)
    pair = random_pair(seed=len(kind))
    for direction, overhead in (("denoise", 0), ("noise", 10**9)):  # one group per position / per layer
        naive = sweep(hooked, pair, site, direction=direction, method="naive")
        fast = sweep(hooked, pair, site, direction=direction, method="fast", overhead_tokens=overhead)
        assert fast.method == "fast" and naive.forward_equivalents == hooked.n_layers * pair.length
        assert_same(fast, naive)
        assert fast.forward_equivalents < naive.forward_equivalents / 2
        # the sweep is not trivially constant: patches do move the metric
        assert naive.frame["metric"].std() > 1e-3


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_batched_sweep_matches_naive_loop(kind: str) -> None:
    hooked = NativeHooks(model_of(kind))
    pair = random_pair()
    for site in SITES:
        assert_same(sweep(hooked, pair, site, method="batched", memory_budget=1), sweep(hooked, pair, site,
                                                                                       method="naive"))


def test_fast_sweep_with_a_small_memory_budget_and_subsets() -> None:
    hooked = NativeHooks(model_of("gemma3_mixed"))
    pair = random_pair(length=11, shared=3)
    kwargs = {"layers": [2, 0], "positions": [10, 4, 5]}
    tight = sweep(hooked, pair, "attn_out", memory_budget=1, overhead_tokens=10**9, **kwargs)  # 1 row per forward
    assert_same(tight, sweep(hooked, pair, "attn_out", method="naive", **kwargs))
    assert list(tight.frame["layer"]) == [2, 2, 2, 0, 0, 0] and list(tight.frame["position"]) == [10, 4, 5] * 2


def test_fast_passes_keep_their_last_position_logits_within_the_budget() -> None:
    """A fast pass unembeds one position per row: with a large vocabulary (Gemma 3: 1 MiB of fp32 logits per row)
    those logits dominate a pass's memory and must count against the budget, not only the activations."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.vocab_size, config.architectures, config.initializer_range = 32768, None, 0.2
    hooked = NativeHooks(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval())
    budget = 4 * config.vocab_size * 3  # room for three rows' logits
    rows: list[int] = []
    readout = hooked.readout

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        logits = readout(hidden)
        rows.append(logits.shape[0])
        return logits

    hooked.readout = counting
    pair = random_pair(length=11, shared=3)
    fast = sweep(hooked, pair, "resid_pre", method="fast", memory_budget=budget, overhead_tokens=10**9)
    del hooked.readout
    assert_same(fast, sweep(hooked, pair, "resid_pre", method="naive"))
    assert max(rows) * 4 * config.vocab_size <= budget
    assert max(rows) > 1  # the budget still batches rows


def test_unverified_architecture_falls_back_to_batched() -> None:
    hooked = NativeHooks(model_of("gpt_neox"))
    assert hooked.model.config.model_type not in FAST_ARCHITECTURES and not fast_supported(hooked)
    pair = random_pair()
    auto = sweep(hooked, pair, "mlp_out")
    assert auto.method == "batched"
    assert_same(auto, sweep(hooked, pair, "mlp_out", method="naive"))
    with pytest.warns(UserWarning, match="not verified"):
        sweep(hooked, pair, "mlp_out", method="fast", layers=[0], positions=[8])


@requires_transformer_lens
def test_transformer_lens_backend_uses_batched_path() -> None:
    model = model_of("llama")
    bridge, native = TransformerLensHooks(model), NativeHooks(model)
    pair = random_pair()
    result = sweep(bridge, pair, "resid_post")
    assert result.method == "batched"
    assert_same(result, sweep(native, pair, "resid_post", method="fast"))
    with pytest.raises(ValueError, match="native backend"):
        sweep(bridge, pair, method="fast")


def test_nothing_patched_gives_corrupted_and_layer0_everywhere_gives_clean() -> None:
    hooked = NativeHooks(model_of("llama"))
    pair = random_pair()
    result = sweep(hooked, pair, "resid_pre", layers=[0])
    nothing = patch_jointly(hooked, pair, [])
    assert nothing.metric == pytest.approx(result.corrupted_metric, abs=TOL) and nothing.value == pytest.approx(0)
    everywhere = [("resid_pre", 0, p) for p in range(pair.length)]
    denoised = patch_jointly(hooked, pair, everywhere)
    assert denoised.metric == pytest.approx(result.clean_metric, abs=TOL)
    assert denoised.value == pytest.approx(1, abs=TOL)
    noised = patch_jointly(hooked, pair, everywhere, direction="noise")
    assert noised.metric == pytest.approx(result.corrupted_metric, abs=TOL) and noised.value == pytest.approx(0,
                                                                                                              abs=TOL)
    # positions of the shared prefix patch nothing: exactly the corrupted metric
    prefix = result.frame[result.frame["position"] < 2]
    assert (prefix["metric"] == result.corrupted_metric).all() and (prefix["value"] == 0).all()
    # the last position of the last resid_post decides alone: full recovery
    last = sweep(hooked, pair, "resid_post", layers=[2], positions=[8]).frame.iloc[0]
    assert last["value"] == pytest.approx(1, abs=TOL)


def test_out_of_memory_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    hooked = NativeHooks(model_of("qwen2"))
    pair = random_pair()
    reference = sweep(hooked, pair, "mlp_out", method="naive")
    original_from, original_run = NativeHooks.run_from, NativeHooks.run
    sizes = []

    def run_from(self, start, hidden, **kwargs):
        sizes.append(hidden.shape[0])
        if hidden.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return original_from(self, start, hidden, **kwargs)

    def run(self, input_ids, *args, **kwargs):
        if input_ids.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original_run(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(NativeHooks, "run_from", run_from)
    monkeypatch.setattr(NativeHooks, "run", run)
    fast = sweep(hooked, pair, "mlp_out", method="fast", overhead_tokens=10**9)
    assert_same(fast, reference)
    assert max(sizes) > 2 and sizes[-1] <= 2
    assert_same(sweep(hooked, pair, "mlp_out", method="batched"), reference)

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")  # other errors are not swallowed

    monkeypatch.setattr(NativeHooks, "run_from", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sweep(hooked, pair, "mlp_out", method="fast")


def test_plan_groups() -> None:
    items = [(p, 2, 1.0) for p in range(6)]
    assert plan_groups(items, 6, capacity=10**6, overhead=10**6) == [list(range(6))]
    assert plan_groups(items, 6, capacity=10**6, overhead=0) == [[i] for i in range(6)]
    for group in plan_groups(items, 6, capacity=24, overhead=10**6):  # at most 2 items (4 rows x 6) per group
        assert len(group) <= 2
    assert plan_groups([(0, 100, 50.0)], 6, capacity=1, overhead=0) == [[0]]  # one oversized item still runs
    # merging the two items computes 2 extra token-rows (item 1 from position 4): worth it above overhead 2
    assert plan_groups([(4, 2, 2.0), (5, 2, 2.0)], 6, capacity=10**6, overhead=1.9) == [[0], [1]]
    assert plan_groups([(4, 2, 2.0), (5, 2, 2.0)], 6, capacity=10**6, overhead=2.1) == [[0, 1]]


# ------------------------------------------------------------------------------------------------- run_from


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3_mixed"])
def test_run_from_resumes_the_forward(kind: str) -> None:
    hooked = NativeHooks(model_of(kind))
    ids = random_pair(length=8).ids("clean")
    full, kv = hooked.run_with_kv(ids, read=[("resid_pre", l) for l in range(hooked.n_layers)])
    blocks = list(hooked.modules.blocks)
    for start in range(hooked.n_layers):
        for p0 in (0, 3, 7):
            hidden = full.acts[("resid_pre", start)][:, p0:].expand(2, -1, -1)
            past = [(k[:, :, :p0], v[:, :, :p0]) for k, v in kv] if p0 else None
            out = hooked.run_from(start, hidden, past_kv=past, logits_to_keep=1)
            assert out.logits.shape[:2] == (2, 1)
            torch.testing.assert_close(out.logits[:, 0], full.logits[:, -1].expand(2, -1), rtol=0, atol=TOL)
    assert list(hooked.modules.blocks) == blocks  # the skipped blocks are put back
    with pytest.raises(ValueError, match="before the first block"):
        hooked.run_from(2, full.acts[("resid_pre", 2)], read=[("mlp_out", 1)])
    assert list(hooked.modules.blocks) == blocks


# ------------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_head_sweep_matches_naive_loop(kind: str) -> None:
    hooked = NativeHooks(model_of(kind))
    pair = random_pair(seed=3)
    for direction in ("denoise", "noise"):
        fast = head_sweep(hooked, pair, direction=direction, positions=[1, 5, 8])
        assert fast.method == "fast" and set(fast.frame["site"]) == {"head"}
        assert sorted(set(fast.frame["head"])) == list(range(n_heads(hooked)))
        assert_same(fast, head_sweep(hooked, pair, direction=direction, positions=[1, 5, 8], method="naive"))
        assert_same(fast, head_sweep(hooked, pair, direction=direction, positions=[1, 5, 8], method="batched"))


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_all_heads_together_equal_attn_out(kind: str) -> None:
    # true for every per-position post-attention norm too (Gemma 3): the o_proj input fixes attn_out there
    hooked = NativeHooks(model_of(kind))
    pair = random_pair(seed=5)
    heads = n_heads(hooked)
    for layer, position in ((0, 4), (1, 6), (2, 8)):  # (the last block matters at the last position only)
        together = patch_jointly(hooked, pair, [("head", layer, position, h) for h in range(heads)])
        attn = patch_jointly(hooked, pair, [("attn_out", layer, position)])
        assert together.metric == pytest.approx(attn.metric, abs=TOL)
        one = patch_jointly(hooked, pair, [("head", layer, position, 0)])
        assert abs(one.metric - attn.metric) > 1e-6  # a single head is not the whole attention output


# ------------------------------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_attribution_is_exact_where_the_metric_is_linear(kind: str) -> None:
    model = model_of(kind)
    # with the final norm gone, the logits are linear in the last block's output and in its MLP output
    if kind == "gpt2":
        model.transformer.ln_f = nn.Identity()
    else:
        model.model.norm = nn.Identity()
    hooked = NativeHooks(model)
    pair = random_pair(seed=7)
    last = hooked.n_layers - 1
    for direction in ("denoise", "noise"):
        estimate = attribution_sweep(hooked, pair, direction=direction, layers=[last])
        cells = [(r.site, r.layer, r.position) for r in estimate.frame.itertuples()]
        exact = patch_cells(hooked, pair, cells, direction=direction, method="naive")
        error = (estimate.frame["metric"] - exact.frame["metric"]).abs().groupby(estimate.frame["site"]).max()
        assert error["resid_post"] <= TOL and error["mlp_out"] <= TOL, error
        assert error["attn_out"] > 10 * TOL  # the MLP after attention is not linear: only an estimate there
        assert estimate.clean_metric == pytest.approx(exact.clean_metric, abs=TOL)
        assert estimate.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=TOL)


def test_attribution_heads_match_attribution_of_attn_out_sum() -> None:
    # first order is additive: the head estimates at a position sum to the attn_out estimate (Llama: o_proj linear)
    hooked = NativeHooks(model_of("llama"))
    pair = random_pair(seed=9)
    result = attribution_sweep(hooked, pair, sites=["attn_out"], heads=True)
    frame = result.frame
    base = result.corrupted_metric
    heads = frame[frame["site"] == "head"].assign(delta=lambda f: f["metric"] - base)
    summed = heads.groupby(["layer", "position"])["delta"].sum()
    attn = frame[frame["site"] == "attn_out"].set_index(["layer", "position"])["metric"] - base
    pd.testing.assert_series_equal(summed, attn.rename("delta"), atol=1e-5, rtol=0, check_names=False)


def test_screen_and_confirm_patches_the_top_cells_exactly() -> None:
    hooked = NativeHooks(model_of("qwen2"))
    pair = random_pair(seed=11)
    result = screen_and_confirm(hooked, pair, top_k=6, heads=True)
    frame = result.frame
    assert len(frame) == 6 and list(frame["rank"]) == list(range(6))
    assert {"estimate", "estimate_metric"} <= set(frame.columns)
    exact = patch_cells(hooked, pair, [(r.site, r.layer, r.position, r.head) for r in frame.itertuples()],
                        method="naive")
    assert (frame["metric"] - exact.frame["metric"]).abs().max() <= TOL
    effects = (frame["estimate_metric"] - result.corrupted_metric).abs()
    assert effects.is_monotonic_decreasing


# ------------------------------------------------------------------------------------------------- SmolLM2


def smollm2_pair(tokenizer) -> Pair:
    return Pair.from_text(tokenizer, "The capital of the country where the Eiffel Tower is located is",
                          "The capital of the country where the Colosseum is located is", "Paris", "Rome")


@pytest.mark.slow
def test_real_smollm2_fast_matches_naive(smollm2) -> None:
    model, tokenizer = smollm2
    hooked = NativeHooks(model, tokenizer)
    pair = smollm2_pair(tokenizer)
    assert 12 <= pair.length <= 16
    layers = [0, 13, 29]
    timings = {"fast": 0.0, "naive": 0.0}
    for site in SITES:
        for direction in ("denoise", "noise"):
            t0 = time.perf_counter()
            fast = sweep(hooked, pair, site, direction=direction, layers=layers)
            t1 = time.perf_counter()
            naive = sweep(hooked, pair, site, direction=direction, layers=layers, method="naive")
            t2 = time.perf_counter()
            timings["fast"] += t1 - t0
            timings["naive"] += t2 - t1
            assert fast.method == "fast"
            assert_same(fast, naive)
    assert fast.clean_metric > 0 > fast.corrupted_metric  # the model prefers Paris / Rome on its own prompt
    # resid_pre of the differing tokens at layer 0 carries the whole effect; the shared prefix nothing
    grid = sweep(hooked, pair, "resid_pre", layers=[0]).frame.set_index("position")["value"]
    assert grid.iloc[:7].abs().max() == 0 and grid.max() > 0.5
    print(f"\nSmolLM2 {len(layers)} layers x {pair.length} positions x 8 sweeps: fast {timings['fast']:.1f} s, "
          f"naive {timings['naive']:.1f} s ({timings['naive'] / timings['fast']:.1f}x)")


@pytest.mark.slow
def test_real_smollm2_heads_and_full_grid(smollm2) -> None:
    model, tokenizer = smollm2
    hooked = NativeHooks(model, tokenizer)
    pair = smollm2_pair(tokenizer)
    last = pair.length - 1
    heads = head_sweep(hooked, pair, layers=[5, 20], positions=[8, last])
    assert_same(heads, head_sweep(hooked, pair, layers=[5, 20], positions=[8, last], method="batched"))
    full = sweep(hooked, pair, "attn_out")
    assert_same(full, sweep(hooked, pair, "attn_out", method="batched"))
    assert full.forward_equivalents < hooked.n_layers * pair.length / 4


@pytest.mark.slow
@requires_gemma3
def test_real_gemma3_fast_matches_naive() -> None:
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model("gemma3-270m")
    hooked = NativeHooks(model, tokenizer)
    assert model.config.model_type == "gemma3_text" and len(set(model.config.layer_types)) == 2
    pair = Pair.from_text(tokenizer, "The Eiffel Tower is in the country whose capital city is",
                          "The Colosseum is in the country whose capital city is", "Paris", "Rome")
    layers = [0, 5, 17]  # sliding-window and full-attention layers
    for site in ("resid_pre", "attn_out"):
        for direction in ("denoise", "noise"):
            fast = sweep(hooked, pair, site, direction=direction, layers=layers)
            assert fast.method == "fast"
            assert_same(fast, sweep(hooked, pair, site, direction=direction, layers=layers, method="naive"))
    heads = head_sweep(hooked, pair, layers=[5], positions=[3, pair.length - 1])
    assert_same(heads, head_sweep(hooked, pair, layers=[5], positions=[3, pair.length - 1], method="naive"))


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.slow
@requires_smollm2
def test_real_out_of_memory_on_gpu_backs_off_to_the_same_values() -> None:
    """A memory budget far above the GPU's makes the first fast pass (and the first batched forward) allocate more
    than the card holds; both back off and still agree with each other."""
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model("smollm2-135m", device="cuda")
    hooked = NativeHooks(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(100, 40000, (2, 512), generator=g).tolist()
    pair = Pair(clean, corrupt, 100, 200)
    huge = 10 * torch.cuda.get_device_properties(0).total_memory
    fast = sweep(hooked, pair, "resid_pre", layers=range(6), memory_budget=huge)
    batched = sweep(hooked, pair, "resid_pre", layers=[0, 5], positions=range(0, 512, 16), method="batched",
                    memory_budget=huge)
    joined = fast.frame.merge(batched.frame, on=["site", "layer", "position"], suffixes=("", "_b"))
    assert len(joined) == 64 and (joined["metric"] - joined["metric_b"]).abs().max() <= 1e-3


@pytest.mark.gpu
@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("options", [{"dtype": "bfloat16", "device": "cuda"},
                                     {"device_map": "auto", "max_memory": {0: "200MiB", "cpu": "8GiB"}}])
def test_real_fast_sweep_on_gpu_matches_naive(options: dict) -> None:
    """bf16 on the GPU, and fp32 split between the GPU and the CPU by accelerate (blocks on two devices)."""
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model("smollm2-135m", **options)
    devices = {p.device.type for p in model.parameters()}
    assert "cuda" in devices and ("cpu" in devices) == ("device_map" in options)
    hooked = NativeHooks(model, tokenizer)
    pair = smollm2_pair(tokenizer)
    for site in ("resid_pre", "attn_out"):
        fast = sweep(hooked, pair, site, layers=[0, 14, 29], bridge_token=tokenizer(" France")["input_ids"][0])
        naive = sweep(hooked, pair, site, layers=[0, 14, 29], method="naive",
                      bridge_token=tokenizer(" France")["input_ids"][0])
        assert fast.method == "fast"
        bf16 = options.get("dtype") == "bfloat16"  # other kernels for other batch shapes: bf16 rounding differs
        tol = 5e-2 if bf16 else TOL
        assert (fast.frame["metric"] - naive.frame["metric"]).abs().max() <= tol * max(1, abs(naive.clean_metric))
        rank_diff = (fast.bridge["bridge_rank"] - naive.bridge["bridge_rank"]).abs()
        assert (rank_diff <= (0.05 * naive.bridge["bridge_rank"] + 2 if bf16 else 2)).all()
