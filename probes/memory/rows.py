"""The rows of ``memory.csv`` per item (:mod:`probes.memory.analysis`): states written into a receiving prompt
through the patching engine (:func:`patch_states`, :func:`candidate_measure`), an item's reference forward
(:func:`reference_runs`), and the cross-patch, back-patch, logit-lens, decoding and per-item rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from bridgeprobe.probes.memory.plans import Encoded, Plan
from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.model.states import read_states
from bridgeprobe.probes.readouts import lens
from bridgeprobe.probes.readouts.variants import Measure, Variant, run_variants


# --------------------------------------------------------------------------------------------------- engine


def candidate_measure(tokens: Sequence[int]) -> Measure:
    """A measure of ``K`` candidate tokens at the last position: ``[logits (K), ranks (K), log-probs (K)]`` per
    row; a rank is the number of tokens with a strictly larger logit (as in the logit lens)."""
    index = torch.tensor(list(tokens))

    def measure(logits: Tensor, _resid: Tensor | None) -> Tensor:
        logits = logits.float()
        chosen = logits[:, index.to(logits.device)]
        # one row at a time: its logits stay in cache while all K candidates are compared and its log-partition is
        # taken (a whole-matrix compare per candidate reads the [B, vocab] logits K times from memory, ~10x slower
        # for K = 16; a whole-matrix logsumexp holds a second [B, vocab] matrix: 0.6 GB for 600 rows of Gemma 3)
        ranks = torch.stack([(row[None] > picked[:, None]).sum(-1) for row, picked in zip(logits, chosen)])
        log_z = torch.stack([row.logsumexp(-1) for row in logits])[:, None]
        return torch.cat([chosen, ranks.float(), chosen - log_z], -1)

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


# --------------------------------------------------------------------------------------------------- per item


@dataclass
class _Sources:
    """An item's reference forward: states at the source positions and the final logits of each prompt."""

    latent: dict[str, Tensor]  # source position -> [L, d]
    random: dict[str, Tensor]
    explicit: Tensor | None  # A's hop2 at the bridge's last token, [L, d]
    logits: dict[str, Tensor]  # prompt kind -> [vocab]


def reference_runs(hooked: HookedModel, plans: Sequence[Plan]) -> list[_Sources]:
    """The items' reference forwards: their prompts read together in one batched forward (per item: the two-hop
    prompt, and where present the random item's, hop1, hop2 and the transfer prompt)."""
    prompts = [_reference_prompts(plan) for plan in plans]
    states, logits = read_states(hooked, [(ids, pos) for own in prompts for _, ids, pos in own])
    at = 0
    sources = []
    for plan, own in zip(plans, prompts):
        sources.append(_sources(plan, [k for k, _, _ in own], states[at : at + len(own)], logits[at : at + len(own)]))
        at += len(own)
    return sources


def _reference_prompts(plan: Plan) -> list[tuple[str, tuple[int, ...], list[int]]]:
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
    return prompts


def _sources(plan: Plan, kinds: list[str], states: Tensor, logits: Tensor) -> _Sources:
    a = plan.a

    def positions(kind: str, enc: Encoded) -> dict[str, Tensor]:
        row = states[kinds.index(kind)]
        names = (["e1_last"] if enc.e1_position is not None else []) + ["last"]
        return {name: row[k] for k, name in enumerate(names)}

    explicit = states[kinds.index("hop2"), 0] if a.hop2 and a.hop2_position is not None else None
    return _Sources(positions("two_hop", a), positions("random", plan.r) if "random" in kinds else {}, explicit,
                    dict(zip(kinds, logits)))


def reference_states(plan: Plan, sources: _Sources) -> dict[tuple[tuple[int, ...], int], Tensor]:
    """The states of A's own prompts that its reference forward read, as ``(token ids, position) -> [L, d]``
    (float32 copies: the alignment reads the same prompts at the same positions,
    :func:`~probes.memory.alignment.read_at`)."""
    a = plan.a
    states = {(a.two_hop, len(a.two_hop) - 1): sources.latent["last"]}
    if a.e1_position is not None:
        states[(a.two_hop, a.e1_position)] = sources.latent["e1_last"]
    if sources.explicit is not None:
        states[(a.hop2, a.hop2_position)] = sources.explicit
    return {key: state.float().clone() for key, state in states.items()}


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


def lens_rows(hooked: HookedModel, chunk: Sequence[tuple[Plan, _Sources]]) -> list[dict[str, Any]]:
    """Logit-lens ranks of the bridge (and the answer) read from the states the decoding patches, for a chunk of
    items in one unembedding pass (:func:`~probes.readouts.lens.token_ranks`)."""
    reads = []  # (plan, condition, source position, metric, state [L, d], token)
    for plan, sources in chunk:
        a = plan.a
        reads += [(plan, "latent", pos, "bridge_rank", state, a.bridge) for pos, state in sources.latent.items()]
        reads.append((plan, "latent", "last", "answer_rank", sources.latent["last"], a.answer))
        if sources.explicit is not None:
            reads.append((plan, "explicit", "bridge", "bridge_rank", sources.explicit, a.bridge))
    if not reads:
        return []
    states = torch.stack([state for *_, state, _ in reads])  # [R, L, d]
    tokens = torch.tensor([token for *_, token in reads])[:, None].expand(states.shape[:-1])
    ranks = lens.token_ranks(hooked, states, tokens).tolist()
    return [_row("lens", plan, condition, metric, float(r), source_id=plan.a.item.id, source_position=pos,
                 source_layer=layer)
            for (plan, condition, pos, metric, _, _), per_layer in zip(reads, ranks) for layer, r in enumerate(per_layer)]


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
