"""One sampler for every ``--limit``: a seeded, deterministic subset of a prompt set (or of its patching pairs).

``stratified`` (the default) takes items round-robin over the relation compositions (``r1>r2``; items without
relations form one group), visiting the compositions, and the items within each, in an order shuffled by
``seed``: ``--limit 20`` spans the compositions instead of taking the first composition's first 20 items, and the
same seed gives the same subset on every machine (:class:`random.Random`). ``first`` keeps the first ``limit``
items in file order. With ``pairs``, an item's counterfactual partner (its ``pair``) is taken with it while the
limit allows, so patching and the memory controls keep their pairs. The subset keeps the set's order.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Hashable, Sequence, TypeVar

SAMPLES = ("stratified", "first")
T = TypeVar("T")


def _composition(item: Any) -> Hashable:
    return item.composition


def sample_items(items: Sequence[T], limit: int | None, how: str = "stratified", seed: int = 0, *,
                 group: Callable[[T], Hashable] = _composition, pairs: bool = False) -> list[T]:
    """``min(limit, len(items))`` of ``items`` chosen as ``how`` says (all of them when ``limit`` is None), in
    their original order. ``group`` gives an item's stratum (default: its relation composition); ``pairs`` takes
    each chosen :class:`~prompts.schema.PromptItem`'s ``pair`` partner along when it still fits in the limit."""
    if how not in SAMPLES:
        raise ValueError(f"unknown sample {how!r} (choose from {', '.join(SAMPLES)})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    if how == "first":
        return list(items[:limit])
    rng = random.Random(seed)
    strata: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        strata.setdefault(group(item), []).append(index)
    queues = list(strata.values())
    rng.shuffle(queues)
    for queue in queues:
        rng.shuffle(queue)
    position = {item.id: i for i, item in enumerate(items)} if pairs else {}  # type: ignore[attr-defined]
    chosen: set[int] = set()
    for depth in range(max(len(q) for q in queues)):
        for queue in queues:
            if len(chosen) >= limit:
                return [items[i] for i in sorted(chosen)]
            if depth >= len(queue) or queue[depth] in chosen:
                continue
            index = queue[depth]
            chosen.add(index)
            partner = position.get(getattr(items[index], "pair", None))
            if partner is not None and partner not in chosen and len(chosen) < limit:
                chosen.add(partner)
    return [items[i] for i in sorted(chosen)]


def sample_pairs(pairs: Sequence[T], items: Sequence[Any], limit: int | None, how: str = "stratified",
                 seed: int = 0) -> list[T]:
    """:func:`sample_items` over patching pairs (anything with a ``clean_id``), stratified by the composition of
    each pair's clean item in ``items``: ``--limit N`` of ``bridgeprobe patch`` and the pair counts of the reports."""
    composition = {item.id: item.composition for item in items}
    return sample_items(pairs, limit, how, seed,
                        group=lambda pair: composition.get(pair.clean_id))  # type: ignore[attr-defined]
