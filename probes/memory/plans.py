"""What the shared-memory analyses (:mod:`probes.memory.analysis`) run on: the ``memory.csv`` columns and the
analyses' constants, the (source, target) layer cells of each map, the identity prompt and the token positions, each
item tokenized (:class:`Encoded`) with its partner and controls (:class:`Plan`), and the settings
(:class:`MemoryConfig`)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.schema import PromptItem

ANALYSES = ("crosspatch", "decoding", "backpatch", "alignment")
COLUMNS = ("analysis", "prompt_id", "condition", "source_id", "receiving_id", "source_position", "source_layer",
           "target_layer", "metric", "value")
SORT_BY = ("analysis", "prompt_id", "condition", "source_position", "source_layer", "target_layer", "metric")
BACKPATCH_GROUPS = ("hops_ok_composition_failed", "correct")
# demonstration entities of the identity prompt: the first N_DEMOS that occur in no item of the set are used
DEMO_POOL = ("Mount Everest", "Albert Einstein", "the Amazon River", "Coca-Cola", "the Moon", "chocolate",
             "Microsoft", "the Pacific Ocean", "Isaac Newton", "the Sahara", "jazz", "Toyota", "gold", "Jupiter",
             "the Olympic Games", "Marie Curie")
N_DEMOS = 6
PLACEHOLDER = "x"


# --------------------------------------------------------------------------------------------------- layers


def layer_grid(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer from 0, and the last layer."""
    if stride < 1:
        raise ValueError(f"layer stride must be at least 1, got {stride}")
    return sorted(set(range(0, n_layers, stride)) | {n_layers - 1})


def crosspatch_cells(n_layers: int, stride: int) -> list[tuple[int, int]]:
    """(source, target) layers of the cross-patch map: the grid x grid (targets up to ``L-2``: a patch after the
    last block cannot reach the last position) and the whole diagonal ``s == t``."""
    grid = layer_grid(n_layers, stride)
    cells = {(s, t) for s in grid for t in grid if t <= n_layers - 2}
    cells |= {(l, l) for l in range(n_layers - 1)}
    return sorted(cells)


def backpatch_cells(n_layers: int, stride: int) -> list[tuple[int, int]]:
    """(source, target) layers of back-patching: later into earlier, ``t < s``, on the grid (and ``s = t + 1``
    at every layer: the smallest step)."""
    grid = layer_grid(n_layers, stride)
    cells = {(s, t) for s in grid for t in grid if t < s}
    cells |= {(t + 1, t) for t in range(n_layers - 1)}
    return sorted(cells)


def default_decode_layer(n_layers: int) -> int:
    """The fixed early target layer of the decoding: ``L // 8`` (layer 3 of 30, 2 of 18), set before any run
    (Patchscope-style entity decoding works best into early layers); it is never tuned on the latent states."""
    return n_layers // 8


def decoding_cells(n_layers: int, decode_layer: int) -> list[tuple[int, int]]:
    """(source, target) layers of the decoding: the same layer (``t = s`` up to ``L-2``) and the fixed one."""
    if not 0 <= decode_layer <= n_layers - 2:
        raise ValueError(f"decode layer must lie in 0..{n_layers - 2}, got {decode_layer}")
    cells = {(s, s) for s in range(n_layers - 1)} | {(s, decode_layer) for s in range(n_layers)}
    return sorted(cells)


# --------------------------------------------------------------------------------------------------- tokens


def span_end_position(tokenizer: Any, text: str, span: str) -> int | None:
    """Position of the last token of the first occurrence of ``span`` in ``text`` (tokenized as ``tokenizer(text)``),
    or None when ``span`` does not occur or its end falls inside a token (the prefix up to it does not tokenize
    to a prefix of the whole)."""
    start = text.find(span)
    if start < 0:
        return None
    ids = list(tokenizer(text)["input_ids"])
    prefix = list(tokenizer(text[: start + len(span)])["input_ids"])
    if not prefix or ids[: len(prefix)] != prefix:
        return None
    return len(prefix) - 1


