"""A target's tokens in context: what the tokenizer produces for the target when it follows the prompt.

Every probe that scores, patches, decodes or trains on a target (a bridge, an answer, a made-up name) takes its
token ids from :func:`target_ids`, so that all of them agree with each other and with what the model would read
or write after the prompt. Tokenizing the target on its own (``tokenizer(" " + target)``) is wrong for
SentencePiece tokenizers with a dummy prefix (Llama-2, Mistral, TinyLlama): they prepend '▁' to the text, so
``" France"`` becomes ``['▁', '▁France']`` and every entity's first token is the whitespace piece.

Rules (see docs/conventions.md):

- the prompt and ``prompt + sep + target`` are tokenized without special tokens (a BOS the tokenizer adds in
  front of both changes nothing after it; the lens itself runs the prompt with them, ``tokenizer(prompt)``);
- the target's ids are the joint ids after the prompt's ids. Where the separator gets a token of its own (a
  character-level tokenizer, Llama-3's digits: ``' '`` then ``'198'``), it is part of the target: that is what
  the model must produce next. Such a whitespace-only first token is flagged ``short_token`` in the lens
  (:func:`is_short`);
- fallback, when the prompt's ids are not a prefix of the joint ids (the join merged tokens across the
  boundary, e.g. an empty ``sep``): the joint ids from the first position where they depart from the prompt's
  ids. The first of them then spans the end of the prompt too, and a warning says so.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SHORT_TOKEN_CHARS = 2  # a first token of at most this many characters (stripped) says little about the entity


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def target_ids(tokenizer: Any, prompt: str, target: str, sep: str = " ") -> list[int]:
    """Token ids of ``target`` as it follows ``prompt`` (joined by ``sep``): tokenize ``prompt + sep + target``
    and take what follows the prompt's tokens (fallback and conventions: module docstring)."""
    head = _plain_ids(tokenizer, prompt)
    joint = _plain_ids(tokenizer, prompt + sep + target)
    common = 0
    for a, b in zip(head, joint):
        if a != b:
            break
        common += 1
    if common < len(head):
        log.warning("the tokens of %r are not a prefix of those of %r; the target's tokens start where they depart",
                    prompt, prompt + sep + target)
    ids = joint[common:]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return ids


def is_short(tokenizer: Any, token: int) -> bool:
    """Whether a token says little about the entity it starts: at most :data:`SHORT_TOKEN_CHARS` characters
    once whitespace is stripped (' F', ' É', a bare '▁' or ' ')."""
    return len(tokenizer.decode([token]).strip()) <= SHORT_TOKEN_CHARS
