"""bridgeprobe's probes: where a language model keeps the bridge entity of two-hop questions.

Rooms
-----
The subpackages ("rooms"), lowest first. A room may import only the rooms named for it, never one listed below
it, so no import cycle can form (docs/architecture.md has the reasons; tests/test_layering.py enforces it):

- ``probes.io``: result files that survive interruption (``results.py``). Imports no other room.
- ``probes.model``: load a model (``load.py``), locate its modules (``architecture.py``), read and patch its
  residual stream (``hooks.py``, ``tl_backend.py``), read states (``states.py``), tokenize targets in context
  (``targets.py``). May import: nothing of the package.
- ``bridgeprobe.prompts`` (a separate top-level package): prompt items, loaders, sampling, synthetic sets.
  May import: ``probes.io``, ``probes.model``.
- ``probes.readouts``: what is read from a hooked model: the logit lens (``lens.py``), the patching engine
  (``variants.py``), attention heads (``heads.py``), patching sweeps (``patching.py``), attribution patching
  (``attribution.py``). May import: ``probes.io``, ``probes.model``, ``prompts``.
- ``probes.runs``: probe runs with resumable output and ``run.json`` (``pipeline.py``), run directories
  (``rundir.py``), data parallelism (``distributed.py``), quantized fidelity (``fidelity.py``), input checks
  (``checks.py``). May import: ``probes.io``, ``probes.model``, ``prompts``, ``probes.readouts``.
- ``probes.memory``: the shared-memory analysis: its plans and settings (``plans.py``), rows (``rows.py``), the
  resumable run (``analysis.py``), alignment statistics (``alignment.py``). May import: the rooms above
  (``probes.io`` to ``probes.runs``, and ``prompts``).
- ``probes.identity``: the parts of the identity-supervision experiments (synthetic data, from-scratch models,
  LoRA and chat fine-tuning). May import: the rooms above (``probes.io`` to ``probes.memory``, and ``prompts``).
- ``probes.jobs``: the identity experiments end to end, one module per command that ends in a report. May import:
  the rooms above, ``prompts`` and ``bridgeprobe.analyses``; imported only by ``probes.cli``.
- ``bridgeprobe.analyses`` (a separate top-level package: the report writers). May import only ``probes.io``,
  ``probes.model`` and ``prompts``.
- ``probes.cli``: the ``bridgeprobe`` command, one module per group of subcommands. May import everything.

This file (the public API below) may import every room but ``probes.jobs`` and ``probes.cli``.

Public API
----------
The names a notebook needs, importable from here (``from bridgeprobe.probes import load_model, hook_model``):

- ``load_model(spec, *, dtype, device, device_map, quantize, adapter, ...)`` -> ``(model, tokenizer)``: an
  embedded alias (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a checkpoint directory or a hub name.
  Defined in ``probes.model.load``.
- ``ModelOptions(model, backend=..., dtype=..., ...)``: the CLI's model flags as one object; ``.load()`` loads
  and hooks the model. Defined in ``probes.runs.pipeline``.
- ``hook_model(model, tokenizer, backend="native")`` -> ``HookedModel``: ``.run(ids, mask, read=..., patches=...)``
  reads and patches residual-stream sites in one batched forward. Defined in ``probes.runs.pipeline``.
- ``load_prompts(paths, *, limit, preset, columns, ...)`` -> prompt items: a bundled set (``"curated"``) or
  JSONL/CSV files. Defined in ``prompts.loaders``.
- ``lens_queries(items, tokenizer)``: the logit-lens queries of prompt items (the tokenizer flags ambiguous
  targets); ``lens_batch(hooked, queries)``: their rows (rank, probability per layer). Defined in
  ``probes.readouts.lens``.
- ``Patch(site, layer, rows, positions, values)``: one overwrite for ``HookedModel.run``; ``pad_right(seqs)`` ->
  ``(ids, mask)``: a right-padded batch. Defined in ``probes.model.hooks``.
- ``Pair.from_text(tokenizer, clean, corrupted, clean_answer, corrupt_answer)``: a clean/corrupted prompt pair;
  ``sweep(hooked, pair, site)``: activation patching at every layer x position. Defined in
  ``probes.readouts.patching``.
- ``MemoryConfig(...)``: the settings of the shared-memory analysis (defined in ``probes.memory.plans``);
  ``run_memory(hooked, items, out_dir, config, settings={})``: runs it and writes ``out_dir/memory.csv``
  (defined in ``probes.memory.analysis``).

The names are lazy (PEP 562): none of those modules, and so neither torch nor transformers, is imported until a
name is first used, so ``import bridgeprobe.probes.io.results`` or the CLI imports nothing through this file.
Each name is the object of its defining module (no second definition here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it (the only definition)
_DEFINED_IN = {
    "load_model": "bridgeprobe.probes.model.load",
    "ModelOptions": "bridgeprobe.probes.runs.pipeline",
    "hook_model": "bridgeprobe.probes.runs.pipeline",
    "load_prompts": "bridgeprobe.prompts.loaders",
    "lens_queries": "bridgeprobe.probes.readouts.lens",
    "lens_batch": "bridgeprobe.probes.readouts.lens",
    "Patch": "bridgeprobe.probes.model.hooks",
    "pad_right": "bridgeprobe.probes.model.hooks",
    "Pair": "bridgeprobe.probes.readouts.patching",
    "sweep": "bridgeprobe.probes.readouts.patching",
    "MemoryConfig": "bridgeprobe.probes.memory.plans",
    "run_memory": "bridgeprobe.probes.memory.analysis",
}

__all__ = list(_DEFINED_IN)

if TYPE_CHECKING:  # for type checkers and editors only; at run time the names load on first use (__getattr__)
    from bridgeprobe.probes.memory.analysis import run_memory
    from bridgeprobe.probes.memory.plans import MemoryConfig
    from bridgeprobe.probes.model.hooks import Patch, pad_right
    from bridgeprobe.probes.model.load import load_model
    from bridgeprobe.probes.readouts.lens import lens_batch, lens_queries
    from bridgeprobe.probes.readouts.patching import Pair, sweep
    from bridgeprobe.probes.runs.pipeline import ModelOptions, hook_model
    from bridgeprobe.prompts.loaders import load_prompts


def __getattr__(name: str) -> Any:
    """Import a public name from its defining module on first use (PEP 562)."""
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
