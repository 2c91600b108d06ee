"""Jobs behind the CLI: load a model, hook it, run a probe over a prompt set with resumable output, and record
``run.json`` (model, versions, seed, settings, timings)."""

from __future__ import annotations

import importlib.metadata
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from probes.hooks import HookedModel, NativeHooks
from probes.lens import COLUMNS, batches, lens_batch, lens_queries
from probes.models import load_model
from probes.results import IncrementalCSV
from prompts.schema import PromptItem

BACKENDS = ("native", "transformer-lens")


def hook_model(model: torch.nn.Module, tokenizer: Any, backend: str = "native") -> HookedModel:
    """Wrap a loaded HF model in the chosen hooking backend."""
    if backend == "native":
        return NativeHooks(model, tokenizer)
    if backend == "transformer-lens":
        from probes.tl_backend import TransformerLensHooks

        return TransformerLensHooks(model, tokenizer)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


@dataclass
class ModelOptions:
    """How to load and hook the model (the CLI's model flags)."""

    model: str
    backend: str = "native"
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    max_memory: dict[int | str, str] | None = None
    quantize: str | None = None
    offline: bool = False
    trust_remote_code: bool = False

    def load(self) -> HookedModel:
        model, tokenizer = load_model(
            self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
            max_memory=self.max_memory, quantize=self.quantize, offline=self.offline,
            trust_remote_code=self.trust_remote_code,
        )
        return hook_model(model, tokenizer, self.backend)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("bridgeprobe", "torch", "transformers", "accelerate", "transformer-lens", "bitsandbytes", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


class Timer:
    """Named wall-clock timings in seconds, for ``run.json``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 3)


def run_lens(
    hooked: HookedModel,
    items: Sequence[PromptItem],
    out_dir: Path,
    *,
    settings: dict[str, Any],
    batch_size: int = 16,
    all_positions: bool = False,
) -> tuple[pd.DataFrame, int]:
    """Write ``out_dir/lens.csv`` for ``items`` (resuming an interrupted run); return it and the count of queries
    that were already done."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    store = IncrementalCSV(out_dir, "lens", COLUMNS, {**settings, "all_positions": all_positions})
    done = store.done(["prompt_id", "prompt_kind", "target"])
    queries = lens_queries(items)
    todo = [q for q in queries if q.key not in done]
    with tqdm(total=len(todo), desc="logit lens", unit="query", disable=not todo) as bar:
        for batch in batches(todo, hooked.tokenizer, batch_size):
            store.append(lens_batch(hooked, batch, all_positions=all_positions))
            bar.update(len(batch))
    frame = store.finish(sort_by=["prompt_kind", "target", "prompt_id", "layer", "position"])
    return frame, len(queries) - len(todo)


def run_record(command: str, hooked: HookedModel, options: ModelOptions, settings: dict[str, Any],
               timer: Timer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``run.json``; ``timer.timings`` is shared, so later sections still land in it."""
    return {
        "command": command,
        "model": options.model,
        "model_class": type(hooked.model).__name__,
        "n_layers": hooked.n_layers,
        "d_model": hooked.d_model,
        "backend": options.backend,
        "load": {k: v for k, v in vars(options).items() if k not in ("model", "backend")},
        "versions": versions(),
        "seed": settings.get("seed"),
        "settings": settings,
        "timings": timer.timings,
        **(extra or {}),
    }
