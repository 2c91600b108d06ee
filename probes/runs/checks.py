"""Checks on the inputs that need the tokenizer, run after it loads and before any forward pass."""

from __future__ import annotations

from typing import Any, Sequence

from bridgeprobe.prompts.schema import PromptItem


def context_window(model: Any) -> int | None:
    """The longest input the model's positions cover (``max_position_embeddings`` / ``n_positions``), if known."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(model: Any, tokenizer: Any, items: Sequence[PromptItem]) -> None:
    """Stop with an error naming the item and field when a prompt does not fit the model's context window (GPT-2
    style models would fail with an IndexError in the middle of the run)."""
    limit = context_window(model)
    if limit is None:
        return
    for item in items:
        for field in ("two_hop", "hop1", "hop2"):
            text = getattr(item, field)
            if text is None:
                continue
            length = len(tokenizer(text)["input_ids"])
            if length > limit:
                raise ValueError(f"item {item.id!r}: field {field!r} is {length} tokens, longer than the model's "
                                 f"context window of {limit} tokens; shorten it or leave the item out")
