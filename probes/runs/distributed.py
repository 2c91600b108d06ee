"""Data-parallel jobs: the same command launched N times (``torchrun``, ``accelerate launch``) splits its work.

``torchrun --nproc_per_node N --no-python bridgeprobe lens ...`` (or ``accelerate launch --multi_gpu
--num_processes N --no_python bridgeprobe ...``) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each process
loads its own model replica (its own GPU with ``--device cuda``; its own group of GPUs with ``--device-map``, see
:func:`replica_placement`), takes its share of the prompts or pairs, and appends its rows to its own resumable
shard (``OUT/shards/R-of-N/NAME.partial.csv``, a :class:`~probes.io.results.IncrementalCSV`). At the end rank 0
gathers every shard's rows over the process group (no shared file system needed) and writes ``OUT/NAME.csv``
exactly as a single process would: the rows are parsed and sorted by the same code, so the merged file equals the
single-process one row for row. A process that crashes loses only its unfinished batch; rerunning the same
command with the same N resumes every shard. Without these variables (a plain ``bridgeprobe`` call, or
``WORLD_SIZE=1``) :func:`context` returns an inactive :class:`Shards` and nothing changes: one
``OUT/NAME.partial.csv``, as before.

The process group is created on first use: gloo on a CPU host, ``cpu:gloo,cuda:nccl`` on a GPU host (for code
that wants NCCL); our own collectives (gathering rows, barriers) carry Python objects and run on a gloo group
either way. The timeout is long (:data:`TIMEOUT`, or ``$BRIDGEPROBE_DIST_TIMEOUT`` seconds) because a rank that
finished its shard waits at the merge for the slowest one.

A job becomes data-parallel with a few lines (this is how :func:`probes.runs.pipeline.run_lens` and
:func:`~probes.runs.pipeline.run_patching` use it)::

    shards = distributed.context()
    store = shards.store(out_dir, "memory", COLUMNS, settings)         # instead of IncrementalCSV(out_dir, ...)
    done = shards.union(store.done(["item_id"]))                       # keys finished by any process
    for item in tqdm(shards.shard([i for i in items if (i.id,) not in done]), disable=not shards.is_main):
        store.append(rows_of(item))
    frame = shards.finish(store, sort_by=["item_id", "layer"])        # merged on rank 0; None on the others
    if frame is not None:                                              # only rank 0 writes outputs and run.json
        ...

Which items a process gets must be a function of the arguments and of ``done`` only (never of the process's own
timing or free memory), so every process computes the same split. Sums over processes (e.g. timings) come from
:meth:`Shards.all_gather`.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import pandas as pd
import torch

from bridgeprobe.probes.io.results import IncrementalCSV, ResumeMismatch, finish_rows

T = TypeVar("T")
TIMEOUT = timedelta(hours=24)
SHARDS = "shards"  # OUT/shards/R-of-N/: one process's partial outputs


@dataclass(frozen=True)
class Shards:
    """This process's place in a data-parallel run (inactive: one process, rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the merged outputs, run.json and reports, and shows the progress bars."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th item from position ``rank``."""
        return list(items[self.rank :: self.world_size])

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (``[obj]`` when inactive)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=_object_group())
        return gathered

    def union(self, keys: set) -> set:
        """The union of every process's ``keys`` (e.g. the rows already done in any shard)."""
        return set().union(*self.all_gather(keys)) if self.active else keys

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=_object_group())

    def shard_dir(self, out_dir: Path) -> Path:
        return out_dir / SHARDS / f"{self.rank}-of-{self.world_size}"

    def store(self, out_dir: Path, name: str, columns: Sequence[str], settings: dict[str, Any]) -> IncrementalCSV:
        """The resumable row store of this process: ``out_dir/NAME.partial.csv`` when inactive, else its shard.

        Raises :class:`~probes.io.results.ResumeMismatch` when ``out_dir`` holds an interrupted run of another
        number of processes (its shards could not be resumed and would be lost)."""
        _check_resumable(out_dir, name, self.world_size)
        if not self.active:
            return IncrementalCSV(out_dir, name, columns, settings)
        return IncrementalCSV(self.shard_dir(out_dir), name, columns, settings)

    def finish(self, store: IncrementalCSV, sort_by: Sequence[str]) -> pd.DataFrame | None:
        """Write the final ``NAME.csv`` in the run's output directory and return it (``store.finish`` when
        inactive). Data-parallel: every process sends its committed rows to rank 0, which parses and sorts all
        of them at once and writes the file; then every process deletes its shard. Returns the merged frame on
        rank 0 and None on the other ranks."""
        if not self.active:
            return store.finish(sort_by)
        import torch.distributed as dist

        out_dir = store.final.parent.parent.parent  # OUT/shards/R-of-N/NAME.csv
        texts: list[str] | None = [""] * self.world_size if self.is_main else None
        dist.gather_object(store.rows(), texts, dst=0, group=_object_group())
        frame = finish_rows(out_dir / store.final.name, store.columns, texts, sort_by) if self.is_main else None
        self.barrier()  # the merged file is on disk before any shard goes
        store.discard()
        _remove_if_empty(store.final.parent)
        self.barrier()
        if self.is_main:
            _remove_if_empty(out_dir / SHARDS)
        return frame

    def placement(self, device: str | None, device_map: str | dict | None,
                  max_memory: dict[int | str, Any] | None) -> tuple[str | None, dict[int | str, Any] | None]:
        """``(device, max_memory)`` for this process's model replica (unchanged when inactive or without GPUs);
        see :func:`replica_placement`."""
        if not self.active or not torch.cuda.is_available():
            return device, max_memory
        from accelerate.utils import get_max_memory

        device, max_memory = replica_placement(self.local_rank, self.local_world_size, torch.cuda.device_count(),
                                               device, device_map, max_memory, available=get_max_memory)
        if device is not None and device.startswith("cuda:"):
            torch.cuda.set_device(device)
        return device, max_memory


