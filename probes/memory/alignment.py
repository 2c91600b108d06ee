"""Alignment of latent and explicit bridge states, per layer: is the bridge that hop 1 computes inside a two-hop
prompt represented like the bridge written out in a hop-2 prompt?

States (``resid_post`` of every block): *latent* = the two-hop prompt's last token (``source_position`` ``last``)
or e1's last token (``e1_last``); *explicit* = the hop2 prompt's state at the last token of the bridge it names.
States with a massive norm at a layer (:func:`typical`) are left out of that layer's statistics (``n_massive``
counts them): one such state among hundreds otherwise decides the CKA alone.

- ``cosine_*``: per item, cosine between its latent state and its own explicit state (``matched``) and the
  explicit state of its partner (same relation composition, another bridge: ``mismatched``), raw and
  ``centered`` (each set minus its mean over the analysed items: the large shared direction of the residual
  stream otherwise dominates every cosine).
- ``cka_*``: linear CKA (Kornblith et al. 2019) between the latent and the explicit state matrices, matched by
  item vs matched to the partners, with a 95% interval over items (grouped jackknife, :func:`jackknife_cka`). With
  fewer items than dimensions linear CKA is biased upward; the mismatched baseline carries the same bias.
- ``probe_*``: a multinomial logistic regression (standardized features, L2, L-BFGS) that classifies the bridge
  entity. ``probe_explicit_heldout`` is trained on the explicit states of neutral templates naming each bridge
  (:data:`TEMPLATES`) and tested on the hop2 prompts' explicit states (held-out contexts); ``probe_latent`` is
  trained on templates and the hop2 prompts of the *other* relations: for a test item with relations ``r1``,
  ``r2``, no hop2 prompt of ``r1`` or ``r2`` is in its probe's training set (one probe per relation set), so
  the probe cannot read the relation's template instead of the bridge; ``probe_latent_templates`` is the first
  probe tested on the latent states. Per item, 1 if correct; ``*_partner``: 1 if the probe names the partner's
  bridge instead (the matched control of the band test: under "the state does not tell the two bridges apart"
  own and partner are named equally often; NaN where the partner's bridge is not a class). The templates are
  there because the hop2 prompts alone give one to four contexts per bridge. Chance: ``chance_majority`` (the
  most frequent bridge among the items) and ``chance_uniform`` (1 / classes).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from torch import Tensor

from bridgeprobe.probes.model.hooks import HookedModel
from bridgeprobe.probes.model.states import read_states

TEMPLATES = ("Let me tell you about {}", "Here is a short note on {}", "Yesterday we talked about {}",
             "Q: What do you know about {}")
JACKKNIFE_GROUPS = 20
MASSIVE = 5.0  # a state whose norm exceeds this many times its set's median at its layer is left out
Z95 = 1.96
WEIGHT_DECAY = 1e-3
BATCH = 32


@torch.no_grad()
def read_at(hooked: HookedModel, prompts: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = BATCH,
            known: Mapping[tuple[tuple[int, ...], int], Tensor] | None = None) -> Tensor:
    """``resid_post`` of every block at the given positions of each prompt: ``[N, K, L, d]`` (float32, CPU; a
    shorter position list repeats its last entry up to the longest, ``K``), batched by length, so reading several
    positions of a prompt costs one forward. A prompt whose every position is in ``known`` (``(token ids,
    position) -> [L, d]``, states read before) is not run again."""
    width = max(len(positions) for _, positions in prompts)
    out: list[Tensor | None] = [None] * len(prompts)
    todo = []
    for i, (ids, positions) in enumerate(prompts):
        found = [known.get((tuple(ids), p)) for p in positions] if known else [None]
        if any(state is None for state in found):
            todo.append(i)
        else:
            out[i] = torch.stack([*found, *[found[-1]] * (width - len(found))]).float()
    order = sorted(todo, key=lambda i: len(prompts[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        padded = [(prompts[i][0], [*prompts[i][1], *[prompts[i][1][-1]] * (width - len(prompts[i][1]))]) for i in chunk]
        states, _ = read_states(hooked, padded)
        for i, state in zip(chunk, states.float()):
            out[i] = state
    return torch.stack(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``[n, d]`` arrays."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _centred_grams(x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``H X X' H`` and ``H Z Z' H`` (``H``: the centering matrix), as the Gram matrices of the centred rows."""
    x, z = x.astype(np.float64), z.astype(np.float64)
    x, z = x - x.mean(0), z - z.mean(0)
    return x @ x.T, z @ z.T


def linear_cka(x: np.ndarray, z: np.ndarray) -> float:
    """Linear CKA of two ``[n, d]`` representations of the same ``n`` inputs:
    ``<K_c, L_c> / (||K_c|| ||L_c||)`` with ``K_c``, ``L_c`` the centered Gram matrices."""
    return _cka(*_centred_grams(x, z))


