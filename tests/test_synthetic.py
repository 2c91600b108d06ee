"""Synthetic two-hop knowledge: splits are disjoint, OOD bridges are never a latent bridge in training (bridge
split) and OOD relation pairs never composed (relation-pair split), examples follow the facts, files round-trip,
and the natural-language rendering is a valid prompt set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import requires_smollm2
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.loaders import load_prompts
from bridgeprobe.prompts.schema import PromptSetError
from bridgeprobe.prompts.synthetic import (SPLITS, SynthConfig, check_splits, generate, load_splits, save_splits,
                                           token_vocab)
from bridgeprobe.prompts.synthetic_text import make_names, render_items, training_texts

class ChunkTokenizer:
    """Words cut into 3-character chunks, each chunk one id (made-up names often share their first chunk)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        chunks = [word[i:i + 3] for word in text.split() for i in range(0, len(word), 3)]
        ids = [self.vocab.setdefault(c, len(self.vocab)) for c in chunks]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


SMALL = SynthConfig(n_subjects=30, n_bridges=10, n_objects=12, n_r1=3, n_r2=4, ood_pair_fraction=0.25, seed=3,
                    ood="relation_pair")


def _composed_in_training(splits) -> set[tuple[str, str]]:
    """Relation pairs that occur composed in any training example of either condition, recomputed from the
    examples themselves (not from the generator's pair lists)."""
    pairs = set()
    for identity in (False, True):
        for example in splits.training(identity):
            if len(example.relations) == 2:
                pairs.add(example.relations)
    return pairs


@pytest.mark.parametrize("seed", range(5))
def test_splits_are_disjoint_and_ood_pairs_never_composed_in_training(seed: int) -> None:
    splits = generate(SynthConfig(n_subjects=40, n_bridges=8, n_objects=9, n_r1=3, n_r2=3, seed=seed,
                                  ood="relation_pair"))
    queries = {name: [(e.head, e.relations) for e in splits.examples[name]]
               for name in ("two_hop_train", "id_test", "ood_test")}
    for name, keys in queries.items():
        assert len(keys) == len(set(keys)), f"{name} repeats a query"
    for a in queries:
        for b in queries:
            if a < b:
                assert not set(queries[a]) & set(queries[b]), (a, b)
    trained = _composed_in_training(splits)
    ood = {e.relations for e in splits.examples["ood_test"]}
    assert ood and not ood & trained
    # ID test queries are unseen, but their relation pairs are composed in training
    assert {e.relations for e in splits.examples["id_test"]} <= trained
    # every relation is still composed in training with some other relation
    assert {a for a, _ in trained} == set(splits.r1) and {b for _, b in trained} == set(splits.r2)
    # all compositions accounted for: every (e1, r1, r2) is in exactly one two-hop split
    total = sum(len(v) for v in queries.values())
    assert total == len(splits.subjects) * len(splits.r1) * len(splits.r2)
    check_splits(splits)


def test_examples_follow_random_functional_facts() -> None:
    splits = generate(SMALL)
    assert len(splits.examples["one_hop"]) == 30 * 3 + 10 * 4
    for example in splits.examples["ood_test"] + splits.examples["id_test"] + splits.examples["two_hop_train"]:
        e1, (r1, r2) = example.head, example.relations
        assert example.bridge == splits.hop1[(e1, r1)]
        assert example.target == splits.hop2[(example.bridge, r2)]
    assert [e.head for e in splits.examples["identity"]] == splits.bridges
    assert all(e.target == e.head for e in splits.examples["identity"])
    assert len(splits.training(True)) == len(splits.training(False)) + len(splits.bridges)
    assert generate(SMALL).examples == splits.examples  # deterministic
    assert generate(SynthConfig(**{**SMALL.__dict__, "seed": 4})).hop1 != splits.hop1


@pytest.mark.parametrize("ood", ["bridge", "relation_pair"])
def test_no_two_hop_training_variant(ood: str) -> None:
    splits = generate(SynthConfig(n_subjects=20, n_bridges=5, n_objects=5, n_r1=2, n_r2=3, two_hop_training=False,
                                  ood=ood))
    assert splits.examples["two_hop_train"] == [] and splits.examples["id_test"] == []
    assert len(splits.examples["ood_test"]) == 20 * 6
    assert _composed_in_training(splits) == set()
    check_splits(splits)


