"""LoRA identity fine-tuning of a pretrained causal LM on natural-language synthetic two-hop facts.

The model learns made-up facts ("Thaesha Tryrchaerk was born in Flythstead.", "The mayor of Flythstead is ...")
rendered by :mod:`prompts.synthetic`: every one-hop fact, the trained two-hop queries, and, in the ``identity``
condition, the zero-hop identity sentences ("The town Flythstead is called Flythstead."). Both conditions start
from the same base model, the same LoRA initialization (same seed) and see the same number of steps; the loss is
the cross-entropy of the target tokens (the answer and the final period) only.

One :class:`peft.PeftModel` holds the base model and one adapter per condition: ``set_adapter(name)`` gives an
adapted model, ``with model.disable_adapter():`` the base model, so the logit lens and patching
(:func:`probes.runs.pipeline.run_lens` / :func:`~probes.runs.pipeline.run_patching`) run on base and adapted weights from
one object (:func:`model_state`). LoRA's B matrices start at zero, so an untrained adapter is the base model
exactly (tested against plain HF logits).

GPU hosts: ``quantize="4bit"`` loads the base in 4-bit nf4 (bitsandbytes) and prepares it with
``peft.prepare_model_for_kbit_training`` (QLoRA). Training always goes through an
:class:`accelerate.Accelerator`; under ``accelerate launch --num_processes N`` each process takes every N-th row
of each batch and DDP averages the gradients, so the batches, and the data order, are those of one process (one
condition per launch; only the main process writes files).

Resume: per condition, a checkpoint (``torch.save`` of the LoRA weights, the optimizer state, the step and the
loss accumulated since the last evaluation; loaded with ``weights_only=True``) every ``checkpoint_every`` steps;
the batch of step ``s`` depends only on the seed and ``s`` (:func:`probes.identity.scratch.batch_indices`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from bridgeprobe.probes.identity.scratch import batch_indices, fixed_subsets, load_checkpoint, save_checkpoint
from bridgeprobe.probes.model.targets import target_ids

BASE = "base"


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA and optimization settings of one fine-tuning run (per condition)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"  # peft's shorthand: every linear layer but the output head; or a comma list
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    steps: int = 128
    warmup: int = 10
    eval_every: int = 32
    checkpoint_every: int = 32
    identity_repeat: int = 4
    eval_limit: int = 32  # examples per evaluation split
    layers: int = 0  # adapt only the last N blocks (0: all); backward then stops at the first adapted block

    def __post_init__(self) -> None:
        if self.checkpoint_every % self.eval_every or self.steps % self.eval_every:
            raise ValueError("steps and checkpoint_every must be multiples of eval_every")
        if min(self.rank, self.steps, self.batch_size, self.eval_every, self.identity_repeat) < 1:
            raise ValueError("rank, steps, batch_size, eval_every and identity_repeat must be positive")
        if self.layers < 0:
            raise ValueError(f"layers must be 0 (all blocks) or positive, got {self.layers}")

    def lora(self, model: nn.Module) -> Any:
        """The peft config for ``model``; with :attr:`layers`, its target modules are named one by one: the linear
        layers (all, or those of :attr:`target_modules`) inside the last ``layers`` blocks."""
        from peft import LoraConfig

        targets: str | list[str] = self.target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if self.layers:
            n_layers = model.config.num_hidden_layers
            if self.layers > n_layers:
                raise ValueError(f"cannot adapt the last {self.layers} blocks of a {n_layers}-block model")
            blocks = next(name for name, m in model.named_modules()
                          if isinstance(m, nn.ModuleList) and len(m) == n_layers)
            chosen = tuple(f"{blocks}.{i}." for i in range(n_layers - self.layers, n_layers))
            linear = [name.removesuffix(".base_layer") for name, m in model.named_modules()  # a wrapped layer
                      if isinstance(m, nn.Linear) and ".lora_" not in name]  # (an earlier adapter's) own weights
            targets = [name for name in linear if name.startswith(chosen)
                       and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------------ data


def encode_texts(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of ``prompt + " " + target + "."``: the prompt tokenized as the lens does
    (``tokenizer(prompt)``), then the tokens the target and period get after it
    (:func:`probes.model.targets.target_ids`); labels are -100 on the prompt so only the target is learned."""
    out = []
    for prompt, target in pairs:
        head = list(tokenizer(prompt)["input_ids"])
        tail = target_ids(tokenizer, prompt, target + ".")
        out.append((head + tail, [-100] * len(head) + tail))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask, position_ids)``: every sequence ends at the last column, so the
    logits of the last positions alone (``logits_to_keep``) cover every row, and the output head, large for big
    vocabularies, runs on a few positions instead of all; positions count real tokens only."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def target_loss(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the label tokens of ``rows`` (from :func:`encode_texts`), from one left-padded
    forward that computes logits only for the positions that predict a label."""
    ids, mask, positions = left_pad([r[0] for r in rows], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (_, row_labels) in enumerate(rows):
        labels[i, ids.shape[1] - len(row_labels):] = torch.as_tensor(row_labels)
    keep = int((labels != -100).sum(1).max()) + 1  # the label positions and the one before the first label
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=keep).logits[:, :-1].float()
    targets = labels[:, -(keep - 1):].to(device)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TextTask(Protocol):
    """What an adapter learns and is scored on: :class:`prompts.synthetic_text.TwoHopTexts` or
    :class:`prompts.reversal.ReversalData`."""

    def training(self, identity: bool, identity_repeat: int = 1) -> list[tuple[str, str]]: ...

    def eval_sets(self) -> dict[str, list[tuple[str, str]]]: ...

    def summary(self) -> dict[str, Any]: ...


def eval_pairs(task: TextTask, limit: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, target) pairs per evaluation split of ``task``, at most ``limit`` each (:func:`fixed_subsets`)."""
    return fixed_subsets(task.eval_sets(), limit, seed)


