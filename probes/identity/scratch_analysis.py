"""What the trained from-scratch models of a ``reproduce`` run do, item by item and under cross-prompt patching.

Reads a finished run whose final checkpoints were kept (``reproduce --keep-checkpoints``) and rebuilds each
model from its checkpoint and its seed's data files (both checked against the run's record). Two analyses:

- :func:`ood_items`: every OOD two-hop query's greedy answer, with its bridge and whether that bridge had an
  identity example (``covered``). Under ``identity_coverage`` < 1 this gives the paper's dose claim as a
  within-model contrast: accuracy through covered vs uncovered bridges of one model. The no-identity model of the
  same seed has the same ``covered`` flags (the same draw), so its contrast is a placebo that should be zero.
- :func:`cross_patch`: Sec. 4.1 of the paper. For a two-hop query ``(a, r1, r2)`` through bridge ``b`` with answer
  ``c``, the hidden state at ``r1`` of the one-hop prompt ``(a, r1)`` (after source layer ``s``) is written into
  the bridge position of a hop-2 prompt ``(b', r2)`` about another bridge ``b'`` (at target layer ``t``, replacing
  the residual stream entering that block), and the patched model's answer is read: ``transfer`` = it answers
  ``c`` = hop2(b, r2), the fact of the bridge the state came from; ``own`` = it still answers hop2(b', r2). Only
  items whose three facts the model knows (hop 1 of ``a``, hop 2 of ``b`` and of ``b'``) are counted, so the
  measure is about reading the state, not about missing facts. Source layers ``0..L`` (0 = embeddings, ``L`` =
  the last block's output before the final norm, the state that decodes to ``b``); target layers ``0..L-1``
  (writing after the last block cannot reach the next position). The paper reports that without identity the
  last-layer state written at the input "completely fails to decode c". Through the project's patching engine
  (:class:`probes.model.hooks.NativeHooks` on the GPT-2's HF modules). The Emb-MLP has no layers to choose: its hop 2
  reads only the state hop 1 produced, so this patch is its two-hop query itself, and it is skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from bridgeprobe.probes.model.hooks import NativeHooks, Patch
from bridgeprobe.probes.runs.rundir import RunDirError, read_run_record
from bridgeprobe.probes.identity.scratch import (TrainConfig, Vocab, build_model, fixed_subsets, load_checkpoint,
                                                 run_name)
from bridgeprobe.prompts.schema import PromptSetError
from bridgeprobe.prompts.synthetic import Example, Splits, load_splits

ITEM_COLUMNS = ("split", "head", "r1", "r2", "bridge", "target", "covered", "predicted", "correct")
PATCH_COLUMNS = ("split", "source_layer", "target_layer", "items", "transfer", "own")
PATCH_SPLITS = ("ood_test", "id_test")


@dataclass
class TrainedRun:
    """One trained model of a run with its keys (the ``results.csv`` columns that name it), data and vocabulary."""

    keys: dict[str, Any]
    splits: Splits
    vocab: Vocab
    model: nn.Module


def trained_runs(run_dir: Path) -> Iterator[TrainedRun]:
    """Every run of the finished ``reproduce`` directory ``run_dir``, rebuilt from its kept final checkpoint (whose
    record must match the run's config, condition, seed and data; a missing or unfinished one is an error that
    says to rerun with --keep-checkpoints)."""
    record = read_run_record(run_dir / "run.json")
    if record.get("command") != "reproduce" or record.get("status", "finished") != "finished":
        raise RunDirError(f"{run_dir} holds no finished reproduce run")
    settings = record["settings"]
    base = TrainConfig(**settings["train"])
    for seed in settings["seeds"]:
        try:
            splits, _ = load_splits(run_dir / "data" / f"seed{seed}")
        except PromptSetError as err:
            raise RunDirError(str(err)) from err
        vocab = Vocab(splits)
        for cell in settings["grid"]:
            config = replace(base, **cell)
            for condition in settings["conditions"]:
                name = run_name(config, condition, seed)
                path = run_dir / "checkpoints" / f"{name}.pt"
                if not path.is_file():
                    raise RunDirError(f"{path} is missing: rerun `bridgeprobe reproduce` for {run_dir} with "
                                      "--keep-checkpoints (the final models are deleted without it)")
                state = load_checkpoint(path)
                key = json.loads(state["key"])
                if not state["done"] or key["config"] != json.loads(json.dumps(asdict(config))) \
                        or key["identity"] != (condition == "identity") or key["seed"] != seed \
                        or json.loads(key["data"]) != json.loads(json.dumps(splits.summary())):
                    raise RunDirError(f"{path} is not the finished model of run {name} with {run_dir}'s data")
                model = build_model(config, len(vocab), seed)
                model.load_state_dict(state["model"])
                model.eval()
                keys = {"model": config.model, **cell, "condition": condition, "seed": seed}
                yield TrainedRun(keys, splits, vocab, model)


@torch.no_grad()
def _answers(model: nn.Module, vocab: Vocab, examples: Sequence[Example]) -> torch.Tensor:
    """Greedy token ids the model predicts after each example's tokens."""
    encoded = vocab.encode(examples)
    return model(encoded.ids, encoded.lengths).argmax(-1)


