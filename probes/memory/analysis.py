"""Locate the shared latent memory: where the bridge entity that hop 1 computes inside a two-hop prompt lives
relative to where hop 2 reads an explicitly written bridge.

Per item ``A`` (two-hop prompt, bridge ``B_A``, answer ``Y_A``; its ``pair`` partner ``C`` has the same relation
composition, another bridge and answer), four analyses, all on ``resid_post`` (layer ``l`` = the output of block
``l``, as in the logit lens) and all through the patching engine (:func:`probes.readouts.variants.run_variants`):

- ``crosspatch``: A's two-hop state at source layer ``s`` (at its last token, or at the last token of ``e1``) is
  written into C's ``hop2`` prompt ("The capital of Italy is") at the last token of C's bridge, at target layer
  ``t``. Metric at the last position: ``logit(Y_A) - logit(Y_C)`` (``logit_diff``), the rank and probability of
  ``Y_A``, and ``value`` = ``(patched - C's own hop2) / (A's hop2 - C's own hop2)``: 1 = as good as writing A's
  bridge out. Any foreign state written there also *erases* C's bridge, which alone moves ``value`` a long way
  toward 1 (about half of it in SmolLM2), so the ``random`` control is paired with the main map cell by cell:
  the state of a random other item of the same composition whose bridge differs from both, same receiving
  prompt, cells and metric; the bridge-specific effect is ``main - random``. ``other_relation`` (on the
  diagonal ``s = t``): A's state written into the hop2 prompt of an item ``D`` of another second relation whose
  bridge the set also has with A's bridge (item ``E``): "The main language spoken in Italy is" with the state of
  "... where the Eiffel Tower is": ``transfer_value`` (toward French, A's bridge under D's relation) and
  ``answer_value`` (toward Paris, A's answer), both logit differences against ``Y_D`` normalized by E's hop2
  prompt over D's; a state that holds the bridge moves toward French, one that holds the answer toward Paris.
  Its control ``other_relation_random`` writes the random item's state there: the relation a state carries
  (a "capital" question pushes toward capitals) moves both alike, so the bridge-specific reading is A's
  ``transfer - answer`` minus the random item's.
- ``decoding`` (Patchscope-style): the state is written into the placeholder of a few-shot identity prompt
  (:func:`identity_prompt`; demonstration entities that occur in no item of the set) at the same layer
  (``t = s``) and at a fixed early layer, and the bridge's first-token rank is read at the last position; the
  partner's bridge gives the chance rate of decoding an entity of the same type that is not this one. The same
  is done for the explicit bridge (the hop2 prompt's state at the bridge's last token): the sanity check.
  ``lens`` rows: the logit-lens rank of the bridge (and the answer) read from the same states.
- ``backpatch``: for two-hop prompts answered wrongly although both one-hop prompts are right
  (``hops_ok_composition_failed``), and as a control for the correct ones, the last token's state at a later
  layer ``s`` is written into an earlier layer ``t < s`` of the same prompt; rank/prob of ``Y_A``.
- ``alignment`` (:mod:`probes.memory.alignment`): cosine and linear CKA between latent and explicit bridge states per
  layer against mismatched pairs, and a linear probe trained on explicit states, tested on latent ones.

Every item's rows go into ``memory.csv`` (long format, :data:`COLUMNS`) as soon as its chunk is done, so an
interrupted run resumes per item; the alignment, which needs all items, runs once after them. The seconds of the
work each session committed are kept beside the partial file (:func:`_read_ledger`), so a resumed run reports
the time of the whole analysis, not only of its last session.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bridgeprobe.probes.runs import distributed
from bridgeprobe.probes.memory.alignment import alignment_rows
from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.probes.io.results import atomic_write_json
from bridgeprobe.probes.model.states import read_states
from bridgeprobe.probes.readouts.variants import Measure, Variant, run_variants
from bridgeprobe.prompts.sampling import sample_items
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


# --------------------------------------------------------------------------------------------------- engine


def candidate_measure(tokens: Sequence[int]) -> Measure:
    """A measure of ``K`` candidate tokens at the last position: ``[logits (K), ranks (K), log-probs (K)]`` per
    row; a rank is the number of tokens with a strictly larger logit (as in the logit lens)."""
    index = torch.tensor(list(tokens))

    def measure(logits: Tensor, _resid: Tensor | None) -> Tensor:
        logits = logits.float()
        chosen = logits[:, index.to(logits.device)]
        # one row at a time: its logits stay in cache while all K candidates are compared (a whole-matrix compare
        # per candidate reads the [B, vocab] logits K times from memory, ~10x slower for K = 16)
        ranks = torch.stack([(row[None] > picked[:, None]).sum(-1) for row, picked in zip(logits, chosen)])
        return torch.cat([chosen, ranks.float(), chosen - logits.logsumexp(-1, keepdim=True)], -1)

    return measure


@dataclass(frozen=True)
class TokenScores:
    """What :func:`candidate_measure` returned (``values[..., 3K]``) for the candidate ``tokens``."""

    values: Tensor
    tokens: tuple[int, ...]

    def _column(self, kind: int, token: int) -> Tensor:
        return self.values[..., kind * len(self.tokens) + self.tokens.index(token)]

    def logit(self, token: int) -> Tensor:
        return self._column(0, token)

    def rank(self, token: int) -> Tensor:
        return self._column(1, token)

    def prob(self, token: int) -> Tensor:
        return self._column(2, token).exp()


def patch_states(hooked: HookedModel, receiving_ids: Sequence[int], position: int, states: Sequence[Tensor],
                 cells: Sequence[Sequence[tuple[int, int]]], tokens: Sequence[int], *,
                 method: str = "auto") -> tuple[list[TokenScores], TokenScores]:
    """Write each source's residual stream ``states[i][s]`` (``[L, d]``: ``resid_post`` of every block at the
    source position) into ``resid_post[t]`` of the receiving prompt at ``position``, for every ``(s, t)`` in
    ``cells[i]``, one variant at a time, all in one :func:`~probes.readouts.variants.run_variants` call. Returns, per
    source, the scores of the candidate ``tokens`` at the receiving prompt's last position (``[len(cells[i]),
    3K]``), and those of the unpatched receiving run (``[3K]``)."""
    tokens = tuple(dict.fromkeys(int(t) for t in tokens))
    variants = [Variant("resid_post", t, position, state[s]) for state, own in zip(states, cells) for s, t in own]
    run = run_variants(hooked, receiving_ids, variants, candidate_measure(tokens), method=method)
    values = run.values.cpu().split([len(own) for own in cells])
    return [TokenScores(v, tokens) for v in values], TokenScores(run.baseline.cpu(), tokens)


def rank_of(logits: Tensor, token: int) -> int:
    """Rank of ``token`` in one row of logits."""
    return int((logits > logits[token]).sum())


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
    batch_items: int = 8  # items per decoding call (they share the identity prompt)
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


# --------------------------------------------------------------------------------------------------- per item


@dataclass
class _Sources:
    """An item's reference forward: states at the source positions and the final logits of each prompt."""

    latent: dict[str, Tensor]  # source position -> [L, d]
    random: dict[str, Tensor]
    explicit: Tensor | None  # A's hop2 at the bridge's last token, [L, d]
    logits: dict[str, Tensor]  # prompt kind -> [vocab]


