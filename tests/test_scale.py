"""Large-model runs: lens batch sizes from free memory with out-of-memory back-off, the lens memory estimate
against measured peaks, and the quantized-fidelity comparison (statistics and the `fidelity` command)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bridgeprobe.probes.runs.pipeline
from conftest import CharTokenizer, requires_smollm2, save_tiny_checkpoint, tiny_model
from bridgeprobe.probes.runs.fidelity import compare_lens, compare_patching, spearman
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import (DEFAULT_BATCH_SIZE, MAX_AUTO_BATCH, _encode, auto_batch_size, lens_batch,
                                              lens_memory, lens_queries)
from bridgeprobe.probes.runs.pipeline import run_lens
from bridgeprobe.prompts.schema import PromptItem

ITEMS = [PromptItem(f"i{k}", f"The capital of the country where landmark {k} {'x' * k} is", f"Country{k}",
                    f"City{k}", hop1=f"Landmark {k} is in", hop2=f"The capital of Country{k} is") for k in range(7)]


def _peak_tracker() -> type:
    """:class:`PeakTracker` of the scale benchmark (the CPU has no max_memory_allocated)."""
    path = Path(__file__).parent / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakTracker


@pytest.fixture
def hooked() -> NativeHooks:
    return NativeHooks(tiny_model("llama"), CharTokenizer())


def test_lens_halves_its_batch_on_out_of_memory_and_writes_the_same_rows(hooked, tmp_path: Path, monkeypatch) -> None:
    real = bridgeprobe.probes.runs.pipeline.lens_batch
    sizes = []

    def small_gpu(hooked, batch, **kwargs):
        sizes.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(hooked, batch, **kwargs)

    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", small_gpu)
    run = run_lens(hooked, ITEMS, tmp_path / "oom", settings={}, batch_size=12)
    assert sizes[:3] == [12, 6, 3] and max(sizes[3:]) == 3  # halved twice, and later batches stay small
    assert run.batch_size == 12 and run.batch_size_used == 3 and len(run.frame) == 7 * 5 * 3  # items x probes x layers
    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", real)
    run_lens(hooked, ITEMS, tmp_path / "plain", settings={}, batch_size=3)
    # the batches that ran are those of a plain run with batch size 3, so the file is the same byte for byte
    assert (tmp_path / "oom" / "lens.csv").read_bytes() == (tmp_path / "plain" / "lens.csv").read_bytes()


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: device-side assert triggered"), KeyError("x")])
def test_other_errors_are_not_taken_for_out_of_memory(hooked, tmp_path: Path, monkeypatch, error) -> None:
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", failing)
    with pytest.raises(type(error)):
        run_lens(hooked, ITEMS, tmp_path / "out", settings={}, batch_size=4)


def test_out_of_memory_with_one_query_is_raised(hooked, tmp_path: Path, monkeypatch) -> None:
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", no_memory)
    with pytest.raises(MemoryError):
        run_lens(hooked, ITEMS[:1], tmp_path / "out", settings={}, batch_size=4)


def test_auto_batch_size_fits_the_memory_estimate(hooked) -> None:
    queries = lens_queries(ITEMS)
    assert auto_batch_size(hooked, queries) == DEFAULT_BATCH_SIZE  # no GPU
    encoded = [_encode(hooked.tokenizer, q) for q in queries]
    longest, extra = max(len(e.sequence) for e in encoded), max(len(e.target_ids) for e in encoded) - 1

    def cost(size: int) -> int:  # a batch of `size` queries on `size` sequences, or on a third as many
        return max(lens_memory(hooked, size, longest, n_sequences=n, n_extra=extra) for n in (size, -(-size // 3)))

    sizes = [auto_batch_size(hooked, queries, free_bytes=int(k * cost(1))) for k in (1, 4, 16, 64, 10**6)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == MAX_AUTO_BATCH
    for k, size in zip((4, 16, 64), sizes[1:4]):  # the largest batch whose estimate fits half the free memory
        assert cost(size) <= 0.5 * k * cost(1) < cost(size + 1), (k, size)


def _measured_and_estimated(hooked: NativeHooks, queries: list, all_positions: bool) -> tuple[int, int]:
    tracker = _peak_tracker()()
    with tracker:
        lens_batch(hooked, queries, all_positions=all_positions)
    encoded = [_encode(hooked.tokenizer, q) for q in queries]
    estimate = lens_memory(hooked, len(queries), max(len(e.sequence) for e in encoded),
                           n_sequences=len({e.sequence for e in encoded}), all_positions=all_positions,
                           n_extra=max(len(e.target_ids) for e in encoded) - 1)
    return tracker.peak, estimate


@pytest.mark.parametrize("all_positions", [False, True])
def test_lens_memory_estimate_bounds_the_measured_peak(hooked, all_positions: bool) -> None:
    queries = lens_queries(ITEMS)
    for size in (1, 7, 28):
        measured, estimate = _measured_and_estimated(hooked, queries[:size], all_positions)
        assert 0 < measured <= estimate, (size, measured, estimate)


@pytest.mark.slow
@requires_smollm2
def test_lens_memory_estimate_on_smollm2(smollm2) -> None:
    from bridgeprobe.prompts.loaders import load_prompts

    hooked = NativeHooks(*smollm2)
    queries = lens_queries(load_prompts("curated", limit=16))
    for size, all_positions in ((1, False), (32, False), (4, True)):  # measured/estimate: 0.66, 0.52, 0.59
        measured, estimate = _measured_and_estimated(hooked, queries[:size], all_positions)
        assert 0.25 * estimate <= measured <= estimate, (size, all_positions, measured, estimate)


# --------------------------------------------------------------------------------------------- fidelity


def test_spearman_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.permutation(50), rng.permutation(50)  # no ties
    d = a - b
    assert spearman(pd.Series(a), pd.Series(b)) == pytest.approx(1 - 6 * (d**2).sum() / (50 * (50**2 - 1)))


def _lens_table(ranks: list[list[int]]) -> pd.DataFrame:
    """Two queries x len(ranks[0]) layers."""
    rows = [{"prompt_id": f"p{q}", "prompt_kind": "two_hop", "target": "bridge", "layer": layer, "position": 5,
             "rank": rank, "logprob": -float(rank)} for q, per_layer in enumerate(ranks) for layer, rank in
            enumerate(per_layer)]
    return pd.DataFrame(rows)


def test_compare_lens_figures() -> None:
    reference = _lens_table([[9, 3, 0], [50, 20, 4]])
    variant = _lens_table([[8, 0, 1], [50, 20, 4]])
    same = {r["statistic"]: r["value"] for r in compare_lens(reference, reference) if r["layer"] is None}
    assert same["rank_spearman"] == pytest.approx(1) and same["logprob_max_abs_diff"] == 0
    assert same["top1_agreement"] == same["peak_layer_agreement"] == 1
    rows = compare_lens(reference, variant.sample(frac=1, random_state=0))  # row order does not matter
    overall = {r["statistic"]: r["value"] for r in rows if r["layer"] is None}
    assert overall["logprob_max_abs_diff"] == 3 and overall["logprob_mean_abs_diff"] == pytest.approx(5 / 6)
    assert overall["top1_agreement"] == pytest.approx(4 / 6)  # layers 1 and 2 of p0 flip
    assert overall["top10_agreement"] == 1
    assert overall["peak_layer_agreement"] == 0.5  # p0 peaks at layer 2, then at layer 1
    assert overall["log10_rank_max_abs_diff"] == pytest.approx(np.log10(4))
    layer1 = {r["statistic"]: r["value"] for r in rows if r["layer"] == 1}
    assert layer1["top1_agreement"] == 0.5
    with pytest.raises(ValueError, match="do not cover the same rows"):
        compare_lens(reference, variant.iloc[1:])


def test_compare_patching_figures() -> None:
    cells = [(layer, position) for layer in range(2) for position in range(3)]
    reference = pd.DataFrame([{"clean_id": "a", "site": "resid_pre", "layer": l, "position": p, "head": None,
                               "value": 0.1 * (3 * l + p), "metric": 3 * l + p} for l, p in cells])
    variant = reference.assign(value=reference["value"][::-1].to_numpy(), metric=reference["metric"] + 0.5)
    overall = {r["statistic"]: r["value"] for r in compare_patching(reference, variant) if r["site"] is None}
    assert overall["value_spearman"] == pytest.approx(-1) and overall["top_cell_agreement"] == 0
    assert overall["value_pearson"] == pytest.approx(-1) and overall["value_spearman_large"] == pytest.approx(-1)
    assert overall["value_max_abs_diff"] == pytest.approx(0.5) and overall["metric_mean_abs_diff"] == 0.5
    same = {r["statistic"]: r["value"] for r in compare_patching(reference, reference) if r["site"] is None}
    assert same["value_spearman"] == pytest.approx(1) and same["top_cell_agreement"] == 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fidelity")
    save_tiny_checkpoint(path)
    return path


@pytest.mark.slow
def test_fidelity_command_compares_each_variant_with_the_reference(checkpoint: Path, tmp_path: Path) -> None:
    from bridgeprobe.probes.cli import main

    variants = ["bfloat16"] + (["8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") else [])
    assert main(["fidelity", "--model", str(checkpoint / "model"), "--prompts", str(checkpoint / "prompts.jsonl"),
                 "--out", str(tmp_path), "--compare", *variants, "--patch-pairs", "2", "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "fidelity.csv")
    assert list(table["variant"].unique()) == variants
    for variant in variants:  # each figure recomputed from the two runs' own tables
        reference = pd.read_csv(tmp_path / "float32" / "lens.csv")
        other = pd.read_csv(tmp_path / variant / "lens.csv")
        overall = table[(table.variant == variant) & (table.probe == "lens") & table.layer.isna()]
        figures = dict(zip(overall["statistic"], overall["value"]))
        diff = (reference["logprob"] - other["logprob"]).abs()  # both sorted by the same keys
        assert figures["logprob_max_abs_diff"] == pytest.approx(diff.max())
        assert figures["top1_agreement"] == pytest.approx(((reference["rank"] == 0) == (other["rank"] == 0)).mean())
        assert 0 < figures["logprob_max_abs_diff"] < 0.5 and figures["rank_spearman"] > 0.9
    summary = json.loads((tmp_path / "fidelity.json").read_text())
    assert summary["reference"] == "float32" and set(summary["variants"]) == set(variants)
    assert set(summary["variants"][variants[0]]) == {"lens", "patching"}
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["variants"]["float32"]["weight_bytes"] > run["variants"][variants[-1]]["weight_bytes"]


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.slow
@requires_smollm2
def test_real_out_of_memory_on_gpu_halves_the_lens_batch(tmp_path: Path) -> None:
    """With 2 GiB left for activations, 64 prompts of ~1100 tokens do not fit in one batch: the lens backs off and
    writes what a run with the smaller batch writes; the automatic batch size fits its estimate in free memory."""
    from bridgeprobe.probes.readouts.lens import free_memory
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model("smollm2-135m", device="cuda")
    hooked = NativeHooks(model, tokenizer)
    text = "the river runs past the old mill and on to the sea " * 100
    items = [PromptItem(f"long{k}", f"{text} and item {k} is in", "France", "Paris") for k in range(64)]
    queries = lens_queries(items)
    auto = auto_batch_size(hooked, queries)
    assert DEFAULT_BATCH_SIZE < auto <= MAX_AUTO_BATCH
    longest = max(len(_encode(tokenizer, q).sequence) for q in queries)
    assert lens_memory(hooked, auto, longest) <= 0.5 * free_memory(hooked)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + (2 << 30)) / total))
    try:
        run = run_lens(hooked, items, tmp_path / "oom", settings={}, batch_size=128)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert run.batch_size == 128 and run.batch_size_used < 128
    run_lens(hooked, items, tmp_path / "plain", settings={}, batch_size=run.batch_size_used)
    oom, plain = pd.read_csv(tmp_path / "oom" / "lens.csv"), pd.read_csv(tmp_path / "plain" / "lens.csv")
    assert len(oom) == len(plain) == 128 * 30
    assert (oom["logprob"] - plain["logprob"]).abs().max() <= 1e-3 and (oom["rank"] - plain["rank"]).abs().max() <= 2
