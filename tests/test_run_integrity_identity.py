"""Run integrity of the identity commands (issue 26): identity-grid puts only runs with equal settings (but the
seed) in one cell, locks its --out and stops with one line on a damaged run.json; finetune-lens loads the base
model the run recorded (absolute location and identity), not whatever its name means in the current directory;
reproduce and finetune mark a run finished only after their report files, and a finished run whose report files
are missing gets them rebuilt from its tables without training."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from bridgeprobe.probes.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(args: list[str]) -> int:
    """``main``; Ctrl-C (the simulated kill) as exit 130, whether main turns it into that or lets it through."""
    try:
        return main(args)
    except KeyboardInterrupt:
        return 130


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- identity-grid


def _fake_run(path: Path, seed: int = 0, **changes: dict) -> Path:
    """A finished reproduce run as identity-grid reads it (run.json settings of the tiny preset, results.csv),
    without training; ``changes``: settings per part, e.g. ``train={"n_layer": 3}``."""
    from bridgeprobe.analyses.identity_report import GRID_KEYS
    from bridgeprobe.probes.identity.data import REPRODUCE_PRESETS
    from bridgeprobe.probes.identity.scratch import TrainConfig
    from bridgeprobe.prompts.synthetic import SynthConfig

    preset = REPRODUCE_PRESETS["tiny"]
    train = {**asdict(TrainConfig(**preset["train"])), **changes.get("train", {})}
    data = {**asdict(SynthConfig(**preset["data"], seed=seed)), **changes.get("data", {})}
    grid = [{k: train[k] for k in GRID_KEYS}]
    settings = {"preset": "tiny", "train": train, "data": data, "seeds": [seed], "grid": grid,
                "conditions": ["no_identity", "identity"]}
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"command": "reproduce", "status": "finished", "settings": settings}))
    rows = [{"model": train["model"], **grid[0], "condition": condition, "seed": seed,
             "ood_two_hop_acc": acc, "id_two_hop_acc": 0.5, "one_hop_acc": 0.5}
            for condition, acc in (("no_identity", 0.1 + seed / 10), ("identity", 0.3 + seed / 10))]
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    return path


def test_identity_grid_puts_runs_with_other_settings_in_other_cells(tmp_path: Path, capsys) -> None:
    _fake_run(tmp_path / "runs" / "a", seed=0)
    _fake_run(tmp_path / "runs" / "a_seed1", seed=1, train={"checkpoint_every": 5})  # same cell: seed, bookkeeping
    _fake_run(tmp_path / "runs" / "b", seed=0, train={"n_layer": 3, "batch_size": 32}, data={"n_objects": 8})
    assert main(["identity-grid", str(tmp_path / "runs"), "--out", str(tmp_path / "grid")]) == 0
    grid = pd.read_csv(tmp_path / "grid" / "grid.csv").set_index("train.n_layer")
    assert sorted(grid.index) == [2, 3] and grid.loc[2, "seeds"] == 2 and grid.loc[3, "seeds"] == 1
    assert grid.loc[3, "train.batch_size"] == 32 and grid.loc[3, "data.n_objects"] == 8
    assert grid.loc[3, "ood_two_hop_acc identity mean"] == pytest.approx(0.3)  # b alone, not averaged with a
    assert grid.loc[2, "ood_two_hop_acc identity mean"] == pytest.approx(0.35)
    assert "train.n_layer" in (tmp_path / "grid" / "grid.md").read_text()
    # the same seed of the same cell in two runs: refused, naming both
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "twice")
    assert main(["identity-grid", str(tmp_path / "runs" / "a"), str(tmp_path / "twice"),
                 "--out", str(tmp_path / "grid2")]) == 2
    err = _one_line_error(capsys)
    assert f"{tmp_path / 'runs' / 'a'} and {tmp_path / 'twice'} both hold seed 0" in err
    assert not (tmp_path / "grid2").exists()


def test_identity_grid_out_into_a_running_directory_is_refused(tmp_path: Path, capsys) -> None:
    from bridgeprobe.probes.runs.rundir import run_directory

    run = _fake_run(tmp_path / "a")
    busy = tmp_path / "running"
    with run_directory(busy, {"command": "reproduce"}):  # as a reproduce job in progress holds it
        assert main(["identity-grid", str(run), "--out", str(busy)]) == 2
        assert f"{busy} is in use" in _one_line_error(capsys)
    assert sorted(p.name for p in busy.iterdir()) == ["run.json"]  # nothing written into it


@pytest.mark.parametrize("content", ['{"command": "reproduce\x01"}', "[1, 2]", '"finished"'])
def test_identity_grid_names_a_damaged_run_json(tmp_path: Path, capsys, content: str) -> None:
    _fake_run(tmp_path / "runs" / "a")
    damaged = tmp_path / "runs" / "b" / "run.json"
    damaged.parent.mkdir()
    damaged.write_text(content)
    assert main(["identity-grid", str(tmp_path / "runs"), "--out", str(tmp_path / "grid")]) == 2
    err = _one_line_error(capsys)
    assert f"{damaged} is damaged" in err and "delete it, or rerun that run with --overwrite" in err


def test_identity_grid_refuses_a_cut_short_results_table(tmp_path: Path, capsys) -> None:
    run = _fake_run(tmp_path / "runs" / "a")
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "rows": {"results.csv": 2}}))  # as write_finished records
    assert main(["identity-grid", str(run), "--out", str(tmp_path / "grid")]) == 0
    lines = (run / "results.csv").read_text().splitlines(keepends=True)
    (run / "results.csv").write_text("".join(lines[:2]))
    assert main(["identity-grid", str(run), "--out", str(tmp_path / "grid")]) == 2
    err = _one_line_error(capsys)
    assert f"{run / 'results.csv'} has 1 rows but its run wrote 2" in err and "--recompute" in err


# ------------------------------------------------------------------------------------------------- reproduce


def test_reproduce_is_finished_only_after_its_report_and_rebuilds_missing_files(tmp_path: Path, capsys,
                                                                                monkeypatch) -> None:
    import bridgeprobe.analyses.identity_report as report

    out = tmp_path / "run"
    args = ["reproduce", "--preset", "tiny", "--seeds", "0", "--steps", "10", "--eval-every", "10",
            "--checkpoint-every", "10", "--out", str(out)]
    real = report.write_page

    def killed(*a, **kw):  # a kill after the last table, while the last report file is written
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_page", killed)
    assert _cli(args) == 130
    assert json.loads((out / "run.json").read_text())["status"] != "finished"
    assert not (out / "index.html").exists()
    monkeypatch.setattr(report, "write_page", real)
    assert _cli(args) == 0  # resumes: the checkpoints say training is done, so only the report is written
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and (out / "index.html").is_file()
    assert [r["resumed_from"] for r in record["results"]] == [10, 10]  # no step trained again
    # a finished run whose report files are gone (deleted, or killed in that gap by an older bridgeprobe)
    for name in ("index.html", "comparison.md", "learning_curves.png"):
        (out / name).unlink()
    capsys.readouterr()
    assert _cli(args) == 0
    assert ("the run is finished but comparison.md, learning_curves.png, index.html are missing; rebuilding"
            in capsys.readouterr().out)
    assert all((out / name).is_file() for name in ("index.html", "comparison.md", "learning_curves.png"))
    assert json.loads((out / "run.json").read_text())["finished"] == record["finished"]  # not run again
    (out / "index.html").unlink()
    (out / "metrics.csv").unlink()
    assert _cli(args) == 2
    assert "metrics.csv is missing too" in _one_line_error(capsys)


# -------------------------------------------------------------------------------------- finetune, finetune-lens

FINETUNE = ["finetune", "--model", "model", "--subjects", "10", "--bridges", "4", "--objects", "6", "--r1", "2",
            "--r2", "2", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--steps", "2", "--batch-size", "4",
            "--eval-every", "2", "--checkpoint-every", "2", "--probe-items", "2", "--patch-pairs", "0",
            "--seeds", "0", "--eval-items", "4"]


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finetune run of ``ws/a/model`` given by its relative name from ``ws/a``, killed while its last report file
    is written and rerun; what was seen after the kill and in the rerun."""
    import bridgeprobe.analyses.identity_report as report
    import bridgeprobe.probes.identity.finetune as finetune
    from test_finetune import _tiny_dir

    ws = tmp_path_factory.mktemp("finetune")
    (ws / "a").mkdir()
    _tiny_dir(ws / "a" / "model")
    out = ws / "run"
    seen: dict = {"ws": ws, "out": out}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real_page = report.write_page

    def killed(*a, **kw):  # a kill after the last table, while the last report file is written
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ws / "a")
        patch.setattr(report, "write_page", killed)
        seen["killed_rc"] = _cli([*FINETUNE, "--out", str(out)])
        seen["killed_status"] = json.loads((out / "run.json").read_text())["status"]
        seen["killed_page"] = (out / "index.html").exists()
        patch.setattr(report, "write_page", real_page)
        steps, real_loss = [], finetune.target_loss
        patch.setattr(finetune, "target_loss", lambda *a, **kw: steps.append(1) or real_loss(*a, **kw))
        seen["rerun_rc"] = _cli([*FINETUNE, "--out", str(out)])
        seen["rerun_steps"] = len(steps)
    torch.set_num_threads(threads)
    return seen


