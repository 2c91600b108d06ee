"""From-scratch models: tiny CPU runs reduce the loss, a killed run resumes bit-identically with the same data
order, and the alignment and spectrum measures equal independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bridgeprobe.probes.identity.scratch import (TrainConfig, Vocab, alignment, batch_indices, build_model,
                                                 fixed_subsets, load_checkpoint, train, weight_stats)
from bridgeprobe.prompts.synthetic import SynthConfig, generate

TINY_DATA = SynthConfig(n_subjects=12, n_bridges=6, n_objects=6, n_r1=2, n_r2=2, seed=1)


def _config(model: str, **overrides) -> TrainConfig:
    base = dict(model=model, n_layer=2, d_model=32, n_head=2, d_mlp=64, steps=40, eval_every=10,
                checkpoint_every=20, batch_size=16, lr=3e-3, warmup=5)
    return TrainConfig(**{**base, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", ["gpt2", "emb_mlp"])
@pytest.mark.parametrize("identity", [False, True])
def test_tiny_training_run_reduces_loss(model: str, identity: bool) -> None:
    splits = generate(TINY_DATA)
    rows = []
    _, result = train(splits, _config(model), identity=identity, seed=0,
                      on_eval=lambda row, align, weights: rows.append(row))
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    assert rows[-1]["one_hop_loss"] < 0.7 * rows[0]["one_hop_loss"]
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert result.final == rows[-1]
    assert rows[-1]["one_hop_acc"] > rows[0]["one_hop_acc"]  # it learns the trained facts
    config = _config(model)
    for split in ("ood_test", "id_test"):  # accuracies are counts over the evaluated examples, not a made-up number
        n = min(len(splits.examples[split]), config.eval_limit)
        value = result.final[f"{split.removesuffix('_test')}_two_hop_acc"] * n
        assert abs(value - round(value)) < 1e-9


@pytest.mark.parametrize("residual", [True, False])
def test_emb_mlp_equals_its_definition_for_every_example_shape(residual: bool) -> None:
    """Two-hop, one-hop and zero-hop identity examples (one, two, three tokens in one padded batch) against the
    recurrence written out by hand: h0 = E[head], h_t = [h_{t-1} +] MLP(h_{t-1} + E[r_t]), logits U h_last."""
    splits = generate(SynthConfig(**{**TINY_DATA.__dict__, "identity_form": "zero_hop"}))
    assert all(e.tokens() == [e.head] for e in splits.examples["identity"])
    vocab = Vocab(splits)
    examples = [splits.examples["ood_test"][0], splits.examples["one_hop"][0], splits.examples["identity"][0]]
    data = vocab.encode(examples)
    model = build_model(_config("emb_mlp", residual=residual, tie_embeddings=False), len(vocab), seed=0)
    with torch.no_grad():
        logits = model(data.ids, data.lengths)
        for row, example in enumerate(examples):
            h = model.embed.weight[vocab.index[example.head]]
            for relation in example.relations:
                update = model.mlp(h + model.embed.weight[vocab.index[relation]])
                h = h + update if residual else update
            torch.testing.assert_close(logits[row], model.unembed.weight @ h, rtol=1e-5, atol=1e-6)


def test_batches_are_a_function_of_seed_and_step() -> None:
    n, size = 50, 8
    epoch = torch.cat([batch_indices(n, size, seed=3, step=s) for s in range(n // size)])
    assert len(set(epoch.tolist())) == len(epoch) == (n // size) * size  # no repeats within an epoch
    assert torch.equal(batch_indices(n, size, 3, 7), batch_indices(n, size, 3, 7))
    assert not torch.equal(batch_indices(n, size, 3, 0), batch_indices(n, size, 4, 0))
    assert not torch.equal(batch_indices(n, size, 3, 0), batch_indices(n, size, 3, n // size))  # next epoch


def test_evaluation_subsets_are_fixed_by_seed_and_keep_order() -> None:
    sets = {"a": list(range(100)), "b": list(range(100)), "short": [5, 3, 1]}
    first, again, other = (fixed_subsets(sets, 10, seed) for seed in (0, 0, 1))
    assert first == again and first["a"] != other["a"]
    assert first["a"] != first["b"]  # each set draws its own subset
    assert first["short"] == [5, 3, 1]  # sets within the limit are kept whole, in order
    for name in ("a", "b"):
        assert len(first[name]) == 10 and len(set(first[name])) == 10 and first[name] == sorted(first[name])


@pytest.mark.parametrize("model,variant", [("gpt2", {}), ("emb_mlp", {}),
                                           ("emb_mlp", {"residual": False, "tie_embeddings": False})])
def test_killed_run_resumes_bit_identical(model: str, variant: dict, tmp_path: Path) -> None:
    splits = generate(SynthConfig(**{**TINY_DATA.__dict__, "identity_form": "zero_hop"}) if variant else TINY_DATA)
    config = _config(model, weight_decay=0.1, **variant)
    clean_rows, resumed_rows = [], []
    clean, clean_result = train(splits, config, identity=True, seed=2, checkpoint=tmp_path / "clean.pt",
                                on_eval=lambda row, *_: clean_rows.append(row))
    with pytest.raises(KeyboardInterrupt):  # killed at step 27: the last checkpoint is step 20
        train(splits, config, identity=True, seed=2, checkpoint=tmp_path / "run.pt", interrupt_at=27,
              on_eval=lambda row, *_: resumed_rows.append(row))
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 20
    resumed, result = train(splits, config, identity=True, seed=2, checkpoint=tmp_path / "run.pt",
                            on_eval=lambda row, *_: resumed_rows.append(row))
    assert result.resumed_from == 20
    for name, value in clean.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert json.dumps(result.final) == json.dumps(clean_result.final)
    # steps 0..20 before the kill, 30 and 40 after resuming; every row equals the uninterrupted run's
    by_step = {r["step"]: r for r in clean_rows}
    assert [r["step"] for r in resumed_rows] == [0, 10, 20, 30, 40]
    assert all(json.dumps(r) == json.dumps(by_step[r["step"]]) for r in resumed_rows)  # NaN-aware equality
    # a finished run is not retrained; another run's checkpoint is refused
    _, again = train(splits, config, identity=True, seed=2, checkpoint=tmp_path / "run.pt")
    assert json.dumps(again.final) == json.dumps(clean_result.final)
    with pytest.raises(ValueError, match="another run"):
        train(splits, config, identity=False, seed=2, checkpoint=tmp_path / "run.pt")


class _Planted(nn.Module):
    """States planted by hand: position 1 of [e1, r1] holds its bridge's vector plus noise; position 0 holds each
    token's own vector; two "layers", the second one with the bridges permuted (misaligned)."""

    def __init__(self, vocab: Vocab, splits, noise: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.randn(len(vocab), 16)
        self.hop1 = {vocab.index[e1]: {vocab.index[r]: vocab.index[b] for (s, r), b in splits.hop1.items() if s == e1}
                     for e1 in splits.subjects}
        self.noise = noise
        bridges = [vocab.index[b] for b in splits.bridges]
        self.shuffle = dict(zip(bridges, bridges[1:] + bridges[:1]))

    def states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        first = self.table[ids]
        second = first.clone()
        for n, row in enumerate(ids.tolist()):
            if row[0] in self.hop1 and row[1] in self.hop1[row[0]]:
                bridge = self.hop1[row[0]][row[1]]
                first[n, 1] = self.table[bridge] + self.noise * torch.randn(16)
                second[n, 1] = self.table[self.shuffle[bridge]]
        return torch.stack([first, second])


def test_alignment_measure_on_planted_states() -> None:
    splits = generate(TINY_DATA)
    vocab = Vocab(splits)
    rows = {(r["query_layer"], r["bridge_layer"]): r for r in alignment(_Planted(vocab, splits, 0.1), splits, vocab)}
    assert rows[(0, 0)]["top1"] == 1.0 and rows[(0, 0)]["cos_bridge"] > 0.9 > rows[(0, 0)]["cos_other"] + 0.5
    assert rows[(1, 0)]["top1"] == 0.0  # every query sits on another bridge
    # cos_bridge is the mean centred cosine with the right bridge: recompute it naively for layer (0, 0)
    model = _Planted(vocab, splits, 0.0)
    facts = [e for e in splits.examples["one_hop"] if e.task == "hop1"]
    queries = torch.stack([model.table[vocab.index[f.target]] for f in facts])
    bridges = torch.stack([model.table[vocab.index[b]] for b in splits.bridges])
    q, b = queries - queries.mean(0), bridges - bridges.mean(0)
    naive = sum(float(torch.cosine_similarity(q[i], b[splits.bridges.index(f.target)], dim=0))
                for i, f in enumerate(facts)) / len(facts)
    measured = alignment(model, splits, vocab)[0]["cos_bridge"]
    assert measured == pytest.approx(naive, abs=1e-5)


def test_weight_stats_match_direct_norms() -> None:
    splits = generate(TINY_DATA)
    model = build_model(_config("gpt2", tie_embeddings=False), len(Vocab(splits)), seed=0)
    stats, spectra = weight_stats(model)
    names = {s["weight"] for s in stats}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.mlp.c_fc.weight"} <= names
    weight = model.gpt.transformer.h[1].attn.c_proj.weight.detach()
    row = next(s for s in stats if s["weight"] == "transformer.h.1.attn.c_proj.weight")
    assert row["nuclear_norm"] == pytest.approx(float(torch.linalg.matrix_norm(weight, "nuc")), rel=1e-5)
    assert row["frobenius_norm"] == pytest.approx(float(weight.norm()), rel=1e-5)
    sv = [s["singular_value"] for s in spectra if s["weight"] == row["weight"]]
    assert sv == sorted(sv, reverse=True) and len(sv) == min(weight.shape)
    identity = nn.Linear(8, 8, bias=False)
    identity.weight.data = torch.eye(8)
    assert weight_stats(identity)[0][0]["effective_rank"] == pytest.approx(8.0)


def test_gpt2_is_built_from_config_with_scaled_init() -> None:
    splits = generate(TINY_DATA)
    small = build_model(_config("gpt2", init_scale=0.1), len(Vocab(splits)), seed=0)
    default = build_model(_config("gpt2"), len(Vocab(splits)), seed=0)
    ratio = small.gpt.transformer.wte.weight.detach().std() / default.gpt.transformer.wte.weight.detach().std()
    assert float(ratio) == pytest.approx(0.1, rel=0.05)
    assert small.gpt.config.resid_pdrop == 0.0 and small.gpt.lm_head.weight is small.gpt.transformer.wte.weight
    ids = torch.tensor([[0, 3, 5], [1, 4, len(Vocab(splits)) - 1]])
    lengths = torch.tensor([3, 2])
    full = small.gpt(input_ids=ids).logits
    assert torch.equal(small(ids, lengths), torch.stack([full[0, 2], full[1, 1]]))


def test_reproduce_command_writes_outputs_and_resumes_after_a_kill(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    import bridgeprobe.probes.identity.scratch
    from bridgeprobe.probes.cli import main

    args = ["reproduce", "--preset", "tiny", "--seeds", "0", "--steps", "20", "--checkpoint-every", "10"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    clean = tmp_path / "clean"
    for name in ("metrics.csv", "alignment.csv", "weights.csv", "spectrum.csv", "results.csv", "comparison.md",
                 "learning_curves.png", "alignment.png", "spectrum.png", "index.html", "data/seed0/examples.csv"):
        assert (clean / name).stat().st_size > 0, name
    assert not (clean / "checkpoints").exists()
    run = json.loads((clean / "run.json").read_text())
    assert len(run["results"]) == 2 and {r["condition"] for r in run["results"]} == {"identity", "no_identity"}
    assert all({"condition", "seed", "ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc"} <= set(r)
               for r in run["results"])
    metrics = pd.read_csv(clean / "metrics.csv")
    assert len(metrics) == 2 * 3 and set(metrics["step"]) == {0, 10, 20}
    # identity-grid collects finished runs: one cell here, its means those of results.csv
    assert main(["identity-grid", str(tmp_path), "--out", str(tmp_path / "grid")]) == 0
    grid, results = pd.read_csv(tmp_path / "grid" / "grid.csv"), pd.read_csv(clean / "results.csv")
    assert len(grid) == 1 and grid.loc[0, "ood"] == "bridge" and grid.loc[0, "model"] == "gpt2"
    for condition in ("identity", "no_identity"):
        expected = results.loc[results["condition"] == condition, "ood_two_hop_acc"].mean()
        assert grid.loc[0, f"ood_two_hop_acc {condition} mean"] == pytest.approx(expected)
    assert "| seeds |" in (tmp_path / "grid" / "grid.md").read_text()

    real, calls = bridgeprobe.probes.identity.scratch.train, []

    def killed_in_second_run(*a, **kw):
        calls.append(1)
        return real(*a, **kw, interrupt_at=15 if len(calls) == 2 else None)

    monkeypatch.setattr(bridgeprobe.probes.identity.scratch, "train", killed_in_second_run)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130  # Ctrl-C: one line, exit 130
    monkeypatch.setattr(bridgeprobe.probes.identity.scratch, "train", real)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    for name in ("metrics.csv", "alignment.csv", "weights.csv", "spectrum.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / name), pd.read_csv(clean / name))
    resumed = json.loads((tmp_path / "killed" / "run.json").read_text())["results"]
    assert [r["resumed_from"] for r in resumed] == [20, 10]  # run 1 finished (step 20), run 2 from step 10
    strip = lambda rows: [{k: v for k, v in r.items() if k != "resumed_from"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(run["results"])
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0  # finished: only the report is rebuilt