def _cka(k: np.ndarray, l: np.ndarray) -> float:
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def jackknife_cka(x: np.ndarray, z: np.ndarray, rng: np.random.Generator, groups: int = JACKKNIFE_GROUPS,
                  ) -> tuple[float, float, float]:
    """:func:`linear_cka` and its 95% interval over items, ``(cka, low, high)``: grouped (delete-a-group) jackknife
    standard error, normal approximation, ``cka +- 1.96 se``. Items are split at random into ``groups`` groups and
    each is left out once.
    Not a bootstrap: a resample repeats items, which biases linear CKA upward.

    Every leave-one-group-out CKA comes from sums over the blocks of the full Gram matrices (:func:`_held_out_hsic`),
    not from recentring a Gram matrix per group: one pass over ``n^2`` entries instead of one per group."""
    gx, gz = _centred_grams(x, z)  # a shift leaves every CKA unchanged and keeps the sums below small
    labels = rng.permutation(len(x)) % min(groups, len(x))
    with np.errstate(invalid="ignore", divide="ignore"):  # no variance left: NaN
        values = _held_out_hsic(gx, gz, labels) / np.sqrt(_held_out_hsic(gx, gx, labels)
                                                            * _held_out_hsic(gz, gz, labels))
    n = len(values)
    se = float(np.sqrt((n - 1) / n * np.nansum((values - np.nanmean(values)) ** 2)))
    estimate = _cka(gx, gz)
    return estimate, estimate - Z95 * se, estimate + Z95 * se