def test_finetune_is_finished_only_after_its_report(finetune_run: dict) -> None:
    out = finetune_run["out"]
    assert finetune_run["killed_rc"] == 130
    assert finetune_run["killed_status"] != "finished" and not finetune_run["killed_page"]
    assert finetune_run["rerun_rc"] == 0 and finetune_run["rerun_steps"] == 0  # the rerun trained nothing
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert all((out / name).is_file() for name in ("index.html", "comparison.csv", "learning_curves.png"))


def test_finetune_lens_loads_the_recorded_base_model_or_refuses(finetune_run: dict, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    import bridgeprobe.probes.model.load as models

    ws, run = finetune_run["ws"], finetune_run["out"]
    base = ws / "a" / "model"
    # from another directory, where "model" names other weights
    (tmp_path / "b").mkdir()
    shutil.copytree(base, tmp_path / "b" / "model")
    monkeypatch.chdir(tmp_path / "b")
    loaded, real = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: loaded.append(spec) or real(spec, **kw))
    assert main(["finetune-lens", str(run), "--out", str(tmp_path / "lens"), "--per-split", "1"]) == 0
    assert loaded == [str(base.resolve())]
    assert json.loads((run / "run.json").read_text())["model_path"] == str(base.resolve())
    record = json.loads((tmp_path / "lens" / "run.json").read_text())
    assert record["model_path"] == str(base.resolve()) and record["model_identity"]["directory"] == str(base.resolve())
    # the base model's weights changed since the adapters were trained on them: refused before loading
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    loaded.clear()
    capsys.readouterr()
    assert main(["finetune-lens", str(run), "--out", str(tmp_path / "lens2")]) == 2
    err = _one_line_error(capsys)
    assert f"the base model {base.resolve()} is not the one its adapters were trained on" in err
    assert "files.model.safetensors" in err and loaded == [] and not (tmp_path / "lens2").exists()
