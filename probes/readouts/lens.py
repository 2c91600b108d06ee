"""Logit-lens bridge probe: per prompt and layer, how readable the bridge and the answer are.

Conventions (docs/conventions.md):
- a prompt is tokenized as ``tokenizer(text)`` does by default (special tokens included), so the last layer
  agrees with the model's own next-token prediction;
- a target's tokens are those it gets in context, after the prompt and a space
  (:func:`probes.model.targets.target_ids`); ``token_id`` is the first of them;
- ``layer`` l in ``0..L-1`` is the output of block l (``resid_post``) read through the final norm, the
  unembedding and the model's own logit scaling (:meth:`probes.model.hooks.HookedModel.readout`); the last layer is
  the model's own logits;
- ``rank`` is 0-based over the whole vocabulary: the number of tokens with a strictly larger logit;
- ``whole_logprob`` scores a multi-token target as a whole: the model's own log-probability of all its tokens,
  each given the prompt ids and the target ids before it (so, on the last layer's rows only; empty elsewhere).
  For a one-token target it equals ``logprob``;
- target ``control`` (two-hop prompts): a matched control entity scored exactly like the bridge, the bridge of
  the item's ``pair`` partner or else another bridge of the same composition, used by about as many items and
  never starting with the bridge's first token (:func:`control_bridges`);
- ``target_flags``: why a first-token score may be ambiguous, ``;``-joined among ``shared_first_token`` (the
  first token starts >= 2 distinct entities of the set), ``same_as_answer`` (the bridge's, or control's, first
  token is the answer's in the two-hop prompt) and ``short_token`` (at most 2 characters once stripped); "" for
  none (:func:`flag_queries`).

Queries that share a token sequence (the same prompt, single-token targets) share one forward pass, and each
layer is read out only where it is scored, so the unembedding (large for big vocabularies) stays cheap.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

from bridgeprobe.probes.model.hooks import HookedModel, pad_right
from bridgeprobe.probes.model.targets import is_short, target_ids
from bridgeprobe.prompts.schema import PromptItem

# Which target each prompt kind is scored on: the two-hop prompt on both and on a control entity; the one-hop
# prompts as controls.
PROBES = (("two_hop", "bridge"), ("two_hop", "answer"), ("two_hop", "control"), ("hop1", "bridge"),
          ("hop2", "answer"))
FLAGS = ("shared_first_token", "same_as_answer", "short_token")

COLUMNS = (
    "prompt_id", "prompt_kind", "target", "layer", "position", "n_prompt_tokens", "prompt_token", "token_id",
    "target_token", "rank", "prob", "logit", "logprob", "whole_logprob", "n_target_tokens", "target_flags",
)


@dataclass(frozen=True)
class LensQuery:
    """One (prompt, target) to probe: e.g. the two-hop prompt of item ``prompt_id`` scored on its bridge."""

    prompt_id: str
    prompt_kind: str
    target: str
    prompt: str
    target_text: str
    flags: str | None = None  # target_flags, set by flag_queries (None: not computed)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.prompt_id, self.prompt_kind, self.target)


def control_bridges(items: Sequence[PromptItem], tokenizer: Any = None) -> dict[str, str]:
    """Item id -> its control entity: the bridge of its ``pair`` partner when that is in the set and differs from
    its own bridge. Otherwise another bridge, from the same composition (``r1>r2``), else the same ``r1``, else the
    whole set: never one whose first token is the bridge's (in the two-hop prompt's context with a ``tokenizer``,
    else the first word, case-folded: "United Kingdom" for "United States" would force a difference of 0), and
    among the rest the one used by the most similar number of items of the set (a frequent bridge is easier to
    surface than a rare one); ties go to the next bridge after the item's own in sorted order, cyclically. Where no
    bridge of the set has another first token (a character-level tokenizer), the first rule is dropped. Items with
    no other bridge anywhere get none."""
    by_id = {item.id: item for item in items}
    frequency = Counter(item.bridge for item in items)
    groups: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for item in items:
        groups[("composition", item.composition)].add(item.bridge)
        groups[("r1", item.r1)].add(item.bridge)
        groups[("set", None)].add(item.bridge)

    def first(item: PromptItem, entity: str) -> Any:
        if tokenizer is None:
            return entity.split()[0].casefold() if entity.split() else entity
        return target_ids(tokenizer, item.two_hop, entity)[0]

    controls = {}
    for item in items:
        partner = by_id.get(item.pair) if item.pair else None
        if partner is not None and partner.bridge != item.bridge:
            controls[item.id] = partner.bridge
            continue
        own = first(item, item.bridge)
        keys = [k for k in (("composition", item.composition), ("r1", item.r1), ("set", None))
                if k[1] is not None or k[0] == "set"]
        # a tokenizer whose every entity starts with the same token (a character-level one) leaves no candidate
        # anywhere: then the nearest group's bridges are taken anyway (and the lens flags them shared_first_token)
        for key, distinct in [*((k, True) for k in keys), *((k, False) for k in keys)]:
            others = [b for b in groups[key] - {item.bridge} if not distinct or first(item, b) != own]
            if others:
                controls[item.id] = min(others, key=lambda b: (abs(frequency[b] - frequency[item.bridge]),
                                                               b < item.bridge, b))
                break
    return controls


def lens_queries(items: Sequence[PromptItem], tokenizer: Any = None) -> list[LensQuery]:
    """The queries for a prompt set: every probe in :data:`PROBES` whose prompt (and control) the item has; with a
    ``tokenizer``, their ``target_flags`` too (:func:`flag_queries`)."""
    controls = control_bridges(items, tokenizer)
    queries = []
    for item in items:
        for kind, target in PROBES:
            prompt = getattr(item, kind)
            text = controls.get(item.id) if target == "control" else getattr(item, target)
            if prompt is not None and text is not None:
                queries.append(LensQuery(item.id, kind, target, prompt, text))
    return flag_queries(queries, tokenizer) if tokenizer is not None else queries


def flag_queries(queries: Sequence[LensQuery], tokenizer: Any) -> list[LensQuery]:
    """The queries with their ``target_flags`` (module docstring): ``shared_first_token`` when another entity
    string of these queries starts with the same token (each in its own prompt), ``same_as_answer`` on an item's
    bridge rows (every prompt kind) when bridge and answer start alike in its two-hop prompt and on its control
    row when the control starts like that answer, ``short_token`` for a first token of at most 2 characters."""
    first = {q.key: target_ids(tokenizer, q.prompt, q.target_text)[0] for q in queries}
    owners: dict[int, set[str]] = defaultdict(set)
    for q in queries:
        owners[first[q.key]].add(q.target_text)
    two_hop = {(q.prompt_id, q.target): first[q.key] for q in queries if q.prompt_kind == "two_hop"}
    flagged = []
    for q in queries:
        token = first[q.key]
        answer = two_hop.get((q.prompt_id, "answer"))
        entity = two_hop.get((q.prompt_id, "control" if q.target == "control" else "bridge"))
        on = {"shared_first_token": len(owners[token]) >= 2,
              "same_as_answer": answer is not None and entity == answer,
              "short_token": is_short(tokenizer, token)}
        flags = [name for name in FLAGS if on[name]]
        flagged.append(replace(q, flags=";".join(flags)))
    return flagged


READOUT_BUDGET = 1 << 27  # logits computed per unembedding call (float32: 512 MiB)
# logits per unembedding call of token_ranks: its peak is ~3x their bytes (the readout's temporaries and the
# comparison); at 512 MiB per call Gemma 3's 262,144-token vocabulary added 1.7 GB, at 128 MiB 0.4 GB, in 5% more time
RANK_BUDGET = 1 << 25


def _vocab_size(hooked: HookedModel) -> int:
    return int(hooked.model.get_output_embeddings().weight.shape[0])


def token_ranks(hooked: HookedModel, hidden: torch.Tensor, token: int | torch.Tensor) -> torch.Tensor:
    """Logit-lens rank of ``token`` (the number of tokens with a strictly larger logit) for each residual vector
    of ``hidden`` (``[..., d]``; ``token``: one id, or one per vector, ``[...]``), unembedding at most
    :data:`RANK_BUDGET` logits at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    tokens = torch.as_tensor(token).expand(hidden.shape[:-1]).reshape(-1, 1)
    rows = max(1, RANK_BUDGET // _vocab_size(hooked))
    ranks = []
    for chunk, own in zip(flat.split(rows), tokens.split(rows)):
        logits = hooked.readout(chunk).float()
        ranks.append((logits > logits.gather(1, own.to(logits.device))).sum(-1))
    return torch.cat(ranks).reshape(hidden.shape[:-1])


@dataclass(frozen=True)
class _Encoded:
    query: LensQuery
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def sequence(self) -> tuple[int, ...]:
        """What is run: the prompt plus all but the last target token (for the whole-string score)."""
        return tuple(self.prompt_ids + self.target_ids[:-1])


def _encode(tokenizer: Any, query: LensQuery) -> _Encoded:
    return _Encoded(query, list(tokenizer(query.prompt)["input_ids"]),
                    target_ids(tokenizer, query.prompt, query.target_text))


@torch.no_grad()
def lens_batch(hooked: HookedModel, queries: Sequence[LensQuery], *, all_positions: bool = False) -> list[dict]:
    """Lens rows (see :data:`COLUMNS`) for a batch of queries, from one batched forward pass."""
    tokenizer = hooked.tokenizer
    encoded = [_encode(tokenizer, q) for q in queries]
    sequences = list(dict.fromkeys(e.sequence for e in encoded))
    seq_of = torch.tensor([sequences.index(e.sequence) for e in encoded])
    input_ids, mask = pad_right(sequences)
    # gathered positions per sequence: the lens positions (the last prompt token, or every prompt token), then
    # the positions inside the target that only the whole-string score needs
    n_lens = max(len(e.prompt_ids) for e in encoded) if all_positions else 1
    n_extra = max(len(e.target_ids) for e in encoded) - 1
    positions = torch.zeros((len(sequences), n_lens + n_extra), dtype=torch.long)
    for e, s in zip(encoded, seq_of.tolist()):
        last = len(e.prompt_ids) - 1
        lens = list(range(last + 1)) if all_positions else [last]
        positions[s, n_lens - len(lens) : n_lens] = torch.tensor(lens)  # right-aligned: the last one at n_lens-1
        positions[s, n_lens : n_lens + len(e.target_ids) - 1] = torch.arange(last + 1, last + len(e.target_ids))
    layers = range(hooked.n_layers)
    result = hooked.run(input_ids, mask, read=[("resid_post", l) for l in layers], positions=positions, logits=False)
    first = torch.tensor([e.target_ids[0] for e in encoded])
    stats = []  # per layer: rank, logit, logprob of each query's first target token, [Q, n_lens] on the CPU
    # several layers per unembedding call: the weight is read once per chunk instead of once per layer
    chunk = max(1, READOUT_BUDGET // max(1, len(sequences) * n_lens * _vocab_size(hooked)))
    readout_device = result.acts[("resid_post", layers[-1])].device  # blocks may sit on several devices
    for start in range(0, len(layers), chunk):
        block = torch.stack([result.acts[("resid_post", l)][:, :n_lens].to(readout_device)
                             for l in layers[start : start + chunk]])
        logits = hooked.readout(block).float()  # [layers, S, n_lens, vocab]
        logits = logits[:, seq_of.to(logits.device)]  # [layers, Q, n_lens, vocab]: each query reads its sequence
        index = first.to(logits.device)[None, :, None, None].expand(*logits.shape[:3], 1)
        chosen = logits.gather(-1, index)[..., 0]
        rank = (logits > chosen[..., None]).sum(-1)
        logprob = chosen - logits.logsumexp(-1)
        stats.extend(zip(rank.cpu(), chosen.cpu(), logprob.cpu()))
        del logits
    whole = _whole_logprob(hooked, result.acts[("resid_post", layers[-1])][:, n_lens:], encoded, seq_of,
                           stats[-1][2][:, -1])
    return _rows(tokenizer, encoded, stats, whole, all_positions)


def _whole_logprob(hooked: HookedModel, extra: torch.Tensor, encoded: list[_Encoded], seq_of: torch.Tensor,
                   first_logprob: torch.Tensor) -> list[float]:
    """Final-layer log-probability of each query's whole target string."""
    totals = first_logprob.tolist()
    if extra.shape[1] == 0:
        return totals
    logprobs = hooked.readout(extra).float().log_softmax(-1).cpu()
    for q, (e, s) in enumerate(zip(encoded, seq_of.tolist())):
        for j, token in enumerate(e.target_ids[1:]):
            totals[q] += float(logprobs[s, j, token])
    return totals


def _rows(tokenizer: Any, encoded: list[_Encoded], stats: list[tuple[torch.Tensor, ...]], whole: list[float],
          all_positions: bool) -> list[dict]:
    rows = []
    last_layer = len(stats) - 1
    for q, e in enumerate(encoded):
        n = len(e.prompt_ids)
        positions = range(n) if all_positions else [n - 1]
        n_lens = stats[0][0].shape[1]
        base = {
            "prompt_id": e.query.prompt_id, "prompt_kind": e.query.prompt_kind, "target": e.query.target,
            "n_prompt_tokens": n, "token_id": e.target_ids[0], "target_token": tokenizer.decode([e.target_ids[0]]),
            "n_target_tokens": len(e.target_ids), "target_flags": e.query.flags,
        }
        tokens = {p: tokenizer.decode([e.prompt_ids[p]]) for p in positions}
        for layer, (rank, logit, logprob) in enumerate(stats):
            for p in positions:
                k = n_lens - n + p  # lens positions are right-aligned, the last prompt token at n_lens - 1
                lp = float(logprob[q, k])
                rows.append({
                    **base, "layer": layer, "position": p, "prompt_token": tokens[p], "rank": int(rank[q, k]),
                    "prob": math.exp(lp), "logit": float(logit[q, k]), "logprob": lp,
                    "whole_logprob": whole[q] if layer == last_layer and p == n - 1 else None,
                })
    return rows


def batches(queries: Sequence[LensQuery], tokenizer: Any, batch_size: int) -> Iterator[list[LensQuery]]:
    """Queries in batches of similar prompt length (less padding), longest first so memory peaks early."""
    ordered = sorted(queries, key=lambda q: -len(tokenizer(q.prompt)["input_ids"]))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


DEFAULT_BATCH_SIZE = 16  # queries per forward on the CPU, where memory is rarely the limit
MAX_AUTO_BATCH = 256


def lens_memory(hooked: HookedModel, n_queries: int, n_tokens: int, *, n_sequences: int | None = None,
                all_positions: bool = False, n_extra: int = 0) -> int:
    """Estimated peak bytes that one :func:`lens_batch` call adds to the weights, for ``n_queries`` queries on
    ``n_sequences`` distinct sequences (default: as many) of up to ``n_tokens`` tokens, ``n_extra`` of them target
    tokens read only for the whole-string score. With ``e`` bytes per activation, ``d`` the model width, ``I`` the
    MLP width, ``H`` heads, ``L`` blocks, ``V`` the vocabulary, ``T = n_tokens``, ``K`` lens positions (1, or
    ``T`` with ``all_positions``), ``S`` sequences and ``Q`` queries:

    - forward, per sequence: ``e*T*(6d + 3I) + (4 + e)*H*T^2`` (one block's widest activations; attention scores
      as eager attention keeps them) plus the kept reads ``e*L*(K + n_extra)*d``;
    - readout: ``12*Q*K*V*c`` (fp32 logits of ``c`` layers per unembedding call, gathered per query, and the
      temporaries of the rank and log-sum-exp; ``c = min(L, READOUT_BUDGET // (S*K*V))``, at least 1) plus
      ``10*S*n_extra*V`` for the whole-string score.

    An upper bound by design (checked against measured peaks in tests/benchmarks/bench_scale.py)."""
    from bridgeprobe.probes.readouts.heads import n_heads

    config = hooked.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, n_layers, vocab = hooked.d_model, hooked.n_layers, _vocab_size(hooked)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    e = hooked.model.get_input_embeddings().weight.element_size()
    sequences = n_queries if n_sequences is None else n_sequences
    lens_positions = n_tokens if all_positions else 1
    forward = e * n_tokens * (6 * d + 3 * inner) + (4 + e) * n_heads(hooked) * n_tokens**2
    reads = e * n_layers * (lens_positions + n_extra) * d
    layers_per_call = min(n_layers, max(1, READOUT_BUDGET // max(1, sequences * lens_positions * vocab)))
    readout = 12 * n_queries * lens_positions * vocab * layers_per_call + 10 * sequences * n_extra * vocab
    return sequences * (forward + reads) + readout


def free_memory(hooked: HookedModel) -> int | None:
    """Bytes free for activations on the model's fullest GPU (free device memory plus what PyTorch holds cached
    but unused); None when the model has no parameter on a GPU."""
    devices = {p.device for p in hooked.model.parameters() if p.device.type == "cuda"}
    if not devices:
        return None
    return min(torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
               for dev in devices)


def auto_batch_size(hooked: HookedModel, queries: Sequence[LensQuery], *, all_positions: bool = False,
                    free_bytes: int | None = None, fraction: float = 0.5) -> int:
    """Queries per :func:`lens_batch` call: the most (up to :data:`MAX_AUTO_BATCH`) whose :func:`lens_memory`
    fits in ``fraction`` of ``free_bytes`` (default: :func:`free_memory`), sized for the longest query; without a
    GPU, :data:`DEFAULT_BATCH_SIZE`. Three queries share a sequence at most (a two-hop prompt's bridge, answer and
    control), so a batch of ``Q`` queries is costed as ``Q`` sequences for the forward and ``ceil(Q/3)`` for the
    readout (fewer sequences let more layers into one unembedding call)."""
    free = free_memory(hooked) if free_bytes is None else free_bytes
    if free is None or not queries:
        return DEFAULT_BATCH_SIZE
    encoded = [_encode(hooked.tokenizer, q) for q in queries]
    n_tokens = max(len(e.sequence) for e in encoded)
    n_extra = max(len(e.target_ids) for e in encoded) - 1
    budget = fraction * free
    for size in range(MAX_AUTO_BATCH, 1, -1):
        forward = lens_memory(hooked, size, n_tokens, all_positions=all_positions, n_extra=n_extra)
        readout = lens_memory(hooked, size, n_tokens, n_sequences=-(-size // 3), all_positions=all_positions,
                              n_extra=n_extra)
        if max(forward, readout) <= budget:
            return size
    return 1
