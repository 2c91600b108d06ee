"""The bridgeprobe command end to end on the real SmolLM2-135M: outputs, resume after interruption, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import probes.pipeline
from conftest import requires_smollm2
from probes.cli import main
from prompts.schema import PromptItem

pytestmark = [pytest.mark.slow, requires_smollm2]

ITEMS = [
    PromptItem("fuji", "The capital of the country where Mount Fuji is located is", "Japan", "Tokyo",
               hop1="Mount Fuji is located in the country of", hop2="The capital of Japan is"),
    PromptItem("colosseum", "The capital of the country where the Colosseum is located is", "Italy", "Rome",
               hop1="The Colosseum is located in the country of", hop2="The capital of Italy is"),
    PromptItem("hamlet", "The language spoken in the country of the author of Hamlet is", "England", "English"),
]


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in ITEMS))
    return path


def _lens(prompt_file: Path, out: Path, *extra: str) -> int:
    return main(["lens", "--model", "smollm2-135m", "--prompts", str(prompt_file), "--out", str(out),
                 "--batch-size", "2", *extra])


def test_lens_writes_long_csv_and_run_json(prompt_file: Path, tmp_path: Path) -> None:
    assert _lens(prompt_file, tmp_path / "out", "--report") == 0
    frame = pd.read_csv(tmp_path / "out" / "lens.csv")
    assert {"prompt_id", "layer", "position", "target", "token_id", "rank", "prob"} <= set(frame.columns)
    assert len(frame) == (2 * 4 + 2) * 30  # queries x layers
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"] == "smollm2-135m" and run["n_layers"] == 30 and run["timings"]["lens_s"] > 0
    assert {"torch", "transformers"} <= set(run["versions"])
    for name in ("index.html", "summary.json", "layers.csv", "prompts.csv", "ranks_by_layer.png", "bridge_heatmap.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    (tmp_path / "out" / "index.html").unlink()
    assert main(["report", str(tmp_path / "out")]) == 0  # rebuilt from lens.csv + run.json, no model
    assert "Where is the bridge entity?" in (tmp_path / "out" / "index.html").read_text()
    # the model's own greedy answer: Tokyo is the final-layer top token for the hop2 prompt
    last = frame[(frame.prompt_id == "fuji") & (frame.prompt_kind == "hop2") & (frame.layer == 29)]
    assert last["target_token"].item() == " Tokyo"


def test_interrupted_run_resumes_to_the_same_result(prompt_file: Path, tmp_path: Path, monkeypatch) -> None:
    assert _lens(prompt_file, tmp_path / "clean") == 0
    real = probes.pipeline.lens_batch
    calls = []

    def dying(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probes.pipeline, "lens_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        _lens(prompt_file, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "lens.partial.csv").exists() and not (tmp_path / "resumed" / "lens.csv").exists()
    monkeypatch.setattr(probes.pipeline, "lens_batch", real)
    assert _lens(prompt_file, tmp_path / "resumed") == 0
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["resumed_queries"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "lens.csv"),
                                  pd.read_csv(tmp_path / "clean" / "lens.csv"), check_exact=False, atol=1e-5)


def test_bad_prompt_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "two_hop": "x", "bridge": "y", "answer": "z"}\n{"id": "b", "two_hop": "x"}\n')
    assert _lens(bad, tmp_path / "out") == 2
    assert f"{bad}:2: field 'bridge': required field is missing" in capsys.readouterr().err
    assert _lens(tmp_path / "missing.jsonl", tmp_path / "out") == 2
    assert "file not found" in capsys.readouterr().err
