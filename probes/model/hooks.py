"""One small hooked-model interface: read and patch residual-stream sites of a causal LM, batched.

Sites (per block ``l`` in ``0..L-1``):
- ``resid_pre``: the residual stream entering block ``l``;
- ``resid_post``: the residual stream leaving block ``l`` (``resid_post[l] == resid_pre[l+1]``);
- ``attn_out`` / ``mlp_out``: what the attention / MLP sub-layer of block ``l`` adds to the residual stream.

Two backends implement :class:`HookedModel`: :class:`NativeHooks` (plain PyTorch hooks on the HF modules; the
default, works with bitsandbytes and ``device_map`` models) and ``probes.model.tl_backend.TransformerLensHooks``
(TransformerLens ``TransformerBridge``, opt-in). Batches are right-padded: in a causal model a real token never
attends to the padding after it, so every real position equals the unpadded one-at-a-time run.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from bridgeprobe.probes.model.architecture import head_logits, locate

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
Site = tuple[str, int]


@dataclass(frozen=True)
class Patch:
    """Overwrite ``site`` at ``layer`` for the (row, position) pairs given, with ``values`` (``[N, d_model]``)."""

    site: str
    layer: int
    rows: Tensor  # [N] batch rows
    positions: Tensor  # [N] token positions
    values: Tensor  # [N, d_model]

    def apply(self, hidden: Tensor) -> Tensor:
        out = hidden.clone()
        device = hidden.device
        out[self.rows.to(device), self.positions.to(device)] = self.values.to(device=device, dtype=hidden.dtype)
        return out


@dataclass
class RunResult:
    """``acts[(site, layer)]`` is ``[B, T, d]``, or ``[B, K, d]`` when ``positions`` was given; ``logits`` is
    ``[B, T, vocab]``, or None when the run stopped early."""

    logits: Tensor | None
    acts: dict[Site, Tensor] = field(default_factory=dict)


def check_sites(sites: Iterable[Site], n_layers: int) -> None:
    for site, layer in sites:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range 0..{n_layers - 1}")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise ValueError("cannot batch an empty token sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def gather_positions(hidden: Tensor, positions: Tensor | None) -> Tensor:
    """``hidden[b, positions[b, k]]`` as ``[B, K, d]`` (or ``hidden`` itself when ``positions`` is None)."""
    if positions is None:
        return hidden
    index = positions.to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], index]


class HookedModel(ABC):
    """A causal LM whose residual-stream sites can be read and patched in one batched forward pass."""

    model: nn.Module
    tokenizer: Any
    n_layers: int
    d_model: int

    @abstractmethod
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
        """Run a forward pass, recording ``read`` sites and applying ``patches``.

        ``positions`` (``[B, K]``) keeps only those positions of each read activation. With ``logits=False`` the
        pass stops after the last block it needs (early stop) and returns no logits.
        """

    @abstractmethod
    def readout(self, hidden: Tensor) -> Tensor:
        """Logit lens: the final norm, the unembedding and the model's own logit scaling or soft cap
        (:func:`probes.model.architecture.head_logits`) applied to residual vectors ``[..., d]``."""

    @staticmethod
    def _last_block(read: Iterable[Site], patches: Sequence[Patch]) -> int:
        layers = [layer for _, layer in read] + [p.layer for p in patches]
        return max(layers, default=0)

    def _plan(self, read: Iterable[Site], patches: Sequence[Patch], positions: Tensor | None,
              acts: dict[Site, Tensor]) -> list[tuple[Site, Callable[[Tensor], Tensor]]]:
        """For each site to hook, the function applied to its tensor: patch it, then record it into ``acts``."""
        read = list(dict.fromkeys(read))
        check_sites(read + [(p.site, p.layer) for p in patches], self.n_layers)
        by_site: dict[Site, list[Patch]] = {}
        for patch in patches:
            by_site.setdefault((patch.site, patch.layer), []).append(patch)
        return [(key, _transform(by_site.get(key, []), acts, key if key in read else None, positions))
                for key in dict.fromkeys([*by_site, *read])]


def _transform(patches: list[Patch], acts: dict[Site, Tensor], record: Site | None,
               positions: Tensor | None) -> Callable[[Tensor], Tensor]:
    def transform(hidden: Tensor) -> Tensor:
        for patch in patches:
            hidden = patch.apply(hidden)
        if record is not None:
            acts[record] = gather_positions(hidden, positions).detach()
        return hidden
    return transform


class _StopForward(Exception):
    """Raised by a hook once every needed block has run."""


class NativeHooks(HookedModel):
    """PyTorch forward hooks on the HF modules located by :func:`probes.model.architecture.locate`."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.modules = locate(model)
        self.n_layers = len(self.modules.blocks)
        self.d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd

    def readout(self, hidden: Tensor) -> Tensor:
        norm = self.modules.final_norm
        device = next(norm.parameters(), hidden).device
        if device.type == "meta":  # offloaded by accelerate, whose hook moves inputs to where the norm runs
            device = hidden.device
        return head_logits(self.model.config, self.modules.unembed(norm(hidden.to(device))))

    def _site_hook(self, site: str, layer: int) -> tuple[nn.Module, bool]:
        """The module to hook for a site, and whether it is a pre-hook (input) rather than an output hook."""
        if site == "resid_pre":
            return self.modules.blocks[layer], True
        if site == "resid_post":
            return self.modules.blocks[layer], False
        if site == "attn_out":
            return self.modules.attn[layer], False
        return self.modules.mlp[layer], False

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
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        device = self.model.get_input_embeddings().weight.device
        result, _ = self._forward(read, patches, positions, logits, input_ids=input_ids.to(device),
                                  attention_mask=mask.to(device), use_cache=False)
        return result

    def _forward(self, read: Iterable[Site], patches: Sequence[Patch], positions: Tensor | None, logits: bool,
                 *, first: int = 0, **model_kwargs: Any) -> tuple[RunResult, Any]:
        """One forward of ``self.model(**model_kwargs)`` with the hooks of ``read`` / ``patches`` in place; also
        returns the model output (None after an early stop)."""
        read = list(read)
        acts: dict[Site, Tensor] = {}
        with ExitStack() as stack:
            for key, transform in self._plan(read, patches, positions, acts):
                if key[1] < first:
                    raise ValueError(f"site {key} lies before the first block run ({first})")
                module, pre = self._site_hook(*key)
                handle = (module.register_forward_pre_hook(_pre_hook(transform), with_kwargs=True) if pre
                          else module.register_forward_hook(_post_hook(transform)))
                stack.callback(handle.remove)
            if not logits:
                last = max(self._last_block(read, patches), first)
                stop = self.modules.blocks[last].register_forward_hook(_raise_stop)
                stack.callback(stop.remove)
            try:
                out = self.model(**model_kwargs)
            except _StopForward:
                return RunResult(None, acts), None
        return RunResult(out.logits, acts), out

    def run_with_kv(
        self,
        input_ids: Tensor,
        *,
        read: Iterable[Site] = (),
        positions: Tensor | None = None,
    ) -> tuple[RunResult, list[tuple[Tensor, Tensor]]]:
        """:meth:`run` on unpadded ``input_ids`` (``[B, T]``), also returning every block's attention keys and
        values ``[(k, v)]`` (each ``[B, kv_heads, T, head_dim]``) for all ``T`` positions, sliding-window layers
        included: the prefix cache for :meth:`run_from`."""
        from transformers import DynamicCache

        device = self.model.get_input_embeddings().weight.device
        cache = DynamicCache()  # no config: every layer keeps all its positions, sliding-window ones too
        result, _ = self._forward(read, (), positions, True, input_ids=input_ids.to(device),
                                  attention_mask=torch.ones_like(input_ids, device=device),
                                  use_cache=True, **{cache_kwarg(self.model): cache})
        if len(cache.layers) != self.n_layers:
            raise RuntimeError(f"expected a key/value cache for {self.n_layers} blocks, got {len(cache.layers)}")
        return result, [(layer.keys, layer.values) for layer in cache.layers]

    def run_from(
        self,
        start: int,
        hidden: Tensor,
        *,
        past_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
        join: Mapping[int, Tensor] | None = None,
        read: Iterable[Site] = (),
        patches: Sequence[Patch] = (),
        logits_to_keep: int = 0,
    ) -> RunResult:
        """Resume a forward pass at block ``start`` (``0..n_layers``) with ``hidden`` (``[B, q, d]``) as its input,
        running only blocks ``start..L-1``, the final norm and the unembedding.

        ``past_kv`` (from :meth:`run_with_kv`, cut to the first ``n`` positions; batch 1) makes ``hidden`` the
        positions ``n..n+q-1`` of a longer sequence whose prefix the cache holds (a causal model's prefix does not
        depend on what follows it). Without it ``hidden`` starts at position 0. ``join`` (``{k: [n_k, q, d]}``,
        ``start < k < n_layers``) appends rows to the batch as the input of block ``k``: they run only blocks
        ``k..L-1``, so one pass serves rows that start at different blocks. Rows are numbered in the order they
        enter (``hidden``'s, then each join's in block order); ``patches`` index those rows and ``hidden``'s
        positions (not absolute positions), at sites at block ``start`` or later where their rows are present.
        Reads at block ``k`` hold the rows present there. ``start == n_layers`` applies only the readout (no joins,
        patches or reads then). ``logits_to_keep`` (>0) computes the logits of that many last positions only: the
        last block's output is cut to them and read out by :meth:`readout` as one contiguous matrix product (the
        model's own head would multiply a non-contiguous slice, which PyTorch on the CPU runs as one matrix-vector
        product per row against an expanded copy of the unembedding, ~17x slower).

        The model runs on a batch of one (``inputs_embeds`` only fixes shape, dtype and device), so its attention
        mask and position ids are built for one row and broadcast over however many rows a block holds. The blocks
        before ``start`` are swapped for pass-through modules for the duration of the call (the ``ModuleList``
        keeps its length, so per-layer tables indexed by block number, e.g. sliding-window layer types, stay
        aligned); the model is not safe to use from another thread meanwhile.
        """
        join = dict(sorted((join or {}).items()))
        if not 0 <= start <= self.n_layers:
            raise ValueError(f"start {start} out of range 0..{self.n_layers}")
        if any(not start < k < self.n_layers for k in join):
            raise ValueError(f"join blocks must lie in {start + 1}..{self.n_layers - 1}, got {list(join)}")
        if start == self.n_layers:
            if list(read) or list(patches) or join:
                raise ValueError("run_from(n_layers) only reads out: apply patches to hidden instead")
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            return RunResult(self.readout(kept), {})
        q = hidden.shape[1]
        offset = 0 if past_kv is None else int(past_kv[0][0].shape[-2])
        device = hidden.device
        kwargs: dict[str, Any] = {
            "inputs_embeds": hidden[:1],
            "attention_mask": torch.ones((1, offset + q), dtype=torch.long, device=device),
            "position_ids": torch.arange(offset, offset + q, device=device)[None],
            "use_cache": offset > 0,
        }
        if offset > 0:
            from transformers import DynamicCache

            rows, present = hidden.shape[0], []  # present[k]: how many rows block k holds
            for k in range(self.n_layers):
                rows += join[k].shape[0] if k in join else 0
                present.append(rows)
            kwargs[cache_kwarg(self.model)] = DynamicCache(ddp_cache_data=[
                (k, v) if i < start else (k.expand(present[i], *k.shape[1:]), v.expand(present[i], *v.shape[1:]))
                for i, (k, v) in enumerate(past_kv)
            ])
        final = ("resid_post", self.n_layers - 1)
        read = list(read)
        blocks = self.modules.blocks
        originals = [blocks[i] for i in range(start)]
        with ExitStack() as stack:
            handles = [blocks[start].register_forward_pre_hook(_pre_hook(lambda h: hidden.to(h.device)),
                                                               with_kwargs=True, prepend=True)]
            for k, rows in join.items():
                def append(h: Tensor, rows: Tensor = rows) -> Tensor:
                    return torch.cat([h, rows.to(h)])
                handles.append(blocks[k].register_forward_pre_hook(_pre_hook(append), with_kwargs=True, prepend=True))
            for handle in handles:
                stack.callback(handle.remove)
            stack.callback(lambda: [blocks.__setitem__(i, block) for i, block in enumerate(originals)])
            for i in range(start):
                blocks[i] = _PassThrough()
            result, _ = self._forward([*read, final], patches, None, False, first=start, **kwargs)
        last = result.acts[final] if final in read else result.acts.pop(final)
        return RunResult(self.readout(last[:, -logits_to_keep:] if logits_to_keep else last), result.acts)


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its key/value cache under: ``cache`` since transformers renamed it
    (``past_key_values`` warns a FutureWarning there and goes in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input hidden states."""

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]


def _raise_stop(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


def _pre_hook(transform: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """A forward pre-hook applying ``transform`` to the block's input hidden states."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}
    return hook


def _post_hook(transform: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """A forward hook applying ``transform`` to the module's output (the first element of a tuple output)."""
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (transform(output[0]), *output[1:])
        return transform(output)
    return hook
