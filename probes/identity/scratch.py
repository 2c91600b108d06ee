"""From-scratch models on token-level synthetic two-hop data: does identity supervision enable OOD composition?

Two models read a query as one token per entity and relation (``e1 r1 r2``) and predict the target at the last
position:

- ``gpt2``: a small GPT-2 built from a :class:`transformers.GPT2Config` (no dropout, optionally untied
  unembedding, learned positions);
- ``emb_mlp``: the simplified embedding + MLP model. The state starts as the head entity's embedding and each
  relation token updates it with one shared residual MLP, ``h <- h + MLP(h + E[r])``; logits are ``U h``. Hop 2
  of a two-hop query is the same MLP applied to the state hop 1 produced, so composition works exactly when that
  state lands where the bridge's own embedding is: the alignment the paper predicts, isolated.

Knobs: ``init_scale`` (multiplies the default initialization's standard deviation; small = the condensed,
low-rank regime), ``weight_decay`` (AdamW, on weight matrices only), the data ratio ``identity_repeat`` (copies of
the identity examples in the training set). Measured over training: loss, one-hop, ID two-hop, OOD two-hop and
identity accuracy (greedy over the whole vocabulary at the last position); the alignment of the hidden state of
``(e1, r1)`` with that of ``e2`` per pair of layers (:func:`alignment`); singular values / nuclear norms of the
weight matrices (:func:`weight_stats`).

Training is deterministic and resumable: the batch of step ``s`` is a function of the seed and ``s`` only (one
permutation per epoch from a seeded generator), and checkpoints (``torch.save`` of tensors and plain values, read
back with ``weights_only=True``, written atomically) hold the model, the optimizer, the step and the loss
accumulated since the last evaluation, so a run killed at any point and resumed ends bit-identical to an
uninterrupted one (tested).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor, nn

from bridgeprobe.probes.io.results import atomic_write
from bridgeprobe.prompts.synthetic import Example, Splits, token_vocab

MODELS = ("gpt2", "emb_mlp")
CONDITIONS = ("no_identity", "identity")
PAD = "<pad>"
T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    """One from-scratch training run (the condition and seed are given separately)."""

    model: str = "gpt2"
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    d_mlp: int = 256
    tie_embeddings: bool = True
    residual: bool = True  # emb_mlp: h <- h + MLP(h + E[r]) (True) or h <- MLP(h + E[r]) (False)
    init_scale: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    steps: int = 3000
    warmup: int = 100
    eval_every: int = 100
    checkpoint_every: int = 500
    identity_repeat: int = 1
    eval_limit: int = 1000  # examples per evaluation split (a fixed random subset when larger)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.checkpoint_every % self.eval_every or self.steps % self.eval_every:
            raise ValueError("steps and checkpoint_every must be multiples of eval_every (a checkpoint follows an "
                             "evaluation, and the last step is evaluated)")
        if min(self.steps, self.batch_size, self.eval_every, self.identity_repeat) < 1 or self.init_scale <= 0:
            raise ValueError("steps, batch_size, eval_every, identity_repeat and init_scale must be positive")


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class Encoded:
    """Examples as right-padded token ids ``[N, T]``, their lengths ``[N]`` and target ids ``[N]``."""

    ids: Tensor
    lengths: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: Tensor) -> Encoded:
        index = index.to(self.ids.device)
        return Encoded(self.ids[index], self.lengths[index], self.targets[index])

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(self.ids.to(device), self.lengths.to(device), self.targets.to(device))


class Vocab:
    """Token ids of the token-level rendering: every entity and relation of the splits, then a padding token."""

    def __init__(self, splits: Splits) -> None:
        self.tokens = token_vocab(splits) + [PAD]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad = self.index[PAD]

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, examples: Sequence[Example], width: int = 3) -> Encoded:
        ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        lengths = torch.zeros(len(examples), dtype=torch.long)
        for n, example in enumerate(examples):
            tokens = [self.index[t] for t in example.tokens()]
            ids[n, : len(tokens)] = torch.tensor(tokens)
            lengths[n] = len(tokens)
        targets = torch.tensor([self.index[e.target] for e in examples], dtype=torch.long)
        return Encoded(ids, lengths, targets)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of the training batch of ``step`` (0-based): epoch ``e`` is a permutation drawn from a generator
    seeded with ``(seed, e)``, cut into ``n // batch_size`` batches. A function of its arguments only, so a resumed
    run sees the same batches as an uninterrupted one."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)[k * batch_size : (k + 1) * batch_size]


def fixed_subsets(sources: dict[str, Sequence[T]], limit: int, seed: int) -> dict[str, list[T]]:
    """At most ``limit`` items of each named set: a random subset fixed by ``seed`` and the set's position, in
    the set's order (the one sampling rule of every evaluation split, from scratch and fine-tuned)."""
    out = {}
    for n, (name, items) in enumerate(sources.items()):
        items = list(items)
        if len(items) > limit:
            keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919 * n))[:limit]
            items = [items[i] for i in sorted(keep.tolist())]
        out[name] = items
    return out