def _reference_run(hooked: HookedModel, plan: Plan) -> _Sources:
    a = plan.a
    prompts: list[tuple[str, tuple[int, ...], list[int]]] = [
        ("two_hop", a.two_hop, [p for p in (a.e1_position, len(a.two_hop) - 1) if p is not None])]
    if plan.maps and plan.r is not None:
        prompts.append(("random", plan.r.two_hop, [p for p in (plan.r.e1_position, len(plan.r.two_hop) - 1)
                                                   if p is not None]))
    if a.hop1:
        prompts.append(("hop1", a.hop1, [len(a.hop1) - 1]))
    if a.hop2:
        prompts.append(("hop2", a.hop2, [p for p in (a.hop2_position, len(a.hop2) - 1) if p is not None]))
    if plan.maps and plan.e is not None:
        prompts.append(("transfer", plan.e.hop2, [len(plan.e.hop2) - 1]))
    states, logits = read_states(hooked, [(ids, pos) for _, ids, pos in prompts])
    kinds = [k for k, _, _ in prompts]

    def positions(kind: str, enc: Encoded) -> dict[str, Tensor]:
        row = states[kinds.index(kind)]
        names = (["e1_last"] if enc.e1_position is not None else []) + ["last"]
        return {name: row[k] for k, name in enumerate(names)}

    explicit = states[kinds.index("hop2"), 0] if a.hop2 and a.hop2_position is not None else None
    return _Sources(positions("two_hop", a), positions("random", plan.r) if "random" in kinds else {}, explicit,
                    dict(zip(kinds, logits)))


