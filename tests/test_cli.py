"""The bridgeprobe command end to end on the real SmolLM2-135M: outputs, resume after interruption, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import bridgeprobe.probes.runs.pipeline
from conftest import plain_hf_patched_run, requires_smollm2
from bridgeprobe.probes.cli import main
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.schema import PromptItem

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
    assert len(frame) == (2 * 5 + 3) * 30  # queries (two-hop prompts: bridge, answer, control) x layers
    # the matched control: another bridge of the set, scored like the bridge (same rows, its own token)
    control = frame[frame.target == "control"].groupby("prompt_id")["token_id"].first().to_dict()
    bridge = frame[(frame.target == "bridge") & (frame.prompt_kind == "two_hop")].groupby("prompt_id")["token_id"]
    assert control == {"fuji": bridge.first()["hamlet"], "colosseum": bridge.first()["fuji"],
                       "hamlet": bridge.first()["colosseum"]}
    # every row's target_flags as the lens computes them for these items with the model's tokenizer
    from bridgeprobe.probes.readouts.lens import lens_queries
    from bridgeprobe.probes.model.load import load_model
    from bridgeprobe.prompts.loaders import load_prompts

    expected = {q.key: q.flags for q in lens_queries(load_prompts([prompt_file]), load_model("smollm2-135m")[1])}
    written = frame.groupby(["prompt_id", "prompt_kind", "target"])["target_flags"].first().fillna("").to_dict()
    assert written == expected  # (flag by flag against direct counts: tests/test_targets.py)
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
    real = bridgeprobe.probes.runs.pipeline.lens_batch
    calls = []

    def dying(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", dying)
    assert _lens(prompt_file, tmp_path / "resumed") == 130  # Ctrl-C: one line, exit 130
    assert (tmp_path / "resumed" / "lens.partial.csv").exists() and not (tmp_path / "resumed" / "lens.csv").exists()
    monkeypatch.setattr(bridgeprobe.probes.runs.pipeline, "lens_batch", real)
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


def _naive_resid_pre_patch(model, clean_ids: list[int], corrupt_ids: list[int], layer: int, position: int,
                           answers: tuple[int, int]) -> float:
    logits = plain_hf_patched_run(model, clean_ids, corrupt_ids, layer, position).logits[0, -1]
    return float(logits[answers[0]] - logits[answers[1]])


def test_patch_on_an_unseen_pair_equals_an_independent_naive_loop(tmp_path: Path, smollm2) -> None:
    import random

    model, tokenizer = smollm2
    rng = random.Random()
    places = [("the Alhambra", "Spain", "Madrid"), ("Table Mountain", "South Africa", "Pretoria"),
              ("the Atomium", "Belgium", "Brussels"), ("Angkor Wat", "Cambodia", "Phnom Penh"),
              ("the Matterhorn", "Switzerland", "Bern"), ("Uluru", "Australia", "Canberra"),
              ("the Acropolis", "Greece", "Athens"), ("Machu Picchu", "Peru", "Lima")]
    text = "The capital of the country where {} is located is"
    length = lambda p: len(tokenizer(text.format(p[0]))["input_ids"])  # noqa: E731
    first = lambda p, k: target_ids(tokenizer, text.format(p[0]), p[k])[0]  # noqa: E731 (k: 1 bridge, 2 answer)
    candidates = [(a, b) for a in places for b in places
                  if a != b and length(a) == length(b) and first(a, 2) != first(b, 2)]
    clean, corrupt = rng.choice(candidates)
    items = [PromptItem("c", text.format(clean[0]), clean[1], clean[2], pair="k"),
             PromptItem("k", text.format(corrupt[0]), corrupt[1], corrupt[2], pair="c")]
    path = tmp_path / "pair.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in items))
    assert main(["patch", "--model", "smollm2-135m", "--prompts", str(path), "--out", str(tmp_path / "out"),
                 "--limit", "1", "--sample", "first", "--bridge-rank"]) == 0  # the pair (c, k)
    frame = pd.read_csv(tmp_path / "out" / "patching.csv")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(frame) == 30 * length(clean) and run["timings"]["sweep_s"] > 0
    for _, row in frame.sample(12, random_state=rng.randrange(1000)).iterrows():
        expected = _naive_resid_pre_patch(model, tokenizer(items[0].two_hop)["input_ids"],
                                          tokenizer(items[1].two_hop)["input_ids"], int(row.layer),
                                          int(row.position), (first(clean, 2), first(corrupt, 2)))
        assert row.metric == pytest.approx(expected, abs=1e-4), row
        assert row.value == pytest.approx((expected - row.corrupt_metric) / (row.clean_metric - row.corrupt_metric),
                                          abs=1e-4)
    bridge = pd.read_csv(tmp_path / "out" / "patching_bridge.csv")
    assert len(bridge) == sum(30 - layer for layer in range(30)) * length(clean)
    bridge_token = first(clean, 1)
    for _, row in frame.sample(3, random_state=rng.randrange(1000)).iterrows():
        layer, position = int(row.layer), int(row.position)
        out = plain_hf_patched_run(model, tokenizer(items[0].two_hop)["input_ids"],
                                   tokenizer(items[1].two_hop)["input_ids"], layer, position, output_hidden_states=True)
        cell = bridge[(bridge.layer == layer) & (bridge.position == position)].sort_values("readout_layer")
        assert cell["readout_layer"].tolist() == list(range(layer, 30))
        for k, rank in zip(cell["readout_layer"], cell["bridge_rank"]):
            with torch.no_grad():
                logits = model.lm_head(model.model.norm(out.hidden_states[k + 1][0, -1])) if k < 29 else out.logits[0, -1]
            target = logits[bridge_token]
            # ranks may differ only by tokens whose logits lie within 1e-4 of the bridge's
            assert int((logits > target + 1e-4).sum()) <= rank <= int((logits > target - 1e-4).sum()), (layer, k)
    for name in ("patching_cells.csv", "patching_layers.csv", "patching_resid_pre.png", "patching_layers.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_patch_rejects_unequal_pairs_clearly(tmp_path: Path, capsys) -> None:
    items = [PromptItem("a", "The capital of France is", "France", "Paris", pair="b"),
             PromptItem("b", "The capital of the United Kingdom is", "United Kingdom", "London", pair="a")]
    path = tmp_path / "pair.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in items))
    assert main(["patch", "--model", "smollm2-135m", "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "pair a / b: clean and corrupted prompts must have the same number of tokens" in capsys.readouterr().err


def test_run_report_has_the_attribution_section(tmp_path: Path) -> None:
    text = "The capital of the country where {} is located is"
    items = [PromptItem("eiffel", text.format("the Eiffel Tower"), "France", "Paris", pair="colosseum",
                        hop1="The Eiffel Tower is located in the country of", hop2="The capital of France is"),
             PromptItem("colosseum", text.format("the Colosseum"), "Italy", "Rome", pair="eiffel",
                        hop1="The Colosseum is located in the country of", hop2="The capital of Italy is")]
    path = tmp_path / "pair.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in items))
    assert main(["run", "--prompts", str(path), "--out", str(tmp_path / "r"), "--patch-pairs", "2"]) == 0
    layers = pd.read_csv(tmp_path / "r" / "attribution_layers.csv")
    assert set(layers["site"]) == {"resid_pre", "attn_out", "mlp_out"} and len(layers) == 3 * 30
    assert (layers["n_last"] == 2).all()
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Per-layer attribution" in page
    assert json.loads((tmp_path / "r" / "run.json").read_text())["attribution"]["n_pairs"] == 2
