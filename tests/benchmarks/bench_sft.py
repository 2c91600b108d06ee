"""Forward and backward of one optimizer batch of Ma et al.'s recipe (``reversal-sft``): the plain batch forward vs
:func:`weighted_loss`.

The plain path is the recipe written directly (how the loss was computed before): one forward of the padded
batch, logits at every position, cross-entropy on the answer tokens. :func:`weighted_loss` runs the batch's shared
prefix (the chat template's header) once and computes logits only where an answer token is predicted. Both
compute loss and gradients of the same model on the same batches, alternating, in one process; reported: the
seconds of forward + backward per step (median), their ratio, and the largest loss and gradient differences.

    python tests/benchmarks/bench_sft.py [--model smollm2-135m] [--form ocr] [--batches 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Sequence

import torch
from torch import Tensor, nn

from bridgeprobe.probes.identity.chat_sft import Encoded, _batch, encode_chat, weighted_loss
from bridgeprobe.probes.model.load import load_model
from bridgeprobe.prompts.couples import FORMS, load_couples, training_set


def plain_loss(model: nn.Module, rows: Sequence[Encoded], pad_id: int) -> Tensor:
    """The reference: the padded batch's full forward, logits everywhere."""
    ids, mask, labels = _batch(rows, pad_id, next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    tokens = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                         ignore_index=-100, reduction="none").view(target.shape)
    weights = torch.tensor([r.weight for r in rows], device=ids.device)
    return (tokens.sum(1) / (target != -100).sum(1) * weights / weights.mean()).mean()


def step(model: nn.Module, loss_fn, rows: Sequence[Encoded], pad_id: int) -> tuple[float, float, Tensor]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = loss_fn(model, rows, pad_id)
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--form", choices=FORMS, default="ocr")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.requires_grad_(True).train()
    rows = [encode_chat(tokenizer, e.instruction, e.output, e.weight)
            for e in training_set(args.form, load_couples())]
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    seconds: dict[str, list[float]] = {"plain": [], "shared_prefix": []}
    loss_diff = grad_diff = grad_rel = 0.0
    for b in range(args.batches):
        batch = rows[b * args.batch_size: (b + 1) * args.batch_size]
        t_plain, loss_plain, grad_plain = step(model, plain_loss, batch, pad_id)
        t_fast, loss_fast, grad_fast = step(model, weighted_loss, batch, pad_id)
        seconds["plain"].append(t_plain)
        seconds["shared_prefix"].append(t_fast)
        loss_diff = max(loss_diff, abs(loss_plain - loss_fast))
        grad_diff = max(grad_diff, float((grad_plain - grad_fast).abs().max()))
        grad_rel = max(grad_rel, float((grad_plain - grad_fast).norm() / grad_plain.norm()))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({"model": args.model, "form": args.form, "batch_size": args.batch_size,
                      "threads": args.threads, "batches": args.batches,
                      "seconds_per_step": {k: round(v, 2) for k, v in median.items()},
                      "ratio": round(median["plain"] / median["shared_prefix"], 2),
                      "max_abs_loss_diff": loss_diff, "max_abs_grad_diff": grad_diff,
                      "max_rel_grad_diff": grad_rel}, indent=2))


if __name__ == "__main__":
    main()