def metric_columns(task: TextTask) -> tuple[str, ...]:
    """The learning-curve columns of ``task``: step, loss, learning rate and one accuracy per evaluation split."""
    return ("step", "train_loss", "lr", *(f"{name}_acc" for name in task.eval_sets()))


@torch.no_grad()
def item_scores(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                batch_size: int = 16) -> list[tuple[bool, bool]]:
    """Per (prompt, target): whether the greedy next token is the target's first token after the prompt
    (:func:`probes.model.targets.target_ids`; the lens's notion of answered), and whether greedy decoding reproduces
    every token of the target (teacher-forced argmax at each target position: the whole entity)."""
    device = model.get_input_embeddings().weight.device
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        heads = [list(tokenizer(p)["input_ids"]) for p, _ in chunk]
        tails = [target_ids(tokenizer, p, t) for p, t in chunk]
        ids, mask, positions = left_pad([h + t for h, t in zip(heads, tails)], _pad_id(tokenizer))
        keep = max(len(t) for t in tails) + 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits
        greedy = logits.argmax(-1).cpu()  # [B, keep]: column j predicts the token at width - keep + j + 1
        for row, tail in enumerate(tails):
            predicted = greedy[row, keep - 1 - len(tail) : keep - 1].tolist()
            scores.append((predicted[0] == tail[0], predicted == tail))
    return scores