def group_of(plan: Plan, sources: _Sources) -> str:
    """The outcome group (as in the lens report): correct / hops_ok_composition_failed / hop_failed /
    no_hop_prompts, from the first-token ranks at the last layer."""
    logits = sources.logits
    if rank_of(logits["two_hop"], plan.a.answer) == 0:
        return "correct"
    if "hop1" not in logits or "hop2" not in logits:
        return "no_hop_prompts"
    ok = rank_of(logits["hop1"], plan.a.bridge) == 0 and rank_of(logits["hop2"], plan.a.answer) == 0
    return "hops_ok_composition_failed" if ok else "hop_failed"


def _row(analysis: str, plan: Plan, condition: str, metric: str, value: float, *, source_id: str = "",
         receiving_id: str = "", source_position: str = "", source_layer: int | None = None,
         target_layer: int | None = None) -> dict[str, Any]:
    return {"analysis": analysis, "prompt_id": plan.a.item.id, "condition": condition, "source_id": source_id,
            "receiving_id": receiving_id, "source_position": source_position, "source_layer": source_layer,
            "target_layer": target_layer, "metric": metric, "value": value}


def _normalized(metric: Tensor, baseline: float, gap: float) -> Tensor:
    """``(metric - baseline) / gap``: 0 = the receiving prompt's own, 1 = the explicit reference (NaN if gap = 0)."""
    return (metric - baseline) / gap if gap != 0 else torch.full_like(metric, math.nan)


def crosspatch_rows(hooked: HookedModel, plan: Plan, sources: _Sources, cells: list[tuple[int, int]],
                    diagonal: list[tuple[int, int]], method: str) -> list[dict[str, Any]]:
    """The main map and the ``random`` control on ``cells`` (into C's hop2 prompt), and the ``other_relation``
    control on the ``diagonal`` (into D's hop2 prompt)."""
    a, c = plan.a, plan.c
    named = [("main", a, pos, state) for pos, state in sources.latent.items()]
    named += [("random", plan.r, pos, state) for pos, state in sources.random.items()]
    scores, base = patch_states(hooked, c.hop2, c.hop2_position, [s for *_, s in named], [cells] * len(named),
                                [a.answer, c.answer], method=method)
    explicit = sources.logits["hop2"]  # A's own hop2 prompt: its bridge written out
    explicit_diff = float(explicit[a.answer] - explicit[c.answer])
    base_diff = float(base.logit(a.answer) - base.logit(c.answer))
    gap = explicit_diff - base_diff
    rows = [_row("crosspatch", plan, "main", "baseline_logit_diff", base_diff, receiving_id=c.item.id),
            _row("crosspatch", plan, "main", "explicit_logit_diff", explicit_diff, receiving_id=c.item.id),
            _row("crosspatch", plan, "main", "baseline_rank", float(base.rank(a.answer)), receiving_id=c.item.id)]
    for (condition, src, pos, _), score in zip(named, scores):
        diff = score.logit(a.answer) - score.logit(c.answer)
        rows += _cell_rows(plan, condition, src.item.id, c.item.id, pos, cells, {
            "logit_diff": diff, "value": _normalized(diff, base_diff, gap), "rank": score.rank(a.answer),
            "prob": score.prob(a.answer)})
    if plan.d is not None:
        rows += _other_relation_rows(hooked, plan, sources, diagonal, method)
    return rows


def _other_relation_rows(hooked: HookedModel, plan: Plan, sources: _Sources, cells: list[tuple[int, int]],
                         method: str) -> list[dict[str, Any]]:
    """A's state, and as its control the random item's, in D's hop2 prompt (another relation): movement toward
    ``Y_E`` (A's bridge under D's relation, ``transfer``) and toward ``Y_A`` (A's answer, ``answer``), both as
    logit differences against ``Y_D`` normalized by the same gap, E's hop2 prompt over D's."""
    a, d, e = plan.a, plan.d, plan.e
    named = [("other_relation", a, pos, state) for pos, state in sources.latent.items()]
    named += [("other_relation_random", plan.r, pos, state) for pos, state in sources.random.items()]
    scores, base = patch_states(hooked, d.hop2, d.hop2_position, [s for *_, s in named], [cells] * len(named),
                                [a.answer, d.answer, e.answer], method=method)
    explicit = sources.logits["transfer"]
    transfer_base = float(base.logit(e.answer) - base.logit(d.answer))
    answer_base = float(base.logit(a.answer) - base.logit(d.answer))
    gap = float(explicit[e.answer] - explicit[d.answer]) - transfer_base
    rows = [_row("crosspatch", plan, "other_relation", "transfer_gap", gap, receiving_id=d.item.id,
                 source_id=e.item.id)]
    for (condition, src, pos, _), score in zip(named, scores):
        transfer = score.logit(e.answer) - score.logit(d.answer)
        answer = score.logit(a.answer) - score.logit(d.answer)
        rows += _cell_rows(plan, condition, src.item.id, d.item.id, pos, cells, {
            "transfer_value": _normalized(transfer, transfer_base, gap),
            "answer_value": _normalized(answer, answer_base, gap),
            "transfer_rank": score.rank(e.answer), "answer_rank": score.rank(a.answer)})
    return rows