def ood_items(run: TrainedRun) -> pd.DataFrame:
    """Every OOD two-hop query (:data:`ITEM_COLUMNS`): its bridge, whether the bridge has an identity example in
    the data (``covered``; the same flags in both conditions), the predicted entity and whether it is the target."""
    examples = run.splits.examples["ood_test"]
    covered = {e.head for e in run.splits.examples["identity"]}
    predicted = _answers(run.model, run.vocab, examples).tolist()
    return pd.DataFrame([{"split": "ood_test", "head": e.head, "r1": e.relations[0], "r2": e.relations[1],
                          "bridge": e.bridge, "target": e.target, "covered": e.bridge in covered,
                          "predicted": run.vocab.tokens[p], "correct": run.vocab.tokens[p] == e.target}
                         for e, p in zip(examples, predicted)], columns=list(ITEM_COLUMNS))


def _receivers(splits: Splits, queries: Sequence[Example], seed: int) -> list[str]:
    """For each query, another bridge ``b'`` whose hop-2 answer under the query's ``r2`` differs from the query's
    answer (so transfer and own are told apart), drawn from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for q in queries:
        order = torch.randperm(len(splits.bridges), generator=generator).tolist()
        out.append(next((splits.bridges[i] for i in order if splits.bridges[i] != q.bridge
                         and splits.hop2[(splits.bridges[i], q.relations[1])] != q.target), ""))
    return out


@torch.no_grad()
def cross_patch(run: TrainedRun, limit: int = 400, seed: int = 0) -> pd.DataFrame:
    """Sec. 4.1's cross-prompt patch (module docstring) on at most ``limit`` queries per split of
    :data:`PATCH_SPLITS`: one row per split, source layer and target layer (:data:`PATCH_COLUMNS`) with the number
    of items whose three facts the model knows and the rates of ``transfer`` and ``own`` among them. Empty for
    the Emb-MLP."""
    if not hasattr(run.model, "gpt"):
        return pd.DataFrame(columns=list(PATCH_COLUMNS))
    splits, vocab = run.splits, run.vocab
    hooked = NativeHooks(run.model.gpt)
    n_layers = hooked.n_layers
    sources = {name: splits.examples[name] for name in PATCH_SPLITS}
    rows = []
    for split, queries in fixed_subsets(sources, limit, seed).items():
        receivers = _receivers(splits, queries, seed)
        queries = [q for q, r in zip(queries, receivers) if r]
        receivers = [r for r in receivers if r]
        hop1 = [Example("hop1", q.head, q.relations[:1], q.bridge) for q in queries]
        own_fact = [Example("hop2", r, q.relations[1:], splits.hop2[(r, q.relations[1])])
                    for q, r in zip(queries, receivers)]
        bridge_fact = [Example("hop2", q.bridge, q.relations[1:], q.target) for q in queries]
        known = torch.ones(len(queries), dtype=torch.bool)
        for facts in (hop1, own_fact, bridge_fact):
            if facts:
                known &= _answers(run.model, vocab, facts) == vocab.encode(facts).targets
        queries = [q for q, k in zip(queries, known.tolist()) if k]
        own_fact = [f for f, k in zip(own_fact, known.tolist()) if k]
        hop1 = [h for h, k in zip(hop1, known.tolist()) if k]
        if not queries:
            rows += [{"split": split, "source_layer": s, "target_layer": t, "items": 0, "transfer": float("nan"),
                      "own": float("nan")} for s in range(n_layers + 1) for t in range(n_layers)]
            continue
        source = vocab.encode(hop1)
        read = [("resid_pre", layer) for layer in range(n_layers)] + [("resid_post", n_layers - 1)]
        acts = hooked.run(source.ids[:, :2], read=read, positions=torch.ones(len(hop1), 1, dtype=torch.long),
                          logits=False).acts
        states = [acts[site][:, 0] for site in read]  # source layer s = index in read
        receiver = vocab.encode(own_fact)
        rows_index = torch.arange(len(queries))
        targets = torch.tensor([vocab.index[q.target] for q in queries])
        for s, state in enumerate(states):
            for t in range(n_layers):
                patch = Patch("resid_pre", t, rows_index, torch.zeros(len(queries), dtype=torch.long), state)
                logits = hooked.run(receiver.ids[:, :2], patches=[patch]).logits[:, 1]
                answer = logits.argmax(-1)
                rows.append({"split": split, "source_layer": s, "target_layer": t, "items": len(queries),
                             "transfer": float((answer == targets).float().mean()),
                             "own": float((answer == receiver.targets).float().mean())})
    return pd.DataFrame(rows, columns=list(PATCH_COLUMNS))


def analyse_run(run_dir: Path, limit: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`ood_items` and :func:`cross_patch` of every model of ``run_dir``, each row with its run's keys and
    the run's ``identity_coverage``: ``(items, patch)``."""
    coverage = read_run_record(run_dir / "run.json")["settings"]["data"].get("identity_coverage", 1.0)
    items, patch = [], []
    for run in trained_runs(run_dir):
        keys = {"cell": run_dir.name, "identity_coverage": coverage, **run.keys}
        items.append(ood_items(run).assign(**keys))
        patch.append(cross_patch(run, limit, seed=run.keys["seed"]).assign(**keys))
    return pd.concat(items, ignore_index=True), pd.concat(patch, ignore_index=True)