def identity_prompt(items: Sequence[PromptItem], n_demos: int = N_DEMOS) -> tuple[str, list[str]]:
    """The neutral decoding prompt ``"E1: E1\\nE2: E2\\n...\\nx:"`` from the first ``n_demos`` entities of
    :data:`DEMO_POOL` that occur (case-insensitively) in no field of any item, so that no demonstration names a
    bridge, answer or first entity of the set. Returns the prompt and the demonstrations."""
    texts = " | ".join(" | ".join(item.to_dict().values()) for item in items).lower()
    demos = [e for e in DEMO_POOL if e.lower() not in texts][:n_demos]
    if len(demos) < 2:
        raise ValueError("fewer than 2 demonstration entities left for the identity prompt: every entity of the "
                         "pool occurs in the prompt set")
    return "".join(f"{e}: {e}\n" for e in demos) + f"{PLACEHOLDER}:", demos


# --------------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Encoded:
    """One item tokenized: two-hop ids with the e1 position, hop1/hop2 ids with the bridge's position in hop2
    (None where absent or at position 0, whose state is the attention sink's), and the first tokens of the bridge
    and the answer after the two-hop prompt (:func:`probes.model.targets.target_ids`, as in the logit lens)."""

    item: PromptItem
    two_hop: tuple[int, ...]
    e1_position: int | None
    hop1: tuple[int, ...] | None
    hop2: tuple[int, ...] | None
    hop2_position: int | None
    bridge: int
    answer: int


def encode(tokenizer: Any, item: PromptItem) -> Encoded:
    """Tokenize an item's prompts and locate e1's and the bridge's last tokens (:class:`Encoded`)."""

    def ids(text: str | None) -> tuple[int, ...] | None:
        return tuple(tokenizer(text)["input_ids"]) if text else None

    e1 = span_end_position(tokenizer, item.two_hop, item.e1) if item.e1 else None
    hop2_pos = span_end_position(tokenizer, item.hop2, item.bridge) if item.hop2 else None
    two_hop = ids(item.two_hop)
    bridge, answer = (target_ids(tokenizer, item.two_hop, text)[0] for text in (item.bridge, item.answer))
    return Encoded(item, two_hop, e1 if e1 is not None and e1 < len(two_hop) - 1 else None, ids(item.hop1),
                   ids(item.hop2), hop2_pos if hop2_pos else None, bridge, answer)


@dataclass
class Plan:
    """Which prompts one item's analyses use: the partner ``C`` (receiving hop2 prompt), the random control
    source ``R``, the other-relation receiving prompt ``D`` and the item ``E`` with A's bridge under D's relation
    (the transfer reference); ``skipped`` names the analyses left out for this item and why."""

    a: Encoded
    maps: bool = True  # run the cross-patch maps and the decoding (the other analyses run for every item)
    c: Encoded | None = None
    r: Encoded | None = None
    d: Encoded | None = None
    e: Encoded | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def make_plans(encoded: dict[str, Encoded], selected: Sequence[str], seed: int,
               maps: Iterable[str] | None = None) -> list[Plan]:
    """Choose each selected item's partner and controls, deterministically from ``seed`` and the item's id;
    ``maps``: the ids that get the cross-patch maps and the decoding (default: all)."""
    maps = set(selected if maps is None else maps)
    by_composition: dict[str | None, list[Encoded]] = defaultdict(list)
    by_bridge_relation: dict[tuple[str, str | None], Encoded] = {}
    for enc in encoded.values():
        by_composition[enc.item.composition].append(enc)
        if enc.hop2_position is not None:
            by_bridge_relation.setdefault((enc.item.bridge, enc.item.r2), enc)
    receivers = [e for e in encoded.values() if e.hop2_position is not None and e.item.r2]
    plans = []
    for pid in selected:
        a = encoded[pid]
        plan = Plan(a, maps=pid in maps)
        rng = random.Random(f"{seed}/{pid}")
        c = encoded.get(a.item.pair) if a.item.pair else None
        if c is None:
            plan.skipped["crosspatch"] = "no pair partner in the set"
        elif a.hop2_position is None or c.hop2_position is None:
            plan.skipped["crosspatch"] = "no hop2 prompt naming the bridge (after position 0) for the item or its partner"
        elif c.item.bridge == a.item.bridge:
            plan.skipped["crosspatch"] = "the partner has the same bridge"
        elif c.answer == a.answer:
            plan.skipped["crosspatch"] = "the answers share their first token"
        else:
            plan.c = c
            avoid_bridges, avoid_answers = {a.item.bridge, c.item.bridge}, {a.answer, c.answer}
            pool = [x for x in by_composition[a.item.composition] if x.item.bridge not in avoid_bridges
                    and x.answer not in avoid_answers]
            pool = pool or [x for x in encoded.values() if x.item.bridge not in avoid_bridges
                            and x.answer not in avoid_answers]
            plan.r = rng.choice(pool) if pool else None
            _choose_other_relation(plan, receivers, by_bridge_relation, rng)
        plans.append(plan)
    return plans


