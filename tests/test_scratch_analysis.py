"""Identity coverage (the dose) and the analyses of trained from-scratch models: the coverage draw, per-item OOD
answers equal to the training run's own evaluation, Sec. 4.1's cross-prompt patch equal to a forward written out
block by block, the seed-level tables equal to scipy, and the command's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from bridgeprobe.analyses.scratch_report import coverage_table, patch_table
from bridgeprobe.probes.cli import main
from bridgeprobe.probes.identity.scratch_analysis import TrainedRun, cross_patch, ood_items, trained_runs
from bridgeprobe.prompts.synthetic import SynthConfig, check_splits, generate, load_splits, save_splits

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = dict(n_subjects=40, n_bridges=10, n_objects=10, n_r1=2, n_r2=2)


@pytest.mark.parametrize("ood", ["bridge", "relation_pair"])
def test_coverage_draws_a_stratified_share_and_leaves_the_rest_of_the_data_alone(ood: str, tmp_path: Path) -> None:
    full = generate(SynthConfig(**DATA, ood=ood, seed=3))
    half = generate(SynthConfig(**DATA, ood=ood, seed=3, identity_coverage=0.5))
    check_splits(half)
    for split in ("one_hop", "two_hop_train", "id_test", "ood_test"):
        assert half.examples[split] == full.examples[split]
    covered = {e.head for e in half.examples["identity"]}
    assert len(covered) == 5 and covered < set(full.bridges)
    if ood == "bridge":  # OOD and ID bridges covered in nearly the same proportion (5 of each: 2 and 3)
        assert len(covered & set(half.ood_bridges)) in (2, 3)
    assert {e.head for e in generate(SynthConfig(**DATA, ood=ood, seed=3, identity_coverage=0.0))
            .examples["identity"]} == set()
    # coverage 1 is recorded as before the field existed; a partial one is recorded and read back
    assert "identity_coverage" not in full.summary()["config"]
    assert half.summary()["config"]["identity_coverage"] == 0.5
    save_splits(half, tmp_path)
    assert load_splits(tmp_path)[0].examples["identity"] == half.examples["identity"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scratch") / "run"
    assert main(["reproduce", "--preset", "tiny", "--seeds", "0", "1", "--steps", "60", "--eval-every", "20",
                 "--checkpoint-every", "20", "--identity-coverage", "0.5", "--keep-checkpoints",
                 "--out", str(out)]) == 0
    return out


def test_item_answers_equal_the_training_runs_own_ood_accuracy(tiny_run: Path) -> None:
    results = pd.read_csv(tiny_run / "results.csv")
    runs = list(trained_runs(tiny_run))
    assert len(runs) == len(results) == 4
    for run in runs:
        items = ood_items(run)
        expected = results[(results["condition"] == run.keys["condition"]) & (results["seed"] == run.keys["seed"])]
        assert items["correct"].mean() == pytest.approx(float(expected["ood_two_hop_acc"].iloc[0]))
        covered = {e.head for e in run.splits.examples["identity"]}
        assert items["covered"].tolist() == [b in covered for b in items["bridge"]]


def _by_hand(run: TrainedRun, source: list[int], receiver: list[int], s: int, t: int) -> torch.Tensor:
    """The patched answer at position 1, with GPT-2's blocks run one by one (no hooks)."""
    gpt = run.model.gpt.transformer
    positions = torch.arange(2)

    def blocks(h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for block in gpt.h[first:last]:
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
        return h

    with torch.no_grad():
        h = gpt.wte(torch.tensor([source])) + gpt.wpe(positions)
        state = blocks(h, 0, s)[0, 1]
        h = blocks(gpt.wte(torch.tensor([receiver])) + gpt.wpe(positions), 0, t)
        h = h.clone()
        h[0, 0] = state
        h = gpt.ln_f(blocks(h, t, len(gpt.h)))
        return run.model.gpt.lm_head(h)[0, 1].argmax()


def test_cross_patch_equals_the_forward_written_out(tiny_run: Path, monkeypatch) -> None:
    import bridgeprobe.probes.identity.scratch_analysis as analysis

    run = next(r for r in trained_runs(tiny_run) if r.keys["condition"] == "identity")
    # every query counted: compare with all of them (the fact filter is checked below)
    table = cross_patch(run, limit=1000, seed=0)
    splits, vocab = run.splits, run.vocab
    queries = analysis.fixed_subsets({"ood_test": splits.examples["ood_test"]}, 1000, 0)["ood_test"]
    receivers = analysis._receivers(splits, queries, 0)
    hop = lambda head, rels: analysis._answers(run.model, vocab, [analysis.Example("hop1", head, rels, head)])[0]  # noqa: E731
    known = [(q, r) for q, r in zip(queries, receivers) if r
             and vocab.tokens[hop(q.head, q.relations[:1])] == q.bridge
             and vocab.tokens[hop(r, q.relations[1:])] == splits.hop2[(r, q.relations[1])]
             and vocab.tokens[hop(q.bridge, q.relations[1:])] == q.target]
    assert known, "the tiny model knows no fact triple; train it longer"
    for (s, t), row in table[table["split"] == "ood_test"].set_index(["source_layer", "target_layer"]).iterrows():
        answers = [vocab.tokens[int(_by_hand(run, [vocab.index[q.head], vocab.index[q.relations[0]]],
                                             [vocab.index[r], vocab.index[q.relations[1]]], s, t))] for q, r in known]
        assert row["items"] == len(known)
        assert row["transfer"] == pytest.approx(np.mean([a == q.target for a, (q, _) in zip(answers, known)]))
        assert row["own"] == pytest.approx(np.mean([a == splits.hop2[(r, q.relations[1])]
                                                    for a, (q, r) in zip(answers, known)]))
    assert sorted(set(table["source_layer"])) == [0, 1, 2] and sorted(set(table["target_layer"])) == [0, 1]


def test_seed_level_tables_equal_scipy() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(5):
        for condition, lift in (("no_identity", 0.0), ("identity", 0.3)):
            for n in range(40):
                covered = n % 2 == 0
                rows.append({"cell": "c", "identity_coverage": 0.5, "condition": condition, "seed": seed,
                             "covered": covered, "correct": bool(rng.random() < 0.3 + lift * covered)})
    items = pd.DataFrame(rows)
    table = coverage_table(items).set_index("condition")
    for condition in ("identity", "no_identity"):
        part = items[items["condition"] == condition]
        per_seed = part.groupby(["seed", "covered"])["correct"].mean().unstack()
        diff = (per_seed[True] - per_seed[False]).to_numpy()
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        assert table.loc[condition, "contrast"] == pytest.approx(diff.mean())
        assert (table.loc[condition, "contrast ci_low"], table.loc[condition, "contrast ci_high"]) == \
            pytest.approx((low, high))
        assert table.loc[condition, "ood acc"] == pytest.approx(part.groupby("seed")["correct"].mean().mean())
    per = items.groupby(["condition", "seed", "covered"])["correct"].mean().unstack()
    contrast = per[True] - per[False]
    did = (contrast["identity"] - contrast["no_identity"]).to_numpy()
    assert table.loc["identity", "did"] == pytest.approx(did.mean())
    assert table.loc["identity", "did ci_low"] == pytest.approx(
        stats.t.interval(0.95, len(did) - 1, loc=did.mean(), scale=stats.sem(did))[0])
    assert pd.isna(table.loc["no_identity"].get("did"))  # the placebo has no placebo
    patch = pd.DataFrame([{"cell": "c", "condition": c, "seed": s, "split": "ood_test", "source_layer": 2,
                           "target_layer": 0, "items": 10, "transfer": 0.1 * s + (0.2 if c == "identity" else 0),
                           "own": 0.5} for s in range(4) for c in ("no_identity", "identity")])
    row = patch_table(patch).iloc[0]
    assert row["transfer delta"] == pytest.approx(0.2) and row["transfer delta seeds above 0"] == "4/4"
    assert row["transfer delta signflip p"] == pytest.approx(2 / 16)  # all four positive: 2 of 16 sign patterns


def test_command_writes_tables_and_refuses_runs_without_checkpoints(tiny_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["scratch-analysis", str(tiny_run), "--items", "50", "--out", str(tmp_path / "a")]) == 0
    for name in ("analysis.md", "ood_items.csv", "crosspatch.csv", "coverage.csv", "crosspatch_summary.csv"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    items = pd.read_csv(tmp_path / "a" / "ood_items.csv")
    assert set(items["identity_coverage"]) == {0.5} and len(items.groupby(["condition", "seed"])) == 4
    assert "covered bridges minus uncovered" in capsys.readouterr().out
    bare = tmp_path / "bare"
    assert main(["reproduce", "--preset", "tiny", "--seeds", "0", "--steps", "20", "--out", str(bare)]) == 0
    capsys.readouterr()
    assert main(["scratch-analysis", str(bare), "--out", str(tmp_path / "b")]) == 2
    assert "--keep-checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_run_recorded_before_coverage_existed_still_resumes(tmp_path: Path) -> None:
    """A reproduce run.json without identity_coverage (older runs) has the same fingerprint and settings."""
    out = tmp_path / "run"
    args = ["reproduce", "--preset", "tiny", "--seeds", "0", "--steps", "20", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert "identity_coverage" not in record["settings"]["data"]
    assert "identity_coverage" not in record["fingerprint"]["options"]
    assert main(args) == 0  # the same settings: a finished run, its report rebuilt
