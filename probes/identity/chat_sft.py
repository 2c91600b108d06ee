"""Full-parameter supervised fine-tuning on chat turns with per-example loss weights: Ma et al.'s recipe.

The recipe of "Breaking the reversal curse ... via identity bridge" (their ``scripts/train_husband_wife.sh`` and
LLaMA-Factory fork), written for any HF causal LM with a chat template:

- each example is the tokenizer's own chat template applied to ``[user: instruction, assistant: output]``; the
  loss covers only what follows the prompt (the template with the generation prompt): the answer and the
  template's end of turn;
- per-example loss weights: each example's loss is its mean token cross-entropy times ``w_i / mean(w)`` over its
  optimizer batch, averaged over the batch (their per-sample weighting: at equal weights, plain SFT);
- data in file order, no shuffling, consecutive batches of ``batch_size`` examples (the last one of an epoch may
  be shorter), ``epochs`` passes;
- AdamW (betas 0.9, 0.95; weight decay on the matrices, none on norm weights and biases, as HF's Trainer),
  constant learning rate after a linear warmup over ``ceil(warmup_ratio * steps)`` steps, where update ``k``
  (0-based) uses ``lr * min(1, k / warmup)`` (the Trainer's schedule: the first update has rate 0); fp32.

Scoring is at entity level and equals greedy decoding: a question counts as answered with entity ``X`` when
every token of ``X``'s spelling in the answer is the model's argmax given the previous ones (teacher forcing on
the answer = greedy generation of it) and the next argmax token does not continue the word (``Catherine`` vs
``Catherinee``). Training resumes from ``checkpoint`` bit-identically (model, optimizer, step).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from bridgeprobe.probes.io.results import atomic_write
from bridgeprobe.probes.model.hooks import cache_kwarg


@dataclass(frozen=True)
class SFTConfig:
    """Their defaults: 250 epochs, batch 30, AdamW lr 6e-4, weight decay 0.3, betas (0.9, 0.95), 3% warmup."""

    epochs: int = 250
    batch_size: int = 30
    lr: float = 6e-4
    weight_decay: float = 0.3
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_ratio: float = 0.03
    eval_every: int = 250  # optimizer steps between evaluations (and the last step)
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.eval_every, self.checkpoint_every) < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size, eval_every, checkpoint_every and lr must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")

    def steps(self, n_examples: int) -> int:
        return self.epochs * math.ceil(n_examples / self.batch_size)

    def warmup(self, n_examples: int) -> int:
        return math.ceil(self.warmup_ratio * self.steps(n_examples))


@dataclass(frozen=True)
class Encoded:
    """One chat turn as token ids: ``ids`` (prompt then answer), ``prompt`` (its length) and the loss weight."""

    ids: tuple[int, ...]
    prompt: int
    weight: float


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_chat(tokenizer: Any, instruction: str, output: str, weight: float = 1.0) -> Encoded:
    """The chat template applied to the turn; the prompt is the template with the generation prompt, which must be
    a prefix of the full turn (else the template is unfit for SFT, an error)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; this recipe trains chat turns")
    user = [{"role": "user", "content": instruction}]
    prompt = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": output}], tokenize=True))
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError(f"the chat template's prompt is not a prefix of the full turn for {instruction!r}")
    return Encoded(tuple(full), len(prompt), float(weight))


def _batch(rows: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        labels[i, r.prompt: len(r.ids)] = torch.tensor(r.ids[r.prompt:])
    return ids.to(device), mask.to(device), labels.to(device)


def weighted_loss(model: nn.Module, rows: Sequence[Encoded], pad_id: int) -> Tensor:
    """``mean_i (w_i / mean(w)) * mean token cross-entropy of example i's answer`` over the batch ``rows``.

    Computed as the full batch forward would, with two savings that change only float rounding (tested against
    the plain forward, loss and gradients): the rows' common prefix (the chat template's system and user header,
    the same in every example) runs once, as one row whose keys and values every row then attends to (gradients
    flow back through them), and the logits are computed only at the positions that predict an answer token. On
    SmolLM2-135M with Ma et al.'s batch of 30 a step costs 0.4x the plain forward's (tests/benchmarks/bench_sft.py)."""
    device = next(model.parameters()).device
    ids, mask, labels = _batch(rows, pad_id, device)
    shared = _common_prefix(rows)
    kwargs: dict[str, Any] = {}
    if shared:
        prefix = DynamicCache()  # no config: sliding-window layers keep every prefix position too
        model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): prefix})
        kwargs = {"use_cache": True, cache_kwarg(model): DynamicCache(ddp_cache_data=[
            (layer.keys.expand(len(rows), -1, -1, -1), layer.values.expand(len(rows), -1, -1, -1))
            for layer in prefix.layers])}
    target = labels[:, shared + 1:]  # the token each position of the rest predicts
    keep = (target != -100).any(0).nonzero()[:, 0]
    logits = model(input_ids=ids[:, shared:], attention_mask=mask, logits_to_keep=keep,
                   position_ids=torch.arange(shared, ids.shape[1], device=device)[None], **kwargs).logits
    target = target[:, keep]
    tokens = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                         ignore_index=-100, reduction="none").view(target.shape)
    per_example = tokens.sum(1) / (target != -100).sum(1)
    weights = torch.tensor([r.weight for r in rows], device=device)
    return (per_example * weights / weights.mean()).mean()


