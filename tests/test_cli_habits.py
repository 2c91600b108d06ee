"""CLI habits (issue 15): default outputs land in the git-ignored runs/, never over the checked-in reports/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bridgeprobe.probes.cli import build_parser, main
from bridgeprobe.probes.cli.common import default_out
from bridgeprobe.prompts.schema import PromptItem

REPO = Path(__file__).resolve().parents[1]


def tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama saved as a checkpoint directory with a character-level tokenizer (every printable
    ASCII character one token, a space and a capital letter one token)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    capitals = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {chr(i): i for i in range(32, 128)} | {" " + c: i for i, c in enumerate(capitals)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", c) for c in capitals]))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(path)
    return path


def prompt_items(per_composition: int = 4) -> list[PromptItem]:
    """Items of three compositions, listed one composition after the other, each item paired with its neighbour."""
    items = []
    for r1, r2, text in (("born_in", "capital", "The capital of the land where {} was born is"),
                         ("works_in", "mayor", "The mayor of the town where {} works is"),
                         ("lives_in", "river", "The river of the town where {} lives is")):
        for k in range(per_composition):
            partner = k + 1 if k % 2 == 0 else k - 1
            items.append(PromptItem(f"{r1}-{k}", text.format(f"Person {chr(65 + k)}"), f"{chr(70 + k)}land",
                                    f"{chr(75 + k)}ville", r1=r1, r2=r2, pair=f"{r1}-{partner}"))
    return items


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in prompt_items()))
    return path


def test_default_outputs_are_under_runs_and_runs_is_ignored() -> None:
    assert default_out("smollm2-135m") == Path("runs/smollm2-135m")
    assert default_out("/models/Llama-3.1-8B/") == Path("runs/Llama-3.1-8B")
    assert default_out("weights/model.gguf") == Path("runs/model")
    parser = build_parser()
    for command in ("reproduce", "finetune"):
        out = parser.parse_args([command]).out
        assert out.parts[0] == "runs", (command, out)
    assert "/runs/" in (REPO / ".gitignore").read_text().split()  # the top-level runs/, not probes/runs/


def test_main_job_without_out_writes_under_runs_of_the_working_directory(tmp_path: Path, prompt_file: Path,
                                                                          monkeypatch, one_thread) -> None:
    model = tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["run", "--model", str(model), "--prompts", str(prompt_file), "--patch-pairs", "0",
                 "--memory-items", "0", "--limit", "6"]) == 0
    out = work / "runs" / "tiny"
    assert (out / "lens.csv").is_file() and (out / "index.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing else, and no reports/ directory
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["sample"] == "stratified" and settings["limit"] == 6 and settings["n_items"] == 6
    ids = set(pd.read_csv(out / "lens.csv")["prompt_id"])
    assert {i.split("-")[0] for i in ids} == {"born_in", "works_in", "lives_in"}  # the first 6 are 2 compositions
    assert all(f"{i.rsplit('-', 1)[0]}-{int(i.rsplit('-', 1)[1]) ^ 1}" in ids for i in ids)  # partners kept


def _summary(capsys) -> list[str]:
    """The lines a command printed last (progress bars go to stderr)."""
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_every_command_ends_with_a_short_summary_of_figures_and_files(tmp_path: Path, prompt_file: Path, capsys,
                                                                       one_thread) -> None:
    model = str(tiny_model_dir(tmp_path / "tiny"))
    lens, run, patch = tmp_path / "lens", tmp_path / "run", tmp_path / "patch"
    assert main(["lens", "--model", model, "--prompts", str(prompt_file), "--out", str(lens)]) == 0
    lines = _summary(capsys)
    assert 4 <= len(lines) <= 6 and lines[-1] == f"Files in {lens}/: lens.csv, run.json"
    assert lines[0].startswith("Finding: Through the logit lens the bridge entity is in the top 10")
    assert "12 two-hop prompts, 2 layers. Two-hop accuracy" in lines[1] and "(n=12)" in lines[1]
    assert "Bridge in the top 10 at some layer:" in lines[2] and "matched control" in lines[2]
    assert json.loads((lens / "run.json").read_text())["summary"] == "\n".join(lines)  # what a rerun prints

    assert main(["run", "--model", model, "--prompts", str(prompt_file), "--out", str(run), "--patch-pairs", "4",
                 "--memory-items", "4", "--memory-map-items", "2", "--memory-stride", "1"]) == 0
    lines = _summary(capsys)
    assert 4 <= len(lines) <= 6, lines
    assert lines[3].startswith("Attribution patching: 4 pairs") and lines[4].startswith("Shared memory: ")
    assert lines[-1].startswith(f"Files in {run}/: index.html, summary.json, lens.csv")
    assert main(["report", str(run)]) == 0
    assert _summary(capsys) == lines  # rebuilt from the files: the same figures

    assert main(["patch", "--model", model, "--prompts", str(prompt_file), "--out", str(patch), "--limit", "3"]) == 0
    lines = _summary(capsys)
    assert 3 <= len(lines) <= 5 and "exact patching (denoise) of resid_pre: 3 pairs, " in lines[0]
    assert lines[-1].startswith("Sweeps ") and f"Files in {patch}/: patching.csv" in lines[-1]


def test_synth_and_reproduce_summaries(tmp_path: Path, capsys, one_thread) -> None:
    synth = tmp_path / "synth"
    assert main(["synth", "--subjects", "8", "--bridges", "3", "--objects", "4", "--r1", "2", "--r2", "2",
                 "--out", str(synth)]) == 0
    lines = _summary(capsys)
    assert len(lines) == 3 and lines[0].startswith("Synthetic two-hop data, seed 0: one_hop ")
    assert lines[-1] == f"Files in {synth}/: synth.json, examples.csv, prompts.jsonl, train.jsonl"
    grid = tmp_path / "grid"
    assert main(["reproduce", "--preset", "tiny", "--seeds", "0", "--steps", "10", "--out", str(grid)]) == 0
    lines = _summary(capsys)
    results = pd.read_csv(grid / "results.csv").set_index("condition")
    assert lines[0].startswith("Finding: With identity supervision OOD two-hop accuracy is ")
    assert lines[1:3] == [f"{c}: OOD two-hop accuracy {results.loc[c, 'ood_two_hop_acc']:.1%}, ID two-hop "
                         f"{results.loc[c, 'id_two_hop_acc']:.1%}, one-hop {results.loc[c, 'one_hop_acc']:.1%}"
                         for c in ("no_identity", "identity")]
    assert lines[-1].startswith(f"Files in {grid}/: index.html, results.csv")


def test_an_option_needing_a_missing_extra_is_a_one_line_error(tmp_path: Path, prompt_file: Path, capsys,
                                                                 monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # as in the light install
    assert main(["lens", "--model", "no-such-model", "--prompts", str(prompt_file), "--out", str(tmp_path / "o"),
                 "--backend", "transformer-lens"]) == 2
    assert "transformer_lens is not installed; it comes with the optional 'lens' extra: pip install -e '.[lens]'" \
        in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
