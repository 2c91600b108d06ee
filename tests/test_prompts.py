"""Prompt sets: the bundled curated set, validation errors that name file/line/field, CSV column mappings."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import requires_gemma3, requires_smollm2
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.loaders import load_prompts, parse_columns
from bridgeprobe.prompts.schema import PromptSetError

HOPPING = Path(__file__).resolve().parents[2] / "shared" / "data" / "hopping_too_late"


def _write(tmp_path: Path, lines: list[str], name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"id": "a", "two_hop": "The capital of the country where the Eiffel Tower is is", "bridge": "France",
        "answer": "Paris", "e1": "the Eiffel Tower"}


def test_curated_set_shape() -> None:
    items = load_prompts("curated")
    compositions = Counter(item.composition for item in items)
    assert len(items) >= 300
    assert len(compositions) >= 10 and min(compositions.values()) >= 20
    by_id = {item.id: item for item in items}
    for item in items:
        assert item.hop1 and item.hop2 and item.e1 and item.pair
        partner = by_id[item.pair]
        assert partner.pair == item.id and partner.composition == item.composition
        assert partner.bridge != item.bridge and partner.answer != item.answer


def _tokenizer(alias: str):
    from transformers import AutoTokenizer

    from bridgeprobe.probes.model.load import EMBEDDED, convert_gguf

    return AutoTokenizer.from_pretrained(convert_gguf(EMBEDDED[alias].locate()))


@pytest.mark.slow
@pytest.mark.parametrize("alias", [pytest.param("smollm2-135m", marks=requires_smollm2),
                                   pytest.param("gemma3-270m", marks=requires_gemma3)])
def test_curated_pairs_tokenize_to_equal_length(alias: str) -> None:
    tokenizer = _tokenizer(alias)
    items = {item.id: item for item in load_prompts("curated")}
    for item in items.values():
        partner = items[item.pair]
        assert len(tokenizer(item.two_hop)["input_ids"]) == len(tokenizer(partner.two_hop)["input_ids"]), item.id
        first = lambda i: target_ids(tokenizer, i.two_hop, i.answer)[0]  # noqa: E731
        assert first(item) != first(partner), item.id


@pytest.mark.parametrize(("line", "field", "message"), [
    ('{"id": "a", "two_hop": "x", "bridge": "y"}', "answer", "required field is missing"),
    ('{"id": "a", "two_hop": "x", "bridge": "y", "answer": 3}', "answer", "must be a string"),
    ('{"id": "a", "two_hop": "x ", "bridge": "y", "answer": "z"}', "two_hop", "without trailing space"),
    ('{"id": "a", "two_hop": "x", "bridge": "y", "answer": "z", "colour": "red"}', "colour", "unknown field"),
    ('{"id": "a", "two_hop": "x", "bridge": "y", "answer": "z", "e1": "q"}', "e1", "does not occur"),
    ('{"id": "a", "two_hop": "x", "bridge": "y", "answer": "z", "pair": "b"}', "pair", "not the id"),
])
def test_bad_records_name_file_line_and_field(tmp_path: Path, line: str, field: str, message: str) -> None:
    path = _write(tmp_path, [json.dumps(GOOD | {"id": "first"}), line])
    with pytest.raises(PromptSetError, match=message) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:2: field '{field}'")


def test_invalid_json_and_duplicate_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps(GOOD), "{not json"])
    with pytest.raises(PromptSetError, match=rf"{path}:2: not valid JSON"):
        load_prompts(path)
    path = _write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)])
    with pytest.raises(PromptSetError, match=rf"{path}:3: field 'id': duplicate id 'a' \(first at {path}:1\)"):
        load_prompts(path)


def test_csv_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ext.csv"
    path.write_text("qid,query,mid,end,rel\n7,Where is X,Y,Z,capital\n8,Where is W,V,U,capital\n")
    columns = parse_columns(["id=q{qid}", "two_hop=query", "bridge=mid", "answer=end", "hop2=The {rel} of {mid} is"])
    items = load_prompts(path, columns=columns)
    assert [i.id for i in items] == ["q7", "q8"]
    assert items[1].hop2 == "The capital of V is" and items[1].answer == "U"
    with pytest.raises(PromptSetError, match=rf"{path}:2: field 'bridge': mapping 'nope' needs column 'nope'"):
        load_prompts(path, columns={**columns, "bridge": "nope"})
    with pytest.raises(PromptSetError, match="CSV files need a column mapping"):
        load_prompts(path)


@pytest.mark.skipif(not HOPPING.is_dir(), reason="shared hopping_too_late data is not beside the checkout")
def test_hopping_too_late_preset() -> None:
    items = load_prompts(sorted(HOPPING.glob("raw_llama3-8b_*.csv")), preset="hopping_too_late")
    assert len(items) == 750
    first = items[0]
    assert first.two_hop.endswith(" is") and first.hop1.endswith(" is") and first.bridge in first.hop2


def test_memory_control_sets_put_the_bridge_or_another_bridge_in_place_of_e1(tmp_path: Path) -> None:
    """present: e1 becomes the item's own bridge, so the state at e1 *is* the bridge written out; absent: another
    bridge of the same first relation, never the item's or its partner's; everything else (ids, pairs, hop
    prompts, answers) unchanged; the command writes both as loadable sets, the same for the same seed."""
    from bridgeprobe.probes.cli import main
    from bridgeprobe.prompts.controls import control_items

    items = load_prompts("curated")
    by_id = {i.id: i for i in items}
    present, absent = control_items(items, "present"), control_items(items, "absent", seed=3)
    assert len(present) == len(absent) == len(items)
    bridges_of = {}
    for item in items:
        bridges_of.setdefault(item.r1, set()).add(item.bridge)
    for new in present:
        old = by_id[new.id]
        assert new.e1 == old.bridge and new.two_hop == old.two_hop.replace(old.e1, old.bridge)
        assert (new.hop1, new.hop2, new.answer, new.bridge, new.pair) == (old.hop1, old.hop2, old.answer, old.bridge,
                                                                           old.pair)
    for new in absent:
        old = by_id[new.id]
        assert new.e1 in bridges_of[old.r1] and new.e1 not in (old.bridge, by_id[old.pair].bridge)
        assert new.two_hop == old.two_hop.replace(old.e1, new.e1)
    assert control_items(items, "absent", seed=3) == absent != control_items(items, "absent", seed=4)
    assert main(["memory-controls", "--out", str(tmp_path)]) == 0
    assert load_prompts([tmp_path / "present.jsonl"]) == present
    assert load_prompts([tmp_path / "absent.jsonl"]) == control_items(items, "absent", seed=0)
    with pytest.raises(ValueError, match="control kind"):
        control_items(items, "neither")
