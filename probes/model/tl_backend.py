"""TransformerLens backend (opt-in): the same :class:`~probes.model.hooks.HookedModel` interface over a TransformerLens
4.x ``TransformerBridge``, for the architectures TransformerLens supports.

The bridge replaces the submodules of the model it wraps, so it wraps a deep copy and the caller's HF model stays
plain (this doubles the weights in memory). We pass token ids, never strings, so TransformerLens' default of
prepending BOS never applies: prompts are tokenized exactly as with the native backend. No weight processing
(layer-norm folding, centering) is enabled, so activations equal the HF model's.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from bridgeprobe.probes.model.architecture import head_logits
from bridgeprobe.probes.model.hooks import HookedModel, Patch, RunResult, Site

# TransformerLens hook names; for Gemma 2/3 its attn/mlp outputs are the post-norm outputs, as in ours.
HOOK_NAMES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
}


class TransformerLensHooks(HookedModel):
    """Hooks through ``TransformerBridge.run_with_hooks`` on a bridged copy of ``model``."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        architecture = type(model).__name__
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"TransformerLens has no TransformerBridge adapter for {architecture}; use the native backend"
            )
        self.model = model
        self.tokenizer = tokenizer
        wrapped = copy.deepcopy(model).eval()
        self.bridge = build_bridge_from_module(wrapped, architecture, hf_config=wrapped.config, tokenizer=None)
        self.n_layers = int(self.bridge.cfg.n_layers)
        self.d_model = int(self.bridge.cfg.d_model)

    def readout(self, hidden: Tensor) -> Tensor:
        return head_logits(self.model.config, self.bridge.unembed(self.bridge.ln_final(hidden)))

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        read: Iterable[Site] = (),
        patches: Sequence[Patch] = (),
        positions: Tensor | None = None,
        logits: bool = True,
    ) -> RunResult:
        read = list(read)
        acts: dict[Site, Tensor] = {}
        hooks = [(HOOK_NAMES[site].format(layer), _hook(transform))
                 for (site, layer), transform in self._plan(read, patches, positions, acts)]
        stop = None if logits else self._last_block(read, patches) + 1
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = self.bridge.run_with_hooks(
            input_ids, attention_mask=mask, fwd_hooks=hooks,
            stop_at_layer=stop if stop is not None and stop < self.n_layers else None,
        )
        return RunResult(out if logits else None, acts)


def _hook(transform: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Any], Tensor]:
    return lambda activation, hook: transform(activation)