def _latent_bridges_in_training(splits) -> set[str]:
    """Bridges that some trained two-hop query of either condition goes through, recomputed from the facts."""
    return {splits.hop1[(e.head, e.relations[0])] for identity in (False, True)
            for e in splits.training(identity, identity_repeat=3) if len(e.relations) == 2}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction,form", [(0.25, "relation"), (0.5, "relation"), (0.5, "zero_hop")])
def test_bridge_split_never_uses_an_ood_bridge_as_a_latent_bridge(seed: int, fraction: float, form: str) -> None:
    config = SynthConfig(n_subjects=40, n_bridges=8, n_objects=9, n_r1=3, n_r2=3, seed=seed,
                         ood_bridge_fraction=fraction, identity_form=form)
    splits = generate(config)
    assert config.ood == "bridge" and len(splits.ood_bridges) == round(fraction * 8)
    held_out = set(splits.ood_bridges)
    assert not _latent_bridges_in_training(splits) & held_out
    keys = {name: [(e.head, e.relations) for e in splits.examples[name]]
            for name in ("two_hop_train", "id_test", "ood_test")}
    for a in keys:
        assert len(keys[a]) == len(set(keys[a])), f"{a} repeats a query"
        for b in keys:
            if a < b:
                assert not set(keys[a]) & set(keys[b]), (a, b)
    # every query through an OOD bridge is an OOD test query, every other one is trained or ID test
    for e1, r1, r2 in ((e, a, b) for e in splits.subjects for a in splits.r1 for b in splits.r2):
        through_ood = splits.hop1[(e1, r1)] in held_out
        assert ((e1, (r1, r2)) in set(keys["ood_test"])) == through_ood
    # OOD bridges' hop-2 facts are trained as explicit one-hop facts; their identity examples exist
    trained = set(splits.training(False))
    assert all(any(e.task == "hop2" and e.head == b for e in trained) for b in held_out)
    assert held_out <= {e.head for e in splits.examples["identity"]}
    assert all(e.tokens() == ([e.head, "r_id"] if form == "relation" else [e.head]) for e in splits.examples["identity"])
    # the identity form changes only the identity examples
    other = generate(SynthConfig(**{**config.__dict__, "identity_form": "relation"}))
    assert {k: v for k, v in other.examples.items() if k != "identity"} == {
        k: v for k, v in splits.examples.items() if k != "identity"}
    # every relation pair is composed in training (through in-distribution bridges)
    assert _composed_in_training(splits) == {(a, b) for a in splits.r1 for b in splits.r2}
    check_splits(splits)
    splits.examples["two_hop_train"].append(splits.examples["ood_test"][0])
    with pytest.raises(ValueError, match="latent bridge|share"):
        check_splits(splits)


def test_relation_pair_data_is_unchanged_and_old_files_load(tmp_path: Path) -> None:
    """Files written before the bridge split (no ``ood`` in their config) still load, as relation-pair splits."""
    splits = generate(SMALL)
    save_splits(splits, tmp_path)
    meta = json.loads((tmp_path / "synth.json").read_text())
    for key in ("ood", "ood_bridge_fraction"):
        del meta["config"][key]
    (tmp_path / "synth.json").write_text(json.dumps(meta))
    loaded, _ = load_splits(tmp_path)
    assert loaded.config.ood == "relation_pair" and loaded.examples == splits.examples


def test_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="n_bridges"):
        SynthConfig(n_bridges=0)
    with pytest.raises(ValueError, match="ood_pair_fraction"):
        SynthConfig(ood_pair_fraction=1.5)
    with pytest.raises(ValueError, match="too few ID pairs"):
        SynthConfig(n_r1=2, n_r2=2, ood_pair_fraction=0.75, ood="relation_pair")
    with pytest.raises(ValueError, match="ood must be one of"):
        SynthConfig(ood="entity")
    with pytest.raises(ValueError, match="at least one OOD and one in-distribution bridge"):
        SynthConfig(n_bridges=4, ood_bridge_fraction=0.1)


def test_check_splits_catches_a_leak() -> None:
    splits = generate(SMALL)
    splits.examples["two_hop_train"].append(splits.examples["ood_test"][0])
    with pytest.raises(ValueError, match="share|composed in training"):
        check_splits(splits)


