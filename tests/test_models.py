"""Model loading: local checkpoints with dtype / device_map / bitsandbytes, the GGUF cache, clear errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import requires_smollm2, tiny_model
from bridgeprobe.probes.model.hooks import NativeHooks, pad_right
from bridgeprobe.probes.model.load import EMBEDDED, ModelLoadError, convert_gguf, load_model


class _Tokenizer:
    """Saved beside a tiny checkpoint so that load_model finds a tokenizer: a minimal byte-level BPE."""

    @staticmethod
    def save(path: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {chr(i): i for i in range(128)}
        raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    _Tokenizer.save(path)
    return path, model


IDS = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_local_checkpoint_loads_with_same_logits(checkpoint) -> None:
    path, original = checkpoint
    model, tokenizer = load_model(str(path), offline=True)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(IDS).logits, original(IDS).logits, rtol=0, atol=1e-5)
    assert tokenizer("ab")["input_ids"] == [97, 98]
    assert load_model(str(path), dtype="bfloat16")[0].dtype == torch.bfloat16


def test_device_map_splitting_across_cpu_and_offload_gives_same_logits(checkpoint, tmp_path: Path) -> None:
    path, original = checkpoint
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path)).eval()
    assert getattr(model, "hf_device_map", None)
    hooked = NativeHooks(model)
    result = hooked.run(IDS, read=[("resid_post", 1), ("resid_pre", 2)])
    reference = NativeHooks(original).run(IDS, read=[("resid_post", 1)])
    torch.testing.assert_close(result.logits, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.acts[("resid_post", 1)], reference.acts[("resid_post", 1)], rtol=0, atol=1e-5)


def test_max_memory_split_across_cpu_and_disk_gives_the_same_probe_results(checkpoint) -> None:
    """accelerate places what exceeds the CPU cap on disk; logits, activations, lens rows and a patching sweep
    of the split model equal the plain model's."""
    from bridgeprobe.probes.readouts.lens import lens_batch, lens_queries
    from bridgeprobe.probes.readouts.patching import Pair, sweep
    from bridgeprobe.prompts.schema import PromptItem

    path, original = checkpoint
    size = sum(p.numel() * p.element_size() for p in original.parameters())
    model, tokenizer = load_model(str(path), device_map="auto", max_memory={"cpu": int(0.7 * size)})
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    split, plain = NativeHooks(model, tokenizer), NativeHooks(original, tokenizer)
    sites = [("resid_post", 0), ("attn_out", 2), ("mlp_out", 1)]
    result, reference = split.run(IDS, read=sites), plain.run(IDS, read=sites)
    torch.testing.assert_close(result.logits, reference.logits, rtol=0, atol=1e-5)
    for site in sites:
        torch.testing.assert_close(result.acts[site], reference.acts[site], rtol=0, atol=1e-5)
    queries = lens_queries([PromptItem("a", "The tower is in the country of", "France", "Paris",
                                       hop1="The tower is in", hop2="The capital of France is")])
    rows, expected_rows = lens_batch(split, queries), lens_batch(plain, queries)
    assert len(rows) == len(expected_rows) == 4 * 3  # queries x layers
    for row, expected in zip(rows, expected_rows):
        assert row["rank"] == expected["rank"] and row["logprob"] == pytest.approx(expected["logprob"], abs=1e-5)
    pair = Pair.from_text(tokenizer, "The tower is in", "The river is in", "F", "I", sep="")
    patched, expected = sweep(split, pair).frame["metric"], sweep(plain, pair).frame["metric"]
    assert len(patched) == 3 * 15 and (patched - expected).abs().max() <= 1e-5


def _bitsandbytes_on_cpu() -> str | None:
    """Why bitsandbytes cannot quantize on this machine's CPU (None when it can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    import bitsandbytes.functional as bnbf

    try:
        weight = torch.randn(64, 64)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
        assert (bnbf.dequantize_4bit(packed, state) - weight).abs().mean() < 0.1
    except Exception as err:  # noqa: BLE001 -- any failure means: no CPU backend in this build
        return f"bitsandbytes {importlib.metadata.version('bitsandbytes')} cannot quantize on the CPU here: {err}"
    return None


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_models_are_hooked_like_any_other(checkpoint, bits: str) -> None:
    if (reason := _bitsandbytes_on_cpu()) is not None:
        pytest.skip(reason)
    path, original = checkpoint
    model, _ = load_model(str(path), quantize=bits, device="cpu")
    assert any("bitsandbytes" in type(m).__module__ for m in model.modules())
    hooked = NativeHooks(model)
    ids, mask = pad_right([IDS[0].tolist(), IDS[1, :5].tolist()])
    result = hooked.run(ids, mask, read=[("resid_post", 2)])
    plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(result.logits, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(hooked.readout(result.acts[("resid_post", 2)]), plain, rtol=0, atol=1e-4)
    # quantization moves logits a little, not a lot
    drift = (plain[0] - original(IDS[:1]).logits[0]).abs().max() / original(IDS[:1]).logits.abs().max()
    assert drift < 0.2


def test_bad_specs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf file"):
        load_model("./no/such/dir")
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_model("smollm2-135m", dtype="float8")
    with pytest.raises(ModelLoadError, match="either device or device_map"):
        load_model("smollm2-135m", device="cpu", device_map="auto")


@pytest.mark.slow
@requires_smollm2
def test_gguf_cache_is_safetensors_with_the_logits_of_the_gguf(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    gguf = EMBEDDED["smollm2-135m"].locate()
    cached = convert_gguf(gguf)
    assert (cached / "model.safetensors").is_file() and not list(cached.glob("*.bin"))
    model, tokenizer = smollm2
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([tokenizer("The capital of the country where the Eiffel Tower is located is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


@pytest.mark.gpu
@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("options", [{"dtype": "bfloat16", "device": "cuda"}, {"quantize": "4bit", "dtype": "bfloat16"},
                                     {"dtype": "bfloat16", "device_map": "auto"}])
def test_embedded_model_on_gpu(options: dict) -> None:
    model, tokenizer = load_model("smollm2-135m", **options)
    hooked = NativeHooks(model, tokenizer)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    result = hooked.run(ids, read=[("resid_post", hooked.n_layers - 1)])
    with torch.no_grad():
        plain = model(ids.to(result.logits.device)).logits
    torch.testing.assert_close(result.logits, plain, rtol=0, atol=0)
    readout = hooked.readout(result.acts[("resid_post", hooked.n_layers - 1)])
    torch.testing.assert_close(readout.float(), plain.float(), rtol=2e-2, atol=2e-2)
    assert tokenizer.decode([int(plain[0, -1].argmax())]) == " Paris"
