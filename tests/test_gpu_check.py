"""The GPU check's CPU dry run (tests/benchmarks/gpu_check.py --tiny): every section there, with values checked
independently (fast sweep vs naive, lens rows across batch sizes, the back-off ending with a plain run's rows), so
that the script ready for a GPU host cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).parent / "benchmarks" / "gpu_check.py"
SHAPES = ("llama-tiny", "qwen2-tiny")
PER_SHAPE = ("build", "lens", "sweep", "attribution", "memory", "oom_lens", "oom_sweep")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _gpu_check()


@pytest.fixture(scope="module")
def n_queries(gpu_check) -> int:
    """Lens queries of the dry run's 4 items (every probe of probes.readouts.lens applies to each)."""
    from bridgeprobe.probes.readouts.lens import lens_queries

    return len(lens_queries(gpu_check.prompt_items(4)))


@pytest.fixture(scope="module")
def dry_run(gpu_check, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "gpu_check.json").read_text()), out


def test_dry_run_has_every_section_each_with_its_command(dry_run) -> None:
    data, out = dry_run
    checks = data["checks"]
    expected = {"gpu_tests", "device_map", "quantized", *(f"{s}/{c}" for s in SHAPES for c in PER_SHAPE)}
    assert set(checks) == expected
    for key, check in checks.items():
        name = key.split("/")[-1]
        assert check["command"].startswith(f"python tests/benchmarks/gpu_check.py --tiny --only {name}")
        assert ("--shapes" in check["command"]) == ("/" in key)
        assert check["status"] == ("skipped: needs CUDA" if key == "quantized" else "ok"), (key, check)
    assert data["environment"]["checks_use_cuda"] is False and data["elapsed_s"] < data["budget_s"]
    text = (out / "gpu_check.txt").read_text()
    assert all(f"- {key}: " in text for key in expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host these tests run (or skip for other reasons)")
def test_gpu_tests_are_run_and_parsed(dry_run) -> None:
    tests = dry_run[0]["checks"]["gpu_tests"]
    assert (dry_run[1] / "gpu_tests.xml").is_file() and (dry_run[1] / "gpu_tests.log").is_file()
    names = [t["test"] for t in tests["tests"]]
    assert len(names) == 3 and all(n.startswith("tests.test_models::test_embedded_model_on_gpu") for n in names)
    assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": 3} and tests["returncode"] == 0
    assert all(t["message"] == "needs a CUDA GPU" for t in tests["tests"])


@pytest.mark.parametrize("shape", SHAPES)
def test_build_counts_the_parameters_of_the_config(dry_run, gpu_check, shape) -> None:
    build = dry_run[0]["checks"][f"{shape}/build"]
    model = AutoModelForCausalLM.from_config(gpu_check.shape_configs(True)[shape])
    parameters = sum(p.numel() for p in model.parameters())
    assert build["parameters"] == parameters and build["weight_bytes_formula"] == 4 * parameters
    assert build["weight_bytes_allocated"] is None  # no CUDA


@pytest.mark.parametrize("shape", SHAPES)
def test_lens_rows_are_equal_across_batch_sizes(dry_run, n_queries, shape) -> None:
    lens = dry_run[0]["checks"][f"{shape}/lens"]
    runs = {r["batch_size"]: r for r in lens["runs"]}
    assert set(runs) == {4, 16} and lens["auto_batch_size"] == 16 and runs[16]["auto"] and not runs[4]["auto"]
    assert lens["queries"] == n_queries >= 4 * 4 and all(r["queries_per_s"] > 0 for r in runs.values())
    assert all(r["estimate_bytes"] > 0 and r["peak_over_weights_bytes"] is None for r in runs.values())
    agreement = lens["rows_vs_batch_size"]["by_batch_size"]
    assert set(agreement) == {"16"}
    for a in agreement.values():  # 3 layers per query
        assert a["rows"] == a["rows_joined"] == n_queries * 3
        assert a["logprob_max_abs_diff"] < 1e-4 and a["rank_equal_fraction"] == 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_sweep_matches_naive_with_fewer_forwards(dry_run, shape) -> None:
    sweep = dry_run[0]["checks"][f"{shape}/sweep"]
    assert sweep["method"] == "fast" and sweep["cells"] == 3 * 20 == sweep["naive_forward_equivalents"]
    assert sweep["metric_max_abs_diff"] < 1e-4 and sweep["value_max_abs_diff"] < 1e-3 and sweep["agrees"]
    assert 0 < sweep["fast_forward_equivalents"] < sweep["naive_forward_equivalents"]
    assert sweep["cache_bytes"] == 4 * 3 * 20 * (2 * 2 * 16 + 2 * 64)  # e * L * T * (2 kv hd + 2 d)
    attribution = dry_run[0]["checks"][f"{shape}/attribution"]
    assert attribution["cells"] == 60 and attribution["forward_equivalents_nominal"] == 3.0
    assert 0 < attribution["forward_equivalents_measured"] < attribution["naive_forward_equivalents"] == 60


@pytest.mark.parametrize("shape", SHAPES)
def test_memory_check_times_every_analysis_on_paired_items(dry_run, shape) -> None:
    """The memory check runs cross-patching (every item has its partner), decoding and back-patching."""
    memory = dry_run[0]["checks"][f"{shape}/memory"]
    assert memory["status"] == "ok" and memory["items"] == 4
    per = memory["rows_per_analysis"]
    assert {"crosspatch", "decoding", "backpatch"} <= set(per) and sum(per.values()) == memory["rows"]
    assert {"crosspatch_s", "decoding_s", "backpatch_s"} <= set(memory["timings"])
    assert memory["seconds_per_item"] == pytest.approx(memory["seconds"] / 4, abs=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_backed_off_runs_end_with_the_rows_of_a_plain_run(dry_run, n_queries, shape) -> None:
    lens = dry_run[0]["checks"][f"{shape}/oom_lens"]
    assert lens["trigger"].startswith("simulated") and lens["backed_off"]
    assert (lens["batch_size_planned"], lens["batch_size_used"]) == (16, 4)  # 16 -> 8 -> 4 fits
    assert lens["same_file_as_plain_run"] and lens["rows"] == lens["rows_joined"] == n_queries * 3
    assert lens["logprob_max_abs_diff"] == 0 and lens["simulated_ooms"] == 2 and lens["cuda_ooms"] == 0
    sweep = dry_run[0]["checks"][f"{shape}/oom_sweep"]
    assert sweep["simulated_ooms"] > 0 and sweep["cells"] == 3 * 24 and sweep["metric_max_abs_diff"] < 1e-4
    assert sweep["agrees"] and sweep["tolerance"] == 1e-4


def test_device_map_load_gives_the_rows_of_a_single_device_load(dry_run, n_queries) -> None:
    check = dry_run[0]["checks"]["device_map"]
    assert check["checkpoint"] == "llama-tiny, 3 blocks" and check["modules_per_device"] == {"cpu": 7}
    assert check["lens"]["rows"] == check["lens"]["rows_joined"] == n_queries * 3
    assert check["lens"]["logprob_max_abs_diff"] < 1e-5 and check["sweep"]["metric_max_abs_diff"] < 1e-5
    assert check["sweep"]["agrees"] and check["sweep"]["cells"] == 3 * 20


def test_a_failing_check_is_recorded_and_the_next_runs(gpu_check, tmp_path, monkeypatch) -> None:
    def broken(shape):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "check_attribution", broken)
    threads = torch.get_num_threads()
    try:
        gpu_check.main(["--tiny", "--out", str(tmp_path), "--shapes", "qwen2-tiny", "--only", "attribution",
                        "oom_sweep"])
    finally:
        torch.set_num_threads(threads)
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert list(checks) == ["qwen2-tiny/build", "qwen2-tiny/attribution", "qwen2-tiny/oom_sweep"]
    assert checks["qwen2-tiny/attribution"]["status"] == "failed: RuntimeError: planted failure"
    assert "planted failure" in checks["qwen2-tiny/attribution"]["traceback"]
    assert checks["qwen2-tiny/oom_sweep"]["status"] == "ok"


def test_an_exhausted_budget_skips_checks_and_still_writes(gpu_check, tmp_path) -> None:
    gpu_check.main(["--tiny", "--out", str(tmp_path), "--budget-s", "0", "--shapes", "llama-tiny"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {key: check["status"] for key, check in data["checks"].items()}
    assert statuses["llama-tiny/build"].startswith("skipped: time budget")
    assert statuses["llama-tiny/lens"] == "skipped: the model was not built"
    assert statuses["gpu_tests"].startswith("skipped: time budget")
    assert statuses["device_map"].startswith("skipped: time budget")