def test_files_round_trip_and_tampering_is_reported(tmp_path: Path) -> None:
    splits = generate(SMALL)
    names = make_names(splits, seed=1)
    save_splits(splits, tmp_path, names)
    loaded, loaded_names = load_splits(tmp_path)
    assert loaded.examples == splits.examples and loaded_names == names
    assert json.loads((tmp_path / "synth.json").read_text())["sizes"]["ood_test"] == len(splits.examples["ood_test"])
    lines = (tmp_path / "examples.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",e3_0" if not lines[5].endswith(",e3_0") else lines[5][:-1] + "1"
    (tmp_path / "examples.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptSetError, match=r"examples.csv:6"):
        load_splits(tmp_path)


def test_token_rendering() -> None:
    splits = generate(SMALL)
    vocab = token_vocab(splits)
    assert len(vocab) == len(set(vocab)) == 30 + 10 + 12 + 3 + 4 + 1
    example = splits.examples["ood_test"][0]
    assert example.tokens() == [example.head, *example.relations] and all(t in vocab for t in example.tokens())


def test_natural_language_items_are_a_valid_prompt_set(tmp_path: Path) -> None:
    splits = generate(SMALL)
    tokenizer = ChunkTokenizer()
    names = make_names(splits, seed=0, tokenizer=tokenizer)
    assert len(set(names.values())) == len(names)
    firsts = {target_ids(tokenizer, "Someone was born in", names[b])[0] for b in splits.bridges}
    assert len(firsts) == len(splits.bridges)  # distinct first tokens, as asked
    items = render_items(splits, names, ("id_test", "ood_test"), tokenizer=tokenizer)
    assert len(items) == len(splits.examples["id_test"]) + len(splits.examples["ood_test"])
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(item.to_dict()) + "\n" for item in items))
    loaded = load_prompts(path)  # the schema's own validation, pairs included
    assert loaded == items
    by_id = {item.id: item for item in loaded}
    for item in loaded:
        assert item.e1 in item.two_hop and item.e1 in item.hop1 and item.bridge in item.hop2
        if item.pair:
            partner = by_id[item.pair]
            assert partner.composition == item.composition and partner.bridge != item.bridge
            assert len(tokenizer(partner.two_hop)["input_ids"]) == len(tokenizer(item.two_hop)["input_ids"])
    texts = training_texts(splits, splits.examples["identity"], names)
    assert all(target in prompt for prompt, target in texts)


def test_split_names_cover_every_split() -> None:
    assert set(generate(SMALL).examples) == set(SPLITS)


def test_synth_command_writes_checked_files(tmp_path: Path) -> None:
    from bridgeprobe.probes.cli import main

    out = tmp_path / "synth"
    assert main(["synth", "--subjects", "12", "--bridges", "4", "--objects", "5", "--r1", "2", "--r2", "3",
                 "--seed", "2", "--out", str(out)]) == 0
    splits, names = load_splits(out)
    assert splits.config == SynthConfig(n_subjects=12, n_bridges=4, n_objects=5, n_r1=2, n_r2=3, seed=2)
    items = load_prompts(out / "prompts.jsonl")
    assert len(items) == len(splits.examples["id_test"]) + len(splits.examples["ood_test"])
    assert {i.answer for i in items} <= {names[o] for o in splits.objects}
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(splits.examples[s]) for s in ("one_hop", "two_hop_train", "identity"))
    assert {line["split"] for line in lines} == {"one_hop", "two_hop_train", "identity"}


@pytest.mark.slow
@requires_smollm2
def test_lens_runs_on_a_synthetic_prompt_set(tmp_path: Path) -> None:
    import pandas as pd

    from bridgeprobe.probes.cli import main

    out = tmp_path / "synth"
    assert main(["synth", "--subjects", "6", "--bridges", "3", "--objects", "4", "--r1", "2", "--r2", "2",
                 "--tokenizer-model", "smollm2-135m", "--out", str(out)]) == 0
    assert main(["lens", "--model", "smollm2-135m", "--prompts", str(out / "prompts.jsonl"), "--limit", "2",
                 "--out", str(tmp_path / "lens")]) == 0
    frame = pd.read_csv(tmp_path / "lens" / "lens.csv")
    assert set(frame["prompt_kind"]) == {"two_hop", "hop1", "hop2"} and frame["layer"].max() == 29