def eval_sets(splits: Splits, vocab: Vocab, limit: int, seed: int) -> dict[str, Encoded]:
    """The evaluation splits (:func:`fixed_subsets` of at most ``limit`` examples each): one-hop facts, ID and OOD
    two-hop test queries, the trained two-hop queries and the identity examples."""
    sources = {"one_hop": splits.examples["one_hop"], "id_two_hop": splits.examples["id_test"],
               "ood_two_hop": splits.examples["ood_test"], "train_two_hop": splits.examples["two_hop_train"],
               "identity": splits.examples["identity"]}
    return {name: vocab.encode(examples) for name, examples in fixed_subsets(sources, limit, seed).items()}


# ---------------------------------------------------------------------------------------------------- models


class EmbMLP(nn.Module):
    """``h_0 = E[head]``; ``h_t = h_{t-1} + MLP(h_{t-1} + E[relation_t])`` (``residual``; without it
    ``h_t = MLP(h_{t-1} + E[relation_t])``, so a hop's output is the next hop's whole input); logits ``U h_last``
    (``U = E^T`` when tied). One shared two-layer ReLU MLP does every hop."""

    def __init__(self, vocab_size: int, d_model: int, d_mlp: int, tie: bool, init_scale: float,
                 residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.embed = nn.Embedding(vocab_size, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        std = init_scale / math.sqrt(d_model)  # init_scale 1: unit-scale embeddings and LeCun-scale layers
        for weight in (self.embed.weight, self.mlp[0].weight, self.unembed.weight):
            nn.init.normal_(weight, std=std)
        nn.init.normal_(self.mlp[2].weight, std=init_scale / math.sqrt(d_mlp))
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)
        if tie:
            self.unembed.weight = self.embed.weight

    def states(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[1, B, T, d]``: the state after each position (padding positions keep the last real state)."""
        h = self.embed(ids[:, 0])
        out = [h]
        for t in range(1, ids.shape[1]):
            step = self.mlp(h + self.embed(ids[:, t])) + (h if self.residual else 0)
            h = torch.where((t < lengths)[:, None], step, h)
            out.append(h)
        return torch.stack(out, 1)[None]

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        states = self.states(ids, lengths)[0]
        return self.unembed(states[torch.arange(len(ids)), lengths - 1])


class GPT2Scratch(nn.Module):
    """A GPT-2 from :class:`transformers.GPT2Config`, read out at each query's last position."""

    def __init__(self, vocab_size: int, config: TrainConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt_config = GPT2Config(
            vocab_size=vocab_size, n_positions=4, n_embd=config.d_model, n_layer=config.n_layer,
            n_head=config.n_head, n_inner=config.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            initializer_range=0.02 * config.init_scale, tie_word_embeddings=config.tie_embeddings,
            bos_token_id=None, eos_token_id=None,
        )
        self.gpt = GPT2LMHeadModel(gpt_config)

    def states(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[n_layer + 1, B, T, d]``: the embeddings, then each block's output (the last one after ``ln_f``, as
        HF returns it)."""
        return torch.stack(self.gpt(input_ids=ids, output_hidden_states=True).hidden_states)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        logits = self.gpt(input_ids=ids).logits
        return logits[torch.arange(len(ids)), lengths - 1]


def run_name(config: TrainConfig, condition: str, seed: int) -> str:
    """The name of one run of a grid: its checkpoint file's stem and the ``run`` column of its tables."""
    return (f"{config.model}_init{config.init_scale:g}_wd{config.weight_decay:g}_rep{config.identity_repeat}"
            f"_{condition}_seed{seed}")


def build_model(config: TrainConfig, vocab_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if config.model == "gpt2":
        return GPT2Scratch(vocab_size, config)
    return EmbMLP(vocab_size, config.d_model, config.d_mlp, config.tie_embeddings, config.init_scale,
                  config.residual)


def weight_matrices(model: nn.Module) -> dict[str, Tensor]:
    """The 2-D weights whose spectra matter: embeddings, attention and MLP projections, unembedding (once if tied)."""
    seen: set[int] = set()
    out = {}
    for name, param in model.named_parameters():
        if param.ndim == 2 and id(param) not in seen and "wpe" not in name:
            seen.add(id(param))
            out[name.removeprefix("gpt.")] = param.detach()
    return out


# -------------------------------------------------------------------------------------------------- measures


@torch.no_grad()
def evaluate(model: nn.Module, sets: dict[str, Encoded], batch: int = 1024) -> dict[str, float]:
    """Greedy accuracy (argmax over the whole vocabulary) and mean loss on each set: ``<name>_acc``, ``<name>_loss``."""
    model.eval()
    out = {}
    for name, data in sets.items():
        if len(data) == 0:
            out[f"{name}_acc"] = out[f"{name}_loss"] = float("nan")
            continue
        correct, loss = 0, 0.0
        for start in range(0, len(data), batch):
            part = data.take(torch.arange(start, min(start + batch, len(data))))
            logits = model(part.ids, part.lengths)
            correct += int((logits.argmax(-1) == part.targets).sum())
            loss += float(nn.functional.cross_entropy(logits, part.targets, reduction="sum"))
        out[f"{name}_acc"] = correct / len(data)
        out[f"{name}_loss"] = loss / len(data)
    model.train()
    return out


ALIGNMENT_COLUMNS = ("bridges", "query_layer", "bridge_layer", "cos_bridge", "cos_other", "top1")


@torch.no_grad()
def alignment(model: nn.Module, splits: Splits, vocab: Vocab, limit: int = 500, seed: int = 0) -> list[dict]:
    """How close the hidden state of ``(e1, r1)`` is to the hidden state of its bridge ``e2``, per pair of layers.

    Query state: the last position of ``[e1, r1]`` after layer ``query_layer``; bridge state: the position of
    ``e2`` in a sequence that starts with ``e2`` (as hop 2 reads it), after ``bridge_layer`` (0 = embeddings). Each
    set is centred (its mean removed: positions and relation tokens add shared offsets), then ``cos_bridge`` is
    the mean cosine with the correct bridge, ``cos_other`` the mean with the other bridges, and ``top1`` the share
    of queries whose nearest bridge (by cosine) is the correct one (chance: 1 / number of bridges). ``bridges``:
    the rows cover the queries of every bridge (``all``) and, under the bridge-level OOD split, those whose bridge
    is an OOD bridge (``ood``: never a latent bridge in training, where the identity task should matter) or not
    (``id``)."""
    model.eval()
    facts = [e for e in splits.examples["one_hop"] if e.task == "hop1"]
    if len(facts) > limit:
        keep = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[:limit]
        facts = [facts[i] for i in sorted(keep.tolist())]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    queries = vocab.encode(facts, width=2).to(device)
    query_states = model.states(queries.ids, queries.lengths)[:, :, 1].float().cpu()  # [S, Q, d]
    bridge_ids = torch.tensor([[vocab.index[b], vocab.pad] for b in splits.bridges], device=device)
    lengths = torch.ones(len(splits.bridges), dtype=torch.long, device=device)
    bridge_states = model.states(bridge_ids, lengths)[:, :, 0].float().cpu()  # [S, N, d]
    truth = torch.tensor([splits.bridges.index(e.target) for e in facts])
    held_out = torch.tensor([e.target in set(splits.ood_bridges) for e in facts])
    subsets = {"all": torch.ones_like(held_out)}
    if held_out.any():
        subsets.update({"id": ~held_out, "ood": held_out})
    rows = []
    for lq in range(query_states.shape[0]):
        q = nn.functional.normalize(query_states[lq] - query_states[lq].mean(0), dim=-1)
        for lb in range(bridge_states.shape[0]):
            b = nn.functional.normalize(bridge_states[lb] - bridge_states[lb].mean(0), dim=-1)
            cos = q @ b.T  # [Q, N]
            correct = cos[torch.arange(len(truth)), truth]
            other = (cos.sum(1) - correct) / max(1, cos.shape[1] - 1)
            hit = (cos.argmax(1) == truth).float()
            for name, keep in subsets.items():
                rows.append({"bridges": name, "query_layer": lq, "bridge_layer": lb,
                             "cos_bridge": float(correct[keep].mean()), "cos_other": float(other[keep].mean()),
                             "top1": float(hit[keep].mean())})
    model.train()
    return rows


WEIGHT_COLUMNS = ("weight", "nuclear_norm", "frobenius_norm", "effective_rank", "top_singular_value")


@torch.no_grad()
def weight_stats(model: nn.Module) -> tuple[list[dict], list[dict]]:
    """Per weight matrix: nuclear and Frobenius norm, effective rank (exp of the entropy of the normalized singular
    values) and the largest singular value; and the full spectra as ``(weight, index, singular_value)`` rows."""
    stats, spectra = [], []
    for name, weight in weight_matrices(model).items():
        sv = torch.linalg.svdvals(weight.float())
        p = sv / sv.sum()
        entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
        stats.append({"weight": name, "nuclear_norm": float(sv.sum()), "frobenius_norm": float(sv.norm()),
                      "effective_rank": math.exp(entropy), "top_singular_value": float(sv[0])})
        spectra.extend({"weight": name, "index": i, "singular_value": float(v)} for i, v in enumerate(sv))
    return stats, spectra


# -------------------------------------------------------------------------------------------------- training

METRIC_COLUMNS = ("step", "train_loss", "lr", "one_hop_acc", "id_two_hop_acc", "ood_two_hop_acc",
                  "train_two_hop_acc", "identity_acc", "one_hop_loss", "id_two_hop_loss", "ood_two_hop_loss")


@dataclass
class RunResult:
    """The final metrics of a run and whether it was resumed from a checkpoint."""

    final: dict[str, float]
    resumed_from: int | None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain values) with ``torch.save``, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True`` (no pickled code)."""
    return torch.load(path, map_location=device, weights_only=True)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))


def train(
    splits: Splits,
    config: TrainConfig,
    *,
    identity: bool,
    seed: int,
    checkpoint: Path | None = None,
    on_eval: Callable[[dict[str, Any], list[dict], list[dict]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    interrupt_at: int | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, RunResult]:
    """Train one model (``identity``: with the identity examples) and return it with its final metrics.

    Every ``eval_every`` steps (and at step 0) ``on_eval(metrics, alignment_rows, weight_rows)`` receives the
    metrics row (:data:`METRIC_COLUMNS`), :func:`alignment` rows and :func:`weight_stats` rows. With ``checkpoint``
    the run resumes from that file when it exists (same config, condition and seed, else an error) and saves it
    every ``checkpoint_every`` steps and at the end. ``interrupt_at`` raises KeyboardInterrupt after that many
    steps, to simulate a kill in tests. ``progress(n)`` is called after each step with the number of steps done.
    ``device``: where to train (``cuda`` on GPU hosts; resuming there is exact only with deterministic kernels).
    """
    vocab = Vocab(splits)
    data = vocab.encode(splits.training(identity, config.identity_repeat)).to(device)
    sets = {name: part.to(device) for name, part in eval_sets(splits, vocab, config.eval_limit, seed).items()}
    model = build_model(config, len(vocab), seed).to(device)
    optimizer = _optimizer(model, config)
    identity_key = {"config": asdict(config), "identity": identity, "seed": seed,
                    "data": json.dumps(splits.summary(), sort_keys=True)}
    step, loss_sum, resumed = 0, torch.zeros((), dtype=torch.float64, device=device), None
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, device)
        if json.loads(state["key"]) != json.loads(json.dumps(identity_key)):
            raise ValueError(f"{checkpoint} belongs to another run (config, condition, seed or data differ)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, loss_sum, resumed = int(state["step"]), state["loss_sum"], int(state["step"])
        if state["done"]:
            return model, RunResult(state["final"], resumed)

    def measure() -> dict[str, float]:
        scores = evaluate(model, sets)
        row = {"step": step, "train_loss": float(loss_sum) / config.eval_every if step else float("nan"),
               "lr": optimizer.param_groups[0]["lr"] if step else 0.0,
               **{k: scores[k] for k in METRIC_COLUMNS if k in scores}}
        if on_eval is not None:
            on_eval(row, alignment(model, splits, vocab, seed=seed), weight_stats(model)[0])
        return row

    def save(done: bool, final: dict | None = None) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"key": json.dumps(identity_key), "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "step": step, "loss_sum": loss_sum,
                               "done": done, "final": final or {}})

    model.train()
    row = measure() if step == 0 else None
    while step < config.steps:
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.take(batch_indices(len(data), config.batch_size, seed, step))
        loss = nn.functional.cross_entropy(model(batch.ids, batch.lengths), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum = loss_sum + loss.detach().double()
        step += 1
        if progress is not None:
            progress(step)
        if step % config.eval_every == 0:
            row = measure()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            if step % config.checkpoint_every == 0 and step < config.steps:
                save(done=False)
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt(f"interrupted at step {step}")
    final = row if row is not None else measure()
    save(done=True, final=final)
    return model, RunResult(final, resumed)