def accuracy(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> float:
    """Share of prompts whose greedy next token is the first token of the target (:func:`item_scores`); NaN for an
    empty set."""
    if not pairs:
        return float("nan")
    return sum(first for first, _ in item_scores(model, tokenizer, pairs, batch_size)) / len(pairs)


# ---------------------------------------------------------------------------------------------------- models


def load_base(spec: str, *, quantize: str | None = None, dtype: str = "float32", device: str | None = None,
              device_map: str | None = None) -> tuple[nn.Module, Any]:
    """The base model for fine-tuning (:func:`probes.model.load.load_model`); with ``quantize`` (4bit/8bit, GPU hosts)
    prepared for k-bit training (QLoRA)."""
    from bridgeprobe.probes.model.load import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device, device_map=device_map, quantize=quantize)
    if quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def add_adapter(model: nn.Module, name: str, config: FinetuneConfig, seed: int) -> Any:
    """Add a fresh LoRA adapter ``name`` (initialized from ``seed``; B = 0) and make it the active one. ``model`` is
    a plain HF model (wrapped into a PeftModel) or a PeftModel that already holds other adapters."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    lora = config.lora(model.get_base_model() if isinstance(model, PeftModel) else model)
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora)
        model.set_adapter(name)
        return model
    return get_peft_model(model, lora, adapter_name=name)


@contextmanager
def model_state(peft_model: Any, state: str) -> Iterator[None]:
    """Run the block with the base weights (``state == "base"``: LoRA disabled) or with adapter ``state``."""
    if state == BASE:
        with peft_model.disable_adapter():
            yield
    else:
        peft_model.set_adapter(state)
        yield


def inner_model(peft_model: Any) -> nn.Module:
    """The HF model inside a PeftModel (its LoRA layers follow the active adapter / disable_adapter)."""
    return peft_model.get_base_model()


# -------------------------------------------------------------------------------------------------- training

def _lora_state(peft_model: Any, adapter: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}


def train_adapter(
    peft_model: Any,
    adapter: str,
    tokenizer: Any,
    task: TextTask,
    config: FinetuneConfig,
    *,
    identity: bool,
    seed: int,
    checkpoint: Path | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    accelerator: Any = None,
    interrupt_at: int | None = None,
) -> dict[str, Any]:
    """Train adapter ``adapter`` (already added, e.g. by :func:`add_adapter`) on the condition's sentences of
    ``task`` and return the final metrics row. ``on_eval(row)`` gets a :func:`metric_columns` row at step 0 and every
    ``eval_every`` steps. With ``checkpoint``, resumes from it when it exists and saves it every
    ``checkpoint_every`` steps and at the end. ``accelerator``: an :class:`accelerate.Accelerator` (one is made
    when None). ``interrupt_at`` raises KeyboardInterrupt after that step (tests)."""
    from accelerate import Accelerator
    from peft import set_peft_model_state_dict

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the {world} processes")
    peft_model.set_adapter(adapter)
    rows = encode_texts(tokenizer, task.training(identity, config.identity_repeat))
    sets = eval_pairs(task, config.eval_limit, seed)
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad and f".{adapter}." in n]
    if not params:
        raise ValueError(f"adapter {adapter!r} has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    key = {"config": asdict(config), "identity": identity, "seed": seed, "adapter": adapter, "data": task.summary()}
    step, loss_sum, final = 0, torch.zeros((), dtype=torch.float64), None
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        if state["key"] != _json(key):
            raise ValueError(f"{checkpoint} belongs to another run (config, condition, seed or data differ)")
        set_peft_model_state_dict(peft_model, state["lora"], adapter_name=adapter)
        optimizer.load_state_dict(state["optimizer"])
        step, loss_sum = int(state["step"]), state["loss_sum"]
        if state["done"]:
            return state["final"]
    model, optimizer = accelerator.prepare(peft_model, optimizer)
    device = accelerator.device
    pad_id = _pad_id(tokenizer)

    def measure() -> dict[str, Any]:
        peft_model.eval()
        row = {"step": step, "train_loss": float(loss_sum) / config.eval_every if step else float("nan"),
               "lr": optimizer.param_groups[0]["lr"] if step else 0.0}
        for name, pairs in sets.items():
            row[f"{name}_acc"] = accuracy(peft_model, tokenizer, pairs)
        peft_model.train()
        if on_eval is not None and accelerator.is_main_process:
            on_eval(row)
        return row

    def save(done: bool) -> None:
        if checkpoint is not None and accelerator.is_main_process:
            save_checkpoint(checkpoint, {"key": _json(key), "lora": _lora_state(peft_model, adapter),
                                         "optimizer": optimizer.state_dict(), "step": step, "loss_sum": loss_sum,
                                         "done": done, "final": final or {}})
        accelerator.wait_for_everyone()

    peft_model.train()
    if step == 0:
        final = measure()
    while step < config.steps:
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = batch_indices(len(rows), config.batch_size, seed, step)[rank::world]
        loss = target_loss(model, [rows[i] for i in index.tolist()], pad_id, device)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        loss_sum = loss_sum + loss.detach().double().cpu()
        step += 1
        if progress is not None:
            progress(step)
        if step % config.eval_every == 0:
            final = measure()
            loss_sum = torch.zeros((), dtype=torch.float64)
            if step % config.checkpoint_every == 0 and step < config.steps:
                save(done=False)
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt(f"interrupted at step {step}")
    peft_model.eval()
    save(done=True)
    return final


def _pad_id(tokenizer: Any) -> int:
    """The padding id (any id works: right padding is masked and never attended to by real tokens)."""
    return getattr(tokenizer, "pad_token_id", None) or 0


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def save_adapter(peft_model: Any, adapter: str, out_dir: Path, extra_files: Sequence[Path] = (),
                 base_model: str | None = None) -> Path:
    """Write adapter ``adapter`` as ``out_dir/<adapter>/adapter_model.safetensors`` + ``adapter_config.json``
    (peft's format, loadable with ``PeftModel.from_pretrained(base, path)``), with copies of ``extra_files`` (the
    data split) beside them. ``base_model`` (the model as the user named it) replaces the loaded model's own path
    in the config: for an embedded model that is a cache directory of this machine."""
    import shutil

    if base_model is not None:
        peft_model.peft_config[adapter].base_model_name_or_path = base_model
    peft_model.save_pretrained(str(out_dir), selected_adapters=[adapter], safe_serialization=True)
    # peft also writes out_dir/README.md, an empty model-card template naming the loaded model's path
    (out_dir / "README.md").unlink(missing_ok=True)
    # peft writes a non-default adapter into out_dir/<adapter>/
    target = out_dir / adapter
    for path in extra_files:
        shutil.copyfile(path, target / path.name)
    return target