def _common_prefix(rows: Sequence[Encoded]) -> int:
    """Length of the token prefix all ``rows`` share, ending before the first position that predicts an answer
    token (so every such position lies after it)."""
    limit = min(r.prompt for r in rows) - 1
    first = rows[0].ids
    return next((i for i in range(limit) if any(r.ids[i] != first[i] for r in rows)), max(limit, 0))


def optimizer_for(model: nn.Module, config: SFTConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of two or more dimensions (matrices and embeddings), none on norm
    weights and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=config.lr, betas=(config.beta1, config.beta2))


@torch.no_grad()
def entity_correct(model: nn.Module, tokenizer: Any, questions: Sequence[tuple[str, str]],
                   batch: int = 32) -> list[bool]:
    """For each ``(instruction, entity)``: whether greedy decoding after the chat prompt spells ``entity`` as a
    whole word (module docstring)."""
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    out: list[bool] = []
    for start in range(0, len(questions), batch):
        part = questions[start: start + batch]
        rows, spans = [], []
        for question, name in part:
            turn = encode_chat(tokenizer, question, name)
            answer = list(turn.ids[turn.prompt:])
            k = next((k for k in range(1, len(answer) + 1)
                      if tokenizer.decode(answer[:k]).strip().startswith(name)), None)
            if k is None:
                raise ValueError(f"the chat template does not spell {name!r} at the start of the answer")
            rows.append(turn)
            spans.append(k)
        ids, mask, _ = _batch(rows, pad_id, device)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for i, (turn, k) in enumerate(zip(rows, spans)):
            first = turn.prompt
            wanted = torch.tensor(turn.ids[first: first + k], device=device)
            spelled = bool((predicted[i, first - 1: first - 1 + k] == wanted).all())
            following = tokenizer.decode([int(predicted[i, first - 1 + k])])
            out.append(spelled and not (following[:1].isalnum()))
    return out


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, key: str,
               loss_sum: float) -> None:
    buffer = io.BytesIO()
    torch.save({"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "loss_sum": loss_sum}, buffer)
    atomic_write(path, buffer.getvalue())


def train_chat(model: nn.Module, tokenizer: Any, examples: Sequence[Encoded], config: SFTConfig, *, key: str,
               checkpoint: Path | None = None,
               on_eval: Callable[[dict[str, float]], None] | None = None,
               progress: Callable[[int], None] | None = None, interrupt_at: int | None = None) -> int:
    """Train ``model`` in place on ``examples`` (in order, no shuffling) with the recipe of the module docstring.
    ``on_eval(row)`` gets ``step``, ``epoch``, ``lr`` and the mean weighted training loss since the last evaluation
    every ``eval_every`` steps and after the last. With ``checkpoint`` the run resumes from that file when it holds
    the same ``key`` (else an error) and saves it every ``checkpoint_every`` steps. Returns the steps resumed
    from (0 for a fresh run)."""
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    optimizer = optimizer_for(model, config)
    per_epoch = math.ceil(len(examples) / config.batch_size)
    total, warmup = config.steps(len(examples)), config.warmup(len(examples))
    step, loss_sum, resumed = 0, 0.0, 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=next(model.parameters()).device, weights_only=True)
        if state["key"] != key:
            raise ValueError(f"{checkpoint} belongs to another run (model, data or settings differ)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, loss_sum, resumed = int(state["step"]), float(state["loss_sum"]), int(state["step"])
    model.train()
    while step < total:
        lr = config.lr * min(1.0, step / warmup) if warmup else config.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        k = step % per_epoch
        loss = weighted_loss(model, examples[k * config.batch_size: (k + 1) * config.batch_size], pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        step += 1
        if progress is not None:
            progress(step)
        if step % config.eval_every == 0 or step == total:
            if on_eval is not None:
                since = step - ((step - 1) // config.eval_every) * config.eval_every
                model.eval()
                on_eval({"step": step, "epoch": step / per_epoch, "lr": lr, "train_loss": loss_sum / since})
                model.train()
            loss_sum = 0.0
        if checkpoint is not None and (step % config.checkpoint_every == 0 or step == total):
            save_state(checkpoint, model, optimizer, step, key, loss_sum)
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt(f"interrupted at step {step}")
    model.eval()
    return resumed
