"""Per-head attention outputs: where they live and how to read or overwrite them with forward pre-hooks.

Each attention head's output is its slice of the input of the attention output projection (``o_proj`` / GPT-2's
Conv1D ``c_proj`` / ``dense``): heads are concatenated there after attention, so reading or patching a slice is
exact for grouped-query attention too. Native backend (:class:`~probes.model.hooks.NativeHooks`) only.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from bridgeprobe.probes.model.hooks import HookedModel, NativeHooks

HEAD = "head"
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


def out_projection(hooked: NativeHooks, layer: int) -> nn.Module:
    """The attention output projection of block ``layer``: its input is the per-head outputs, concatenated."""
    block = hooked.modules.blocks[layer]
    for attn_name in _ATTN_NAMES:
        attn = getattr(block, attn_name, None)
        if isinstance(attn, nn.Module):
            for name in _OUT_PROJ_NAMES:
                proj = getattr(attn, name, None)
                if isinstance(proj, nn.Module):
                    return proj
    raise ValueError(f"cannot find the attention output projection of {type(block).__name__}")


def n_heads(hooked: HookedModel) -> int:
    """The number of attention (query) heads per block."""
    config = hooked.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError("cannot find the number of attention heads in the model config")


def edit_out_projection_input(hooked: NativeHooks, layer: int, edit: Callable[[Tensor], Tensor],
                              stack: ExitStack) -> None:
    """Replace the input of block ``layer``'s output projection by ``edit(input)`` until ``stack`` closes."""
    def hook(module: nn.Module, args: tuple) -> Any:
        return (edit(args[0]), *args[1:])
    stack.callback(out_projection(hooked, layer).register_forward_pre_hook(hook).remove)


def record_heads(hooked: NativeHooks, layers: Iterable[int], store: dict[int, Tensor], stack: ExitStack) -> None:
    """Record ``[B, T, H, head_dim]`` per-head outputs of ``layers`` into ``store`` during the next forward."""
    heads = n_heads(hooked)
    for layer in layers:
        def edit(x: Tensor, layer: int = layer) -> Tensor:
            store[layer] = x.detach().unflatten(-1, (heads, -1))
            return x
        edit_out_projection_input(hooked, layer, edit, stack)


def patch_heads(hooked: NativeHooks, layer: int, rows: Tensor, positions: Tensor, heads: Tensor, values: Tensor,
                stack: ExitStack) -> None:
    """Overwrite head ``heads[i]`` at ``(rows[i], positions[i])`` with ``values[i]`` (``[N, head_dim]``)."""
    n = n_heads(hooked)

    def edit(x: Tensor) -> Tensor:
        out = x.unflatten(-1, (n, -1)).clone()
        dev = x.device
        out[rows.to(dev), positions.to(dev), heads.to(dev)] = values.to(device=dev, dtype=x.dtype)
        return out.flatten(-2)
    edit_out_projection_input(hooked, layer, edit, stack)
