"""Data-parallel runs (probes/runs/distributed.py): sharding, merging, resuming, replica placement; and `bridgeprobe
lens` / `bridgeprobe patch` launched with torchrun on two gloo processes against the single-process output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import PLACES, save_tiny_checkpoint
from bridgeprobe.probes.runs import distributed
from bridgeprobe.probes.runs.distributed import Shards, replica_placement
from bridgeprobe.probes.io.results import IncrementalCSV, ResumeMismatch, finish_rows



# --------------------------------------------------------------------------------------------- mechanism


def test_inactive_without_launcher_variables(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.context.cache_clear()
    try:
        shards = distributed.context()
    finally:
        distributed.context.cache_clear()
    assert shards == Shards() and not shards.active and shards.is_main
    assert shards.shard([1, 2, 3]) == [1, 2, 3] and shards.union({1}) == {1} and shards.all_gather(5) == [5]
    assert shards.placement("cuda", None, None) == ("cuda", None)


def test_shards_split_every_item_once() -> None:
    items = list(range(11))
    parts = [Shards(rank=r, world_size=3).shard(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and [len(p) for p in parts] == [4, 4, 3]


ROWS = [{"key": k, "layer": layer, "token": token, "value": value}
        for k, token in (("b", " 1945"), ("a", "Paris"), ("c", "3.50"))
        for layer, value in ((1, 0.1 + 0.2), (0, float("nan")))]


def test_merged_shards_equal_one_store_byte_for_byte(tmp_path: Path) -> None:
    columns = ["key", "layer", "token", "value"]
    single = IncrementalCSV(tmp_path / "single", "t", columns, {"s": 1})
    for row in ROWS:
        single.append([row])
    expected = single.finish(["key", "layer"])
    shards = [IncrementalCSV(tmp_path / f"shard{i}", "t", columns, {"s": 1}) for i in range(2)]
    for i, row in enumerate(ROWS):
        shards[i % 2].append([row])
    merged = finish_rows(tmp_path / "merged.csv", columns, [s.rows() for s in shards], ["key", "layer"])
    pd.testing.assert_frame_equal(merged, expected)
    assert (tmp_path / "merged.csv").read_bytes() == (tmp_path / "single" / "t.csv").read_bytes()
    assert shards[0].rows().count("\n") == 3  # committed rows only, no header


def test_an_interrupted_run_of_another_process_count_is_refused(tmp_path: Path) -> None:
    IncrementalCSV(tmp_path / "shards" / "1-of-4", "lens", ["a"], {}).append([{"a": 1}])
    with pytest.raises(ResumeMismatch, match="interrupted data-parallel run of 4 processes"):
        Shards().store(tmp_path, "lens", ["a"], {})
    with pytest.raises(ResumeMismatch, match="of 4 processes"):
        Shards(rank=0, world_size=2).store(tmp_path, "lens", ["a"], {})
    Shards().store(tmp_path, "other", ["a"], {})  # another output name is unaffected
    assert Shards(rank=1, world_size=4).store(tmp_path, "lens", ["a"], {}).done(["a"]) == {("1",)}
    with pytest.raises(ResumeMismatch, match="interrupted single-process run"):
        Shards(rank=0, world_size=2).store(tmp_path, "other", ["a"], {})


def test_replica_placement() -> None:
    free = lambda: {0: 10, 1: 11, 2: 12, 3: 13, "cpu": 100}  # noqa: E731
    place = lambda rank, world, *args: replica_placement(rank, world, 4, *args, available=free)  # noqa: E731
    assert place(1, 2, "cuda", None, None) == ("cuda:1", None)
    assert place(5, 8, "cuda", None, None) == ("cuda:1", None)  # more processes than GPUs: shared round robin
    assert place(1, 2, "cuda:3", None, None) == ("cuda:3", None)  # an explicit GPU is kept
    assert place(1, 2, "cpu", None, None) == ("cpu", None)
    assert place(1, 2, None, "auto", None) == (None, {2: 12, 3: 13, "cpu": 100})  # its own two GPUs
    assert place(3, 4, None, "auto", {"0": "70GiB", "cpu": "9GiB"}) == (None, {3: "70GiB", "cpu": "9GiB"})
    assert place(1, 2, None, "balanced", {0: "1GiB", 1: "2GiB"}) == (None, {2: "1GiB", 3: "2GiB"})
    with pytest.raises(ValueError, match="names GPU 1 but each of the 4 processes"):
        place(0, 4, None, "auto", {"1": "1GiB"})
    explicit = {"model.layers.0": 0}
    assert place(1, 2, None, explicit, None) == (None, None)  # a per-module map is the user's to place
    assert replica_placement(1, 2, 0, "cuda", "auto", None, available=free) == ("cuda", None)  # no GPU


# --------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dp")
    save_tiny_checkpoint(path)
    return path


def test_a_patching_run_stopped_between_its_two_tables_resumes_without_duplicates(workspace: Path,
                                                                                  monkeypatch) -> None:
    from bridgeprobe.probes.model.load import load_model
    from bridgeprobe.probes.runs.pipeline import hook_model, item_pairs, run_patching
    from bridgeprobe.prompts.loaders import load_prompts

    hooked = hook_model(*load_model(str(workspace / "model")))
    pairs, _ = item_pairs(load_prompts([str(workspace / "prompts.jsonl")]), hooked.tokenizer)
    options = {"sites": ["resid_pre"], "method": "exact", "direction": "denoise", "settings": {}, "bridge_rank": True}
    run_patching(hooked, pairs[:3], workspace / "tables1", **options)
    real, calls = IncrementalCSV.append, []

    def stop_at_the_second_patching_append(self, rows):
        if self.final.name == "patching.csv":
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the bridge rows of pair 2 are on disk, its patching rows are not
        real(self, rows)

    monkeypatch.setattr(IncrementalCSV, "append", stop_at_the_second_patching_append)
    with pytest.raises(KeyboardInterrupt):
        run_patching(hooked, pairs[:3], workspace / "tables2", **options)
    monkeypatch.setattr(IncrementalCSV, "append", real)
    run_patching(hooked, pairs[:3], workspace / "tables2", **options)
    for name in ("patching.csv", "patching_bridge.csv"):
        assert (workspace / "tables2" / name).read_bytes() == (workspace / "tables1" / name).read_bytes(), name


def _bridgeprobe() -> Path:
    script = Path(sys.executable).with_name("bridgeprobe")
    if not script.is_file():
        pytest.skip("the bridgeprobe console script is not installed (pip install -e .)")
    return script


def _torchrun(workspace: Path, *args: str, driver: Path | None = None, env: dict | None = None) -> int:
    """``torchrun --standalone --nproc_per_node 2 --no-python bridgeprobe ARGS`` (or a Python ``driver`` script)."""
    program = ["--no-python", str(_bridgeprobe())] if driver is None else [str(driver)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program,
               *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, cwd=workspace, env=environment, capture_output=True, text=True)
    if result.returncode:  # pytest shows this with a failing test: the workers' own error, not only the exit code
        print(f"torchrun exited {result.returncode}; its stderr ends:\n{result.stderr[-4000:]}")
    return result.returncode


def _single(workspace: Path, *args: str) -> None:
    """The same command in this process, on one thread like each torchrun worker."""
    from bridgeprobe.probes.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = Path.cwd()
    try:
        os.chdir(workspace)
        assert main(list(args)) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_process_lens_equals_one_process(workspace: Path) -> None:
    args = ("lens", "--model", "model", "--prompts", "prompts.jsonl")  # batch size: automatic, 16 on the CPU
    _single(workspace, *args, "--out", "lens1")
    assert _torchrun(workspace, *args, "--out", "lens2") == 0
    assert (workspace / "lens2" / "lens.csv").read_bytes() == (workspace / "lens1" / "lens.csv").read_bytes()
    assert len(pd.read_csv(workspace / "lens2" / "lens.csv")) == 8 * 5 * 3  # items x probes (control too) x layers
    run = json.loads((workspace / "lens2" / "run.json").read_text())
    assert run["processes"] == 2 and run["n_queries"] == 40 and run["resumed_queries"] == 0
    assert run["lens_batch_size"] == run["lens_batch_size_used"] == 16
    assert not (workspace / "lens2" / "shards").exists()


DRIVER = """
import os, sys
from bridgeprobe.probes.io.results import IncrementalCSV