def _choose_other_relation(plan: Plan, receivers: list[Encoded], by_bridge_relation: dict, rng: random.Random) -> None:
    """``D``: a hop2 prompt of another second relation and another bridge, such that the set has A's bridge under
    D's relation (``E``, the transfer reference); the answers of A, D and E differ in their first token."""
    a = plan.a
    if not a.item.r2:
        plan.skipped["other_relation"] = "no relation names (r2) in the set"
        return
    pool = []
    for d in receivers:
        e = by_bridge_relation.get((a.item.bridge, d.item.r2))
        if (d.item.r2 != a.item.r2 and d.item.bridge != a.item.bridge and e is not None
                and len({a.answer, d.answer, e.answer}) == 3):
            pool.append((d, e))
    if not pool:
        plan.skipped["other_relation"] = "the set has the bridge under no other relation"
        return
    plan.d, plan.e = rng.choice(pool)


def other_relation_candidates(items: Sequence[PromptItem], analysed: Sequence[PromptItem]) -> int:
    """How many of the ``analysed`` items have their bridge in ``items`` under another second relation: the most
    the other-relation test can use (before tokenization; :func:`_choose_other_relation` may drop a few more)."""
    relations: dict[str, set[str | None]] = defaultdict(set)
    for item in items:
        relations[item.bridge].add(item.r2)
    return sum(1 for item in analysed if item.r2 and len(relations[item.bridge] - {item.r2}) > 0)


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MemoryConfig:
    """Settings of the memory analyses (the CLI's flags)."""

    analyses: tuple[str, ...] = ANALYSES
    n_items: int | None = None  # analyse this many items (prompts.sampling, stratified with seed); None: all
    map_items: int | None = None  # of those, this many get the cross-patch maps and the decoding; None: all
    stride: int = 1  # layer stride of the s x t maps (the diagonal is always complete)
    decode_layer: int | None = None  # fixed target layer of the decoding; None: default_decode_layer
    batch_items: int = 8  # items per reference forward and per decoding call (they share the identity prompt)
    backpatch_groups: tuple[str, ...] = BACKPATCH_GROUPS  # outcome groups whose prompts are back-patched
    seed: int = 0
    method: str = "auto"  # run_variants method

    def __post_init__(self) -> None:
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise ValueError(f"unknown analysis {unknown[0] if unknown else ''!r}; choose from {', '.join(ANALYSES)}")
        if self.batch_items < 1:
            raise ValueError("batch_items must be at least 1")
        layer_grid(2, self.stride)

    def settings(self) -> dict[str, Any]:
        return {"analyses": list(self.analyses), "items": self.n_items, "map_items": self.map_items,
                "stride": self.stride,
                "decode_layer": self.decode_layer, "batch_items": self.batch_items,
                "backpatch_groups": list(self.backpatch_groups), "seed": self.seed,
                "method": self.method}