def _held_out_hsic(k: np.ndarray, l: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per group ``g`` of ``labels``, ``<H K_S H, H L_S H>`` over the items ``S`` outside ``g`` (``H``: the
    centering matrix of ``S``), from ``tr(K_S L_S) - 2/m 1'K_S L_S 1 + 1/m^2 (1'K_S 1)(1'L_S 1)`` with each term
    the full sum less group ``g``'s rows and columns."""
    groups = int(labels.max()) + 1
    onehot = np.zeros((len(labels), groups))
    onehot[np.arange(len(labels)), labels] = 1.0
    m = len(labels) - onehot.sum(0)  # items left in S, per deleted group

    def left(blocks: np.ndarray) -> np.ndarray:  # sum over S x S of a matrix whose group block sums are ``blocks``
        return blocks.sum() - 2 * blocks.sum(1) + np.diag(blocks)

    k_by_group, l_by_group = k @ onehot, l @ onehot  # [n, G]: sum of a row over each group's columns
    k_rows = k_by_group.sum(1, keepdims=True) - k_by_group  # [n, G]: row sums over S (valid for rows in S)
    l_rows = l_by_group.sum(1, keepdims=True) - l_by_group
    outside = 1.0 - onehot  # [n, G]: 1 where the row is in S
    trace = left(onehot.T @ (k * l) @ onehot)
    cross = (k_rows * l_rows * outside).sum(0)
    return trace - 2 / m * cross + left(onehot.T @ k_by_group) * left(onehot.T @ l_by_group) / m ** 2


class LinearProbe:
    """Multinomial logistic regression on standardized features (training mean and standard deviation), with an
    L2 penalty ``weight_decay * ||W||^2`` on the mean cross-entropy, fitted by L-BFGS from zero, or from the
    function of ``start`` (a probe of the same classes on similar data: fewer iterations to the same optimum)."""

    def __init__(self, x: Tensor, y: Tensor, n_classes: int, *, weight_decay: float = WEIGHT_DECAY,
                 max_iter: int = 200, start: LinearProbe | None = None) -> None:
        x = x.double()
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        if start is None:
            weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64)
            bias = torch.zeros(n_classes, dtype=torch.float64)
        else:  # the same logits under this probe's standardization
            weight = start.weight * (self.std / start.std)
            bias = start.bias + ((self.mean - start.mean) / start.std) @ start.weight.T
        self.weight, self.bias = weight.requires_grad_(True), bias.requires_grad_(True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], lr=1, max_iter=max_iter,
                                      line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z @ self.weight.T + self.bias, y) + weight_decay * (self.weight ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()

    def logits(self, x: Tensor) -> Tensor:
        return ((x.double() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(-1)


@contextmanager
def fit_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads (default: torch's intra-op thread count) on which each probe fit runs on one
    thread. An L-BFGS fit is thousands of small vector operations: spread over intra-op threads, each waits at a
    barrier for a thread that a busy machine may have descheduled (a SmolLM2 probe fit took 168 s with two threads
    and 7.4 s with one while another job used the second core; docs/benchmarks.md). One thread per fit also makes
    a fit's arithmetic, and so its predictions, the same on every machine and thread count."""
    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers or previous)
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # an interrupted analysis does not wait for the layers not yet begun
        torch.set_num_threads(previous)


def typical(states: Tensor) -> Tensor:
    """``[N, L]``: which states have an ordinary norm at their layer, at most :data:`MASSIVE` times the median over
    the set. The others carry "massive activations" (the attention-sink phenomenon: a few positions whose residual
    norm is tens of times the rest) and would alone decide a CKA or a standardization."""
    norms = states.norm(dim=-1)
    return norms <= MASSIVE * norms.median(dim=0).values


def alignment_rows(hooked: HookedModel, plans: Sequence[Any], encoded: dict[str, Any], *, seed: int = 0,
                   workers: int | None = None, known: Mapping[tuple[tuple[int, ...], int], Tensor] | None = None,
                   ) -> list[dict]:
    """The alignment rows of ``memory.csv`` for the analysed items (``plans`` of :func:`probes.memory.plans.make_plans`),
    for the latent state at the two-hop prompt's last token and at e1's last token (``source_position``); one row
    ``(alignment, "", n_items)`` marks the analysis done even when no item qualifies. The layers' probes are fitted
    on ``workers`` threads (:func:`fit_pool`); ``known`` states (the items' reference forwards,
    :func:`probes.memory.rows.reference_states`) are not read again (:func:`read_at`)."""
    items = [p.a for p in plans if p.a.hop2_position is not None]
    rows: list[dict] = [_dataset_row("n_items", len(items))]
    if len(items) < 2:
        return rows
    partners = {e.item.id: encoded.get(e.item.pair) for e in items}
    partners = {k: p for k, p in partners.items()
                if p is not None and p.hop2_position is not None and p.item.bridge != encoded[k].item.bridge}
    classes = sorted({e.item.bridge for e in items})
    label = {b: i for i, b in enumerate(classes)}
    hop2 = {e.hop2: e for e in [*items, *partners.values()]}  # distinct explicit prompts
    hop2_list = list(hop2.values())
    template_prompts = []
    for bridge in classes:
        for template in TEMPLATES:
            ids = hooked.tokenizer(template.format(bridge))["input_ids"]
            template_prompts.append((ids, len(ids) - 1, label[bridge]))
    with_e1 = [i for i, e in enumerate(items) if e.e1_position is not None]
    # both latent positions of a two-hop prompt in one forward: [last, e1's last token] (or [last, last])
    two_hop = read_at(hooked, [(e.two_hop, [len(e.two_hop) - 1, *[p for p in [e.e1_position] if p is not None]])
                               for e in items], known=known)
    latent = {"last": (list(range(len(items))), two_hop[:, 0])}
    if with_e1:  # prompts whose e1 span could not be located have no e1 state
        latent["e1_last"] = (with_e1, two_hop[with_e1, 1])
    explicit_all = read_at(hooked, [(e.hop2, [e.hop2_position]) for e in hop2_list], known=known)[:, 0]
    templates = read_at(hooked, [(ids, [pos]) for ids, pos, _ in template_prompts])[:, 0]
    index = {e.hop2: i for i, e in enumerate(hop2_list)}
    own = np.array([index[e.hop2] for e in items])
    partner = np.array([index[partners[e.item.id].hop2] if e.item.id in partners else -1 for e in items])

    rng = np.random.default_rng(seed)
    y_items = torch.tensor([label[e.item.bridge] for e in items])
    y_templates = torch.tensor([lab for *_, lab in template_prompts])
    hop2_in_classes = torch.tensor([i for i, e in enumerate(hop2_list) if e.item.bridge in label])
    y_hop2 = torch.tensor([label[hop2_list[i].item.bridge] for i in hop2_in_classes.tolist()])
    y_partner = np.array([label.get(partners[e.item.id].item.bridge, -1) if e.item.id in partners else -1
                          for e in items])
    hop2_relation = [e.item.r2 for e in hop2_list]  # the relation each explicit (hop2) prompt is written in
    # an item's probe leaves out the hop2 prompts written in its relations; relations no hop2 prompt uses change
    # nothing, so items are grouped by the hop2 relations they share (fewer probes to fit)
    relations = [frozenset(r for r in (e.item.r1, e.item.r2) if r and r in hop2_relation) for e in items]
    groups = sorted(set(relations), key=sorted)
    counts = np.bincount(y_items.numpy(), minlength=len(classes))
    rows += [_dataset_row("n_classes", len(classes)), _dataset_row("chance_uniform", 1 / len(classes)),
             _dataset_row("chance_majority", counts.max() / counts.sum()),
             _dataset_row("n_train_templates", len(template_prompts)),
             _dataset_row("n_train_explicit", len(template_prompts) + len(hop2_in_classes))]
    ok_explicit, ok_templates = typical(explicit_all), typical(templates)
    ok_latent = {pos: typical(states) for pos, (_, states) in latent.items()}

    def fit(layer: int) -> tuple[LinearProbe, dict[frozenset, LinearProbe]]:
        train = ok_templates[:, layer]
        by_templates = LinearProbe(templates[train, layer], y_templates[train], len(classes))
        hop2_ok = hop2_in_classes[ok_explicit[hop2_in_classes, layer]]
        hop2_y = y_hop2[ok_explicit[hop2_in_classes, layer]]
        by_explicit = {}  # one probe per relation set of the test items, without the hop2 prompts of those relations
        for group in groups:
            other = torch.tensor([hop2_relation[int(i)] not in group for i in hop2_ok], dtype=torch.bool)
            by_explicit[group] = LinearProbe(torch.cat([templates[train, layer], explicit_all[hop2_ok[other], layer]]),
                                             torch.cat([y_templates[train], hop2_y[other]]), len(classes),
                                             start=by_templates)
        return by_templates, by_explicit

    layers = range(hooked.n_layers)
    with fit_pool(workers) as pool:
        fitted = pool.map(fit, layers)  # fitted ahead on the pool's threads, returned in layer order
        bar = tqdm(layers, desc="memory: alignment probes", unit="layer", leave=False)
        for layer, (by_templates, by_explicit) in zip(bar, fitted):
            rows += [_dataset_row("n_massive", float((~ok_explicit[:, layer]).sum() + (~ok_templates[:, layer]).sum()
                                                     + sum((~ok[:, layer]).sum() for ok in ok_latent.values())),
                                  layer)]
            explicit_ok = ok_explicit[own, layer].numpy()
            heldout = np.flatnonzero(explicit_ok)
            correct = (by_templates.predict(explicit_all[own[heldout], layer]) == y_items[heldout]).double().tolist()
            rows += [_item_row(items[i], "probe_explicit_heldout", layer, v, "") for i, v in zip(heldout, correct)]
            for pos, (which, states) in latent.items():
                which = np.array(which, dtype=int)
                ok = ok_latent[pos][:, layer].numpy()
                x_all = states[:, layer].numpy()
                tested = which[ok]
                explicit_guess = torch.empty(len(tested), dtype=torch.long)
                for group in groups:
                    mine = torch.tensor([relations[i] == group for i in tested], dtype=torch.bool)
                    if mine.any():
                        explicit_guess[mine] = by_explicit[group].predict(states[ok, layer][mine])
                for metric, guess in (("probe_latent", explicit_guess),
                                      ("probe_latent_templates", by_templates.predict(states[ok, layer]))):
                    correct = (guess == y_items[tested]).double().tolist()
                    named_partner = np.where(y_partner[tested] >= 0, (guess.numpy() == y_partner[tested]).astype(float),
                                             np.nan)
                    rows += [_item_row(items[i], metric, layer, v, pos) for i, v in zip(tested, correct)]
                    rows += [_item_row(items[i], f"{metric}_partner", layer, float(v), pos)
                             for i, v in zip(tested, named_partner) if not np.isnan(v)]
                z_all = explicit_all[:, layer].numpy()
                x_mean = x_all[ok].mean(0)
                z_mean = z_all[own[explicit_ok]].mean(0)
                for kind, targets in (("matched", own[which]), ("mismatched", partner[which])):
                    keep = ok & (targets >= 0)
                    keep[keep] &= ok_explicit[targets[keep], layer].numpy()
                    if keep.sum() < 1:
                        continue
                    x, z = x_all[keep], z_all[targets[keep]]
                    raw, centered = cosine(x, z), cosine(x - x_mean, z - z_mean)
                    for metric, values in ((f"cosine_{kind}", raw), (f"cosine_centered_{kind}", centered)):
                        rows += [_item_row(items[i], metric, layer, float(v), pos) for i, v in zip(which[keep], values)]
                    if keep.sum() >= 3:
                        cka, low, high = jackknife_cka(x, z, rng)
                        rows += [_dataset_row(f"cka_{kind}", cka, layer, pos),
                                 _dataset_row(f"cka_{kind}_ci_low", low, layer, pos),
                                 _dataset_row(f"cka_{kind}_ci_high", high, layer, pos)]
    return rows


def _item_row(encoded: Any, metric: str, layer: int, value: float, position: str) -> dict:
    return {"analysis": "alignment", "prompt_id": encoded.item.id, "condition": "", "source_id": "",
            "receiving_id": "", "source_position": position, "source_layer": layer, "target_layer": None,
            "metric": metric, "value": value}


def _dataset_row(metric: str, value: float, layer: int | None = None, position: str = "") -> dict:
    return {"analysis": "alignment", "prompt_id": "", "condition": "", "source_id": "", "receiving_id": "",
            "source_position": position, "source_layer": layer, "target_layer": None, "metric": metric,
            "value": value}
