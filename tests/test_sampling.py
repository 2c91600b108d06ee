"""The --limit sampler (prompts.sampling): stratified over compositions, seeded and deterministic, limit exact."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from bridgeprobe.prompts.loaders import load_prompts
from bridgeprobe.prompts.sampling import sample_items, sample_pairs
from bridgeprobe.prompts.schema import PromptItem


def make_set(sizes: dict[str, int], paired: bool = False) -> list[PromptItem]:
    """Items of the compositions ``r1>r2`` with the given sizes, one composition after the other; with ``paired``,
    items 2k and 2k+1 of a composition name each other as ``pair``."""
    items = []
    for name, size in sizes.items():
        r1, r2 = name.split(">")
        for k in range(size):
            partner = k + 1 if k % 2 == 0 else k - 1
            pair = f"{name}-{partner}" if paired and partner < size else None
            items.append(PromptItem(f"{name}-{k}", f"Question {name} {k} is", "B", "A", r1=r1, r2=r2, pair=pair))
    return items


SET = make_set({"a>x": 12, "b>x": 3, "c>y": 7, "d>z": 1, "e>z": 9})


def test_stratified_spans_every_composition_exactly_limit_items_in_file_order() -> None:
    for limit in (5, 6, 11, 20, 31):
        chosen = sample_items(SET, limit)
        assert len(chosen) == limit and len({i.id for i in chosen}) == limit
        assert chosen == sorted(chosen, key=SET.index)  # the set's order
        assert {i.composition for i in chosen} == {i.composition for i in SET}  # 5 compositions, limit >= 5
    assert sample_items(SET, None) == SET and sample_items(SET, 100) == SET


def test_stratified_is_balanced_like_a_naive_round_robin() -> None:
    """Counts per composition equal those of an independent round-robin fill: each composition gets
    min(size, level) items, with the level raised one at a time until the limit is reached."""
    rng = random.Random(1)
    for _ in range(50):
        sizes = {f"r{g}>s": rng.randint(1, 9) for g in range(rng.randint(1, 6))}
        items = make_set(sizes)
        limit = rng.randint(1, len(items))
        counts = Counter(i.composition for i in sample_items(items, limit, seed=rng.randint(0, 99)))
        level = 0
        while sum(min(size, level) for size in sizes.values()) < limit:
            level += 1
        for name, size in sizes.items():
            assert min(size, level - 1) <= counts[name] <= min(size, level), (sizes, limit, counts)


def test_stratified_is_deterministic_and_seeded() -> None:
    assert sample_items(SET, 10, seed=3) == sample_items(list(SET), 10, seed=3)
    subsets = {tuple(i.id for i in sample_items(SET, 10, seed=s)) for s in range(10)}
    assert len(subsets) > 1  # the seed changes which items of each composition are taken


def test_first_keeps_the_head_and_bad_choices_fail() -> None:
    assert sample_items(SET, 7, "first") == SET[:7]
    with pytest.raises(ValueError, match="unknown sample"):
        sample_items(SET, 3, "random")


def test_pairs_come_along_within_the_limit() -> None:
    items = make_set({"a>x": 8, "b>x": 6, "c>y": 4}, paired=True)
    for limit in (2, 4, 6, 9):
        chosen = sample_items(items, limit, pairs=True)
        ids = {i.id for i in chosen}
        assert len(chosen) == limit
        unpaired = [i for i in chosen if i.pair not in ids]
        assert len(unpaired) == limit % 2  # only an odd limit leaves one item without its partner
    assert len({i.composition for i in sample_items(items, 6, pairs=True)}) == 3


def test_load_prompts_samples_the_curated_set_across_compositions() -> None:
    full = load_prompts("curated")
    compositions = {i.composition for i in full}
    chosen = load_prompts("curated", limit=20)
    assert len(chosen) == 20 and len({i.composition for i in chosen}) >= min(10, len(compositions))
    by_id = {i.id for i in chosen}
    assert all(i.pair in by_id for i in chosen if i.pair)  # partners kept (20 is even)
    assert load_prompts("curated", limit=20, sample="first") == full[:20]


def test_sample_pairs_stratifies_by_the_clean_items_composition() -> None:
    items = make_set({"a>x": 10, "b>x": 10})
    pairs = [SimpleNamespace(clean_id=i.id) for i in items]
    chosen = sample_pairs(pairs, items, 4)
    assert Counter(p.clean_id.split("-")[0] for p in chosen) == {"a>x": 2, "b>x": 2}