def replica_placement(local_rank: int, local_world_size: int, n_gpus: int, device: str | None,
                      device_map: str | dict | None, max_memory: dict[int | str, Any] | None, *,
                      available: Callable[[], dict[int | str, Any]]) -> tuple[str | None, dict[int | str, Any] | None]:
    """Where the replica of local process ``local_rank`` (of ``local_world_size`` on this machine) goes.

    - ``device="cuda"`` (no index): GPU ``local_rank % n_gpus``. An explicit ``cuda:K`` or ``cpu`` is kept.
    - a named ``device_map`` (``auto``, ``balanced``, ...): the process gets its own group of
      ``n_gpus // local_world_size`` consecutive GPUs (one shared GPU when there are more processes than GPUs),
      expressed as ``max_memory`` restricted to that group. GPU keys of a given ``max_memory`` count within the
      group (``{"0": "70GiB", "1": "70GiB"}`` is a two-GPU replica, whichever GPUs the process owns); ``cpu`` and
      ``disk`` caps apply per process. Without ``max_memory``, ``available()`` (accelerate's ``get_max_memory``)
      gives the GPUs' free memory and the CPU's.
    - an explicit per-module ``device_map`` dict is kept as it is.
    """
    if n_gpus < 1:
        return device, max_memory
    if device == "cuda":
        return f"cuda:{local_rank % n_gpus}", max_memory
    if not isinstance(device_map, str):
        return device, max_memory
    per = max(1, n_gpus // local_world_size)
    first = (local_rank * per) % n_gpus
    group = [first + i for i in range(per)]
    if max_memory is None:
        free = available()
        return device, {**{g: free[g] for g in group}, **({"cpu": free["cpu"]} if "cpu" in free else {})}
    placed: dict[int | str, Any] = {}
    for key, value in max_memory.items():
        if isinstance(key, int) or str(key).isdigit():
            if int(key) >= per:
                raise ValueError(f"--max-memory names GPU {key} but each of the {local_world_size} processes on "
                                 f"this machine has {per} GPU(s) (keys count within a process's own GPUs)")
            placed[group[int(key)]] = value
        else:
            placed[key] = value
    return device, placed


@functools.cache
def context() -> Shards:
    """The data-parallel context of this process, from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (set by torchrun
    and accelerate launch); creates the process group on first call. Inactive without those variables."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Shards()
    import torch.distributed as dist

    if not dist.is_initialized():
        nccl = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", timeout=_timeout())
        atexit.register(_destroy)
    return Shards(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))))


def _timeout() -> timedelta:
    seconds = os.environ.get("BRIDGEPROBE_DIST_TIMEOUT")
    return timedelta(seconds=float(seconds)) if seconds else TIMEOUT


@functools.cache
def _object_group() -> Any:
    """The group our object collectives and barriers run on: the default one when it is gloo alone, else a gloo
    group over the same processes (so that they never go through NCCL, whichever group a GPU host has)."""
    import torch.distributed as dist

    return None if str(dist.get_backend()) == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _check_resumable(out_dir: Path, name: str, world_size: int) -> None:
    """Refuse to start where an interrupted run with another number of processes left its rows."""
    shards = out_dir / SHARDS
    others = sorted({m.group(1) for d in (shards.iterdir() if shards.is_dir() else ())
                     if (m := re.fullmatch(r"\d+-of-(\d+)", d.name)) and (d / f"{name}.partial.csv").exists()
                     and int(m.group(1)) != world_size})
    if others:
        raise ResumeMismatch(f"{shards} holds an interrupted data-parallel run of {', '.join(others)} processes; "
                             f"resume it with that many processes (torchrun --nproc_per_node) or delete {shards}")
    if world_size > 1 and (out_dir / f"{name}.partial.csv").exists():
        raise ResumeMismatch(f"{out_dir / f'{name}.partial.csv'} is an interrupted single-process run; resume it "
                             "without torchrun or use another --out")


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