def _cell_rows(plan: Plan, condition: str, source_id: str, receiving_id: str, position: str,
               cells: Sequence[tuple[int, int]], metrics: dict[str, Tensor], analysis: str = "crosspatch") -> list[dict]:
    columns = {name: values.tolist() for name, values in metrics.items()}
    return [_row(analysis, plan, condition, name, values[k], source_id=source_id, receiving_id=receiving_id,
                 source_position=position, source_layer=s, target_layer=t)
            for name, values in columns.items() for k, (s, t) in enumerate(cells)]


def backpatch_rows(hooked: HookedModel, plan: Plan, sources: _Sources, group: str, cells: list[tuple[int, int]],
                   method: str) -> list[dict[str, Any]]:
    """The last token's later state written into an earlier layer of the same two-hop prompt."""
    a = plan.a
    (scores,), base = patch_states(hooked, a.two_hop, len(a.two_hop) - 1, [sources.latent["last"]], [cells],
                                   [a.answer], method=method)
    rows = [_row("backpatch", plan, group, "baseline_rank", float(base.rank(a.answer)))]
    return rows + _cell_rows(plan, group, a.item.id, a.item.id, "last", cells,
                             {"rank": scores.rank(a.answer), "prob": scores.prob(a.answer)}, analysis="backpatch")


def lens_rows(hooked: HookedModel, plan: Plan, sources: _Sources) -> list[dict[str, Any]]:
    """Logit-lens ranks of the bridge (and the answer) read from the states the decoding patches."""
    from bridgeprobe.probes.readouts.lens import token_ranks

    a = plan.a
    reads = [("latent", pos, "bridge_rank", state, a.bridge) for pos, state in sources.latent.items()]
    reads.append(("latent", "last", "answer_rank", sources.latent["last"], a.answer))
    if sources.explicit is not None:
        reads.append(("explicit", "bridge", "bridge_rank", sources.explicit, a.bridge))
    rows = []
    for condition, pos, metric, state, token in reads:
        ranks = token_ranks(hooked, state, token).tolist()
        rows += [_row("lens", plan, condition, metric, float(r), source_id=a.item.id, source_position=pos,
                      source_layer=layer) for layer, r in enumerate(ranks)]
    return rows


def decoding_rows(hooked: HookedModel, chunk: Sequence[tuple[Plan, _Sources]], prompt_ids: Sequence[int],
                  placeholder: int, cells: list[tuple[int, int]], method: str) -> list[dict[str, Any]]:
    """One call for a chunk of items (they share the identity prompt): the latent states (two-hop last token and
    e1's last token) and the explicit one (hop2, the bridge's last token) decoded at ``cells``."""
    named = []  # (plan, condition, source position, state, own bridge token, partner's bridge token)
    for plan, sources in chunk:
        partner = plan.c.bridge if plan.c is not None else None
        named += [(plan, "latent", pos, state, partner) for pos, state in sources.latent.items()]
        if sources.explicit is not None:
            named.append((plan, "explicit", "bridge", sources.explicit, partner))
    if not named:
        return []
    tokens = [p.a.bridge for p, *_ in named] + [t for *_, t in named if t is not None]
    scores, _ = patch_states(hooked, prompt_ids, placeholder, [s for _, _, _, s, _ in named], [cells] * len(named),
                             tokens, method=method)
    rows = []
    for (plan, condition, pos, _, partner), score in zip(named, scores):
        metrics = {"rank": score.rank(plan.a.bridge), "prob": score.prob(plan.a.bridge)}
        if partner is not None and partner != plan.a.bridge:
            metrics["partner_rank"] = score.rank(partner)
        rows += _cell_rows(plan, condition, plan.a.item.id, "identity", pos, cells, metrics, analysis="decoding")
    return rows