rank, log, crash_after = os.environ["RANK"], os.environ["APPEND_LOG"], int(os.environ.get("CRASH_AFTER", "0"))
real, count = IncrementalCSV.append, [0]


def append(self, rows):
    rows = list(rows)
    real(self, rows)
    if self.final.name == "patching.csv":  # committed: note which pairs this process computed
        with open(f"{log}.{rank}", "a") as fh:
            fh.write("".join(sorted({f"{row['clean_id']}\\n" for row in rows})))
        count[0] += 1
        if rank == "1" and count[0] == crash_after:
            os._exit(3)  # a hard crash: no clean-up, no merge


IncrementalCSV.append = append
from bridgeprobe.probes.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_patch_resumes_after_a_crash_and_equals_one_process(workspace: Path) -> None:
    args = ("patch", "--model", "model", "--prompts", "prompts.jsonl", "--site", "resid_pre,head", "--bridge-rank")
    _single(workspace, *args, "--out", "patch1")
    driver = workspace / "driver.py"
    driver.write_text(DRIVER)
    log = workspace / "appended"
    assert _torchrun(workspace, *args, "--out", "patch2", driver=driver,
                     env={"APPEND_LOG": f"{log}-crash", "CRASH_AFTER": "1"}) != 0
    assert not (workspace / "patch2" / "patching.csv").exists()
    assert (workspace / "patch2" / "shards" / "1-of-2" / "patching.partial.csv").exists()
    crashed = [line for f in workspace.glob("appended-crash.*") for line in f.read_text().split()]
    assert _torchrun(workspace, *args, "--out", "patch2", driver=driver, env={"APPEND_LOG": f"{log}-resume"}) == 0
    resumed = [line for f in workspace.glob("appended-resume.*") for line in f.read_text().split()]
    # every pair computed once: what was committed before the crash was not run again
    assert sorted(crashed + resumed) == sorted(p[0].lower() for p in PLACES) and len(crashed) >= 1
    for name in ("patching.csv", "patching_bridge.csv", "patching_layers.csv"):
        assert (workspace / "patch2" / name).read_bytes() == (workspace / "patch1" / name).read_bytes(), name
    assert not (workspace / "patch2" / "shards").exists()
    assert json.loads((workspace / "patch2" / "run.json").read_text())["processes"] == 2


@pytest.mark.gpu
@pytest.mark.slow
def test_two_process_lens_on_gpu_equals_one_process(workspace: Path) -> None:
    """NCCL and gloo in one process group, each process's replica on the GPU (both on GPU 0 on a one-GPU host)."""
    args = ("lens", "--model", "model", "--prompts", "prompts.jsonl", "--device", "cuda", "--batch-size", "4")
    _single(workspace, *args, "--out", "gpu1")
    assert _torchrun(workspace, *args, "--out", "gpu2") == 0
    one, two = (pd.read_csv(workspace / out / "lens.csv") for out in ("gpu1", "gpu2"))
    assert len(one) == len(two) == 8 * 5 * 3 and (one["rank"] == two["rank"]).all()
    assert (one["logprob"] - two["logprob"]).abs().max() <= 1e-5
    assert json.loads((workspace / "gpu2" / "run.json").read_text())["processes"] == 2
