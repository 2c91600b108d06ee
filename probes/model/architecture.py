"""Where the blocks, final norm, unembedding and per-block attention/MLP outputs live in HF causal LMs.

A declarative table per ``config.model_type``; models not in it are resolved structurally (the longest
``ModuleList`` of identical blocks, a norm module beside it, ``get_output_embeddings()``). ``attn`` and ``mlp``
name, inside a block, the module whose output is what that sub-layer adds to the residual stream (Gemma 2/3
normalise after attention and MLP, so there it is the post-norm, not ``self_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str


_LLAMA_LIKE = ArchSpec("model.layers", "model.norm", "lm_head", "self_attn", "mlp")
_GEMMA_POSTNORM = ArchSpec(
    "model.layers", "model.norm", "lm_head", "post_attention_layernorm", "post_feedforward_layernorm"
)

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: _LLAMA_LIKE
        for name in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3",
                     "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere", "smollm3")
    },
    "gemma2": _GEMMA_POSTNORM,
    "gemma3_text": _GEMMA_POSTNORM,
    "gemma3": ArchSpec(
        "model.language_model.layers", "model.language_model.norm", "lm_head",
        "post_attention_layernorm", "post_feedforward_layernorm",
    ),
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", "attn", "mlp"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head", "attention", "mlp"),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", "attn", "mlp"),
    "phi": ArchSpec("model.layers", "model.final_layernorm", "lm_head", "self_attn", "mlp"),
}

_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Located:
    """The modules a hooked model needs, resolved on one model instance."""

    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    attn: list[nn.Module]
    mlp: list[nn.Module]


def locate(model: nn.Module) -> Located:
    """Resolve the modules of ``model`` from the table, or structurally when its type is not listed."""
    spec = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    if spec is None:
        spec = _infer_spec(model)
    blocks = model.get_submodule(spec.blocks)
    return Located(
        blocks=blocks,
        final_norm=model.get_submodule(spec.final_norm),
        unembed=model.get_submodule(spec.unembed),
        attn=[block.get_submodule(spec.attn) for block in blocks],
        mlp=[block.get_submodule(spec.mlp) for block in blocks],
    )


def _infer_spec(model: nn.Module) -> ArchSpec:
    lists = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(b) for b in mod}) == 1
    ]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: add it to ARCHITECTURES")
    blocks_name, blocks = max(lists, key=lambda item: len(item[1]))
    parent = blocks_name.rpartition(".")[0]
    prefix = f"{parent}." if parent else ""
    names = dict(model.named_modules())
    final_norm = next((prefix + n for n in _NORM_NAMES if prefix + n in names), None)
    unembed_module = model.get_output_embeddings()
    unembed = next((n for n, m in names.items() if m is unembed_module), None)
    children = dict(blocks[0].named_children())
    attn = next((n for n in _ATTN_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    missing = [label for label, value in
               (("final norm", final_norm), ("unembedding", unembed), ("attention", attn), ("mlp", mlp))
               if value is None]
    if missing:
        raise ValueError(
            f"cannot locate the {', '.join(missing)} of {type(model).__name__} "
            f"(model_type {model.config.model_type!r}): add it to ARCHITECTURES"
        )
    return ArchSpec(blocks_name, final_norm, unembed, attn, mlp)


# model_type prefix -> the config attribute the model's own head scales the unembedding's output by, and how
# (transformers: CohereForCausalLM ``logits * logit_scale``, GraniteForCausalLM ``logits / logits_scaling``,
# HyperCLOVAX ``logits * logits_scaling``)
HEAD_SCALES = (("cohere", "logit_scale", "multiply"), ("granite", "logits_scaling", "divide"),
               ("hyperclovax", "logits_scaling", "multiply"))


def head_logits(config: Any, logits: Tensor) -> Tensor:
    """What the model's own output head does after the unembedding, so that a logit-lens readout of the last
    layer equals the model's logits: the scaling of :data:`HEAD_SCALES`, then Gemma 2/3's soft cap at
    ``final_logit_softcapping``. A multimodal config's text config is read."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    for prefix, attribute, how in HEAD_SCALES:
        value = getattr(text, attribute, None)
        if model_type.startswith(prefix) and value is not None:
            logits = logits * value if how == "multiply" else logits / value
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