def item_rows(plan: Plan, group: str, sources: _Sources) -> list[dict[str, Any]]:
    """Per item: correctness of the three prompts (NaN where absent), its outcome group (``condition``), and why
    any analysis was left out; the row that marks the item done."""
    a, logits = plan.a, sources.logits
    flags = {"two_hop_correct": float(rank_of(logits["two_hop"], a.answer) == 0),
             "hop1_correct": float(rank_of(logits["hop1"], a.bridge) == 0) if "hop1" in logits else math.nan,
             "hop2_correct": float(rank_of(logits["hop2"], a.answer) == 0) if "hop2" in logits else math.nan}
    rows = [_row("item", plan, group, metric, value) for metric, value in flags.items()]
    rows += [_row("item", plan, f"{analysis}: {why}", "skipped", 1.0) for analysis, why in plan.skipped.items()]
    return rows


# --------------------------------------------------------------------------------------------------- job


@dataclass
class MemoryRun:
    """What :func:`run_memory` wrote: the memory table (None on the other processes of a data-parallel run), the
    seconds spent per analysis (summed over processes and over the sessions of a resumed run), and counts for
    run.json (``sessions``; ``earlier_sessions_s``, the wall seconds the earlier sessions spent up to their last
    committed rows, which a caller adds to the wall time it measured for this session)."""

    frame: pd.DataFrame | None
    timings: dict[str, float]
    info: dict[str, Any]


def run_memory(hooked: HookedModel, items: Sequence[PromptItem], out_dir: Path, config: MemoryConfig, *,
               settings: dict[str, Any], name: str = "memory") -> MemoryRun:
    """Write ``out_dir/NAME.csv`` for ``items`` (partners and controls may be any item of the set; the analysed
    ones are :func:`~prompts.sampling.sample_items` of ``config.n_items``), resuming an interrupted run. Data-parallel
    (:mod:`probes.runs.distributed`): the processes share the chunks of items; rank 0 runs the alignment and writes
    the file."""
    started = time.perf_counter()
    tokenizer, n_layers = hooked.tokenizer, hooked.n_layers
    encoded = {item.id: encode(tokenizer, item) for item in items}
    analysed = sample_items(items, config.n_items, seed=config.seed)
    plans = make_plans(encoded, [item.id for item in analysed], config.seed,
                       maps=[item.id for item in sample_items(analysed, config.map_items, seed=config.seed)])
    decode_layer = default_decode_layer(n_layers) if config.decode_layer is None else config.decode_layer
    cells = {"crosspatch": crosspatch_cells(n_layers, config.stride),
             "diagonal": [(l, l) for l in range(n_layers - 1)],
             "backpatch": backpatch_cells(n_layers, config.stride),
             "decoding": decoding_cells(n_layers, decode_layer)}
    prompt, demos = identity_prompt(items)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    placeholder = span_end_position(tokenizer, prompt, f"\n{PLACEHOLDER}")
    if placeholder is None or placeholder != len(prompt_ids) - 2:
        raise ValueError(f"the identity prompt's placeholder {PLACEHOLDER!r} must be one token right before the "
                         f"last one; got tokens {[tokenizer.decode([t]) for t in prompt_ids[-4:]]}")

    shards = distributed.context()
    store = shards.store(out_dir, name, COLUMNS, {**settings, **config.settings(), "identity_prompt": prompt})
    done_keys = store.done(["analysis", "prompt_id"])
    done = shards.union({pid for analysis, pid in done_keys if analysis == "item"})
    alignment_done = bool(shards.union({pid for analysis, pid in done_keys if analysis == "alignment"}))
    ledger = store.partial.with_name(f".{name}.timings.json")
    earlier = _read_ledger(ledger if done_keys else None)  # no committed rows: a fresh run, a stale ledger
    todo = [p for p in plans if p.a.item.id not in done]
    chunks = shards.shard([todo[i : i + config.batch_items] for i in range(0, len(todo), config.batch_items)])
    timings: dict[str, float] = defaultdict(float)

    def commit(rows: list[dict[str, Any]]) -> None:
        store.append(rows)
        _write_ledger(ledger, earlier, timings, time.perf_counter() - started)

    wanted = set(config.analyses)
    total = sum(len(c) for c in chunks)
    with tqdm(total=total, desc="memory", unit="item", disable=not total or not shards.is_main) as bar:
        for chunk in chunks:
            rows, ran = [], []
            for plan in chunk:
                with _timed(timings, "reference_s"):
                    sources = _reference_run(hooked, plan)
                group = group_of(plan, sources)
                if "crosspatch" in wanted and plan.maps and plan.c is not None:
                    with _timed(timings, "crosspatch_s"):
                        rows += crosspatch_rows(hooked, plan, sources, cells["crosspatch"], cells["diagonal"],
                                                config.method)
                if "backpatch" in wanted and group in config.backpatch_groups:
                    with _timed(timings, "backpatch_s"):
                        rows += backpatch_rows(hooked, plan, sources, group, cells["backpatch"], config.method)
                if "decoding" in wanted:
                    with _timed(timings, "decoding_s"):
                        rows += lens_rows(hooked, plan, sources)
                ran.append((plan, sources))
                rows += item_rows(plan, group, sources)
                bar.update(1)  # per item; the chunk's decoding runs after its items
            if "decoding" in wanted:
                bar.set_postfix_str("decoding the chunk")
                with _timed(timings, "decoding_s"):
                    rows += decoding_rows(hooked, [(p, s) for p, s in ran if p.maps], prompt_ids, placeholder,
                                          cells["decoding"], config.method)
            commit(rows)
            bar.set_postfix_str("")
    if "alignment" in wanted and not alignment_done and shards.is_main:
        with _timed(timings, "alignment_s"):
            rows = alignment_rows(hooked, plans, encoded, seed=config.seed)
        commit(rows)
    totals: dict[str, float] = defaultdict(float)
    parts = shards.all_gather((dict(timings), earlier))
    for current, previous in parts:
        for key, value in [*current.items(), *previous["analyses"].items()]:
            totals[key] += value
    ledger.unlink(missing_ok=True)  # before the partial file goes: a ledger never outlives its rows
    frame = shards.finish(store, sort_by=list(SORT_BY))
    info = {"n_items": len(plans), "map_items": sum(p.maps for p in plans), "resumed_items": len(plans) - len(todo),
            "sessions": max(previous["sessions"] for _, previous in parts) + 1,
            "earlier_sessions_s": round(max(previous["elapsed_s"] for _, previous in parts), 3),
            "identity_prompt": prompt, "demonstrations": demos, "decode_layer": decode_layer, "cells": {k: len(v) for k, v in cells.items()},
            "skipped": _skip_counts(plans)}
    return MemoryRun(frame, {k: round(v, 3) for k, v in totals.items()}, info)


