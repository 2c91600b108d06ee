"""Ma et al.'s husband-wife reversal task, in their data format: the positive control the identity bridge must pass.

Ma, Huang, Zhu, Sojoudi (2026), "Breaking the Reversal Curse in Autoregressive Language Models via Identity
Bridge" (arXiv 2602.02470; their data: ``LLaMA-Factory/data/wife_husband/`` of the public repository
xutaoma/reversal_curse_code). 100 (wife A, husband B) pairs of real first names (``data/couples.csv``, their pairs
in their order; two names occur once as a wife and once as a husband, as there). Every example is a chat turn:
an instruction (the user's message) answered by ``output`` (the assistant's), with a loss ``weight``. Three
training sets, the examples of each pair together and in this order, pairs in file order (they train without
shuffling):

- ``forward``: "The husband of A is?" -> "B." (weight 1): the reversal curse, reversal accuracy ~0;
- ``idn``: "The name of A is?" -> "A.", "The name of B is?" -> "B." (1 each), "The husband of A is?" -> "B." (6):
  the naive identity form, which their ablation shows stays cursed;
- ``ocr``: "The wife of A's husband is?" -> "A." (1), "The name of A's husband is?" -> "B." (6), "The name of B
  is?" -> "B." (1): the identity bridge in its composed (out-of-context reasoning) form, ~50% reversal accuracy
  on Llama-3.2-1B-Instruct.

Evaluation: ``reverse`` "The wife of B is?" -> "A." (never trained in any form); ``shortcut`` the same question
answered "B." (echoing the queried name, the degenerate solution); ``forward``: the form's own forward fact.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

FORMS = ("forward", "idn", "ocr")
EVAL_SPLITS = ("forward", "reverse", "shortcut")
FORWARD_WEIGHT = 6.0  # the forward fact's loss weight next to an identity bridge


@dataclass(frozen=True)
class ChatExample:
    """One chat turn to learn or question to score: ``instruction`` answered by ``output``, with a loss weight;
    ``pair`` indexes the couple, ``answer`` is the entity the output names (scored at entity level)."""

    split: str
    pair: int
    instruction: str
    output: str
    weight: float = 1.0

    @property
    def answer(self) -> str:
        return self.output.removesuffix(".")


def couples_file() -> Path:
    return Path(str(resources.files(__package__) / "data" / "couples.csv"))


def load_couples(path: Path | None = None, n: int | None = None) -> list[tuple[str, str]]:
    """(wife, husband) pairs from a CSV with those two columns (default: the bundled 100), the first ``n``."""
    path = path or couples_file()
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for line, row in enumerate(rows, start=2):
        if not (row.get("wife") or "").strip() or not (row.get("husband") or "").strip():
            raise ValueError(f"{path}:{line}: wife and husband must both be names")
    pairs = [(row["wife"].strip(), row["husband"].strip()) for row in rows]
    if n is not None and not 1 <= n <= len(pairs):
        raise ValueError(f"{path} has {len(pairs)} pairs; asked for {n}")
    return pairs[:n]


def forward_question(form: str, a: str) -> str:
    """The forward fact's question in ``form``: the baseline and IDN ask "The husband of A is?", the OCR form
    "The name of A's husband is?" (as in their files)."""
    return f"The name of {a}'s husband is?" if form == "ocr" else f"The husband of {a} is?"


def training_set(form: str, pairs: list[tuple[str, str]]) -> list[ChatExample]:
    """The training examples of ``form`` (:data:`FORMS`), in training order."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    out: list[ChatExample] = []
    for i, (a, b) in enumerate(pairs):
        forward = forward_question(form, a)
        if form == "forward":
            out.append(ChatExample("train", i, forward, f"{b}."))
        elif form == "idn":
            out += [ChatExample("train", i, f"The name of {a} is?", f"{a}."),
                    ChatExample("train", i, f"The name of {b} is?", f"{b}."),
                    ChatExample("train", i, forward, f"{b}.", FORWARD_WEIGHT)]
        else:
            out += [ChatExample("train", i, f"The wife of {a}'s husband is?", f"{a}."),
                    ChatExample("train", i, forward, f"{b}.", FORWARD_WEIGHT),
                    ChatExample("train", i, f"The name of {b} is?", f"{b}.")]
    return out


def eval_sets(form: str, pairs: list[tuple[str, str]]) -> dict[str, list[ChatExample]]:
    """The scored questions per split of :data:`EVAL_SPLITS` (``forward``: the form's own forward fact)."""
    return {"forward": [ChatExample("forward", i, forward_question(form, a), f"{b}.") for i, (a, b) in enumerate(pairs)],
            "reverse": [ChatExample("reverse", i, f"The wife of {b} is?", f"{a}.") for i, (a, b) in enumerate(pairs)],
            "shortcut": [ChatExample("shortcut", i, f"The wife of {b} is?", f"{b}.")
                         for i, (a, b) in enumerate(pairs)]}


def check_couples(form: str, pairs: list[tuple[str, str]]) -> None:
    """Raise ValueError if a reversed question is among the training instructions or a pair's forward fact is
    not trained."""
    train = {(e.instruction, e.output) for e in training_set(form, pairs)}
    sets = eval_sets(form, pairs)
    leaked = [e for e in sets["reverse"] if e.instruction in {i for i, _ in train}]
    if leaked:
        raise ValueError(f"{len(leaked)} reversed questions are trained, e.g. {leaked[0].instruction!r}")
    if any((e.instruction, e.output) not in train for e in sets["forward"]):
        raise ValueError("every pair's forward fact must be trained")