def _read_ledger(path: Path | None) -> dict[str, Any]:
    """The timings of the earlier sessions of an interrupted run, from ``path`` (``.NAME.timings.json`` beside
    the partial file): ``sessions``, ``elapsed_s`` (their wall seconds up to their last committed rows) and
    ``analyses`` (seconds per analysis). None or no file: no earlier session."""
    if path is None or not path.is_file():
        return {"sessions": 0, "elapsed_s": 0.0, "analyses": {}}
    try:
        ledger = json.loads(path.read_text())
        return {"sessions": int(ledger["sessions"]), "elapsed_s": float(ledger["elapsed_s"]),
                "analyses": {str(k): float(v) for k, v in ledger["analyses"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable timings of an interrupted run ({error}); delete the file to resume "
                         "without the earlier sessions' time") from error


def _write_ledger(path: Path, earlier: dict[str, Any], timings: dict[str, float], elapsed: float) -> None:
    """Commit this session's seconds so far, added to ``earlier``'s (written right after each committed batch of
    rows, so it counts exactly the work a resumed run keeps)."""
    analyses = defaultdict(float, earlier["analyses"])
    for key, value in timings.items():
        analyses[key] += value
    atomic_write_json(path, {"sessions": earlier["sessions"] + 1,
                             "elapsed_s": round(earlier["elapsed_s"] + elapsed, 3),
                             "analyses": {k: round(v, 3) for k, v in analyses.items()}})


def _skip_counts(plans: Iterable[Plan]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for plan in plans:
        for analysis, why in plan.skipped.items():
            counts[f"{analysis}: {why}"] += 1
    return dict(counts)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``."""
    started = time.perf_counter()
    yield
    timings[key] += time.perf_counter() - started
