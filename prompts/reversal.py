"""Synthetic reversal-curse data with identity statements: the positive control of the identity experiments.

Ma, Huang, Zhu, Sojoudi (2026), "Breaking the Reversal Curse in Autoregressive Language Models via Identity
Bridge": a model fine-tuned on forward facts ("Alice's mentor is Bob.") does not answer the reversed question
("Bob's student is" -> Alice) unless identity statements ("The name of Alice is Alice.") are added. Here pairs
``(a, b)`` of made-up people are linked by one of a few relations, each with a forward and a reverse template:

- ``forward``: every pair's forward fact ``a -> b`` (trained);
- ``reverse_train``: the reversed facts ``b -> a`` of a ``reverse_train_fraction`` of the pairs (trained, so the
  model learns the reversed question's format and that the relation can be reversed);
- ``reverse_test``: the reversed questions of the other pairs, whose reversal is never seen (the OOD split);
- ``identity``: ``The name of a is a.`` for the answer of every reversed question, and with ``identity_of =
  "everyone"`` also ``The name of b is b.`` for every question's subject (Ma et al.'s recipe names "[Entity]" without
  saying which); trained only in the ``identity`` condition.

The split is by pair, so a test pair's reversal never leaks into training; :func:`check_reversal` re-checks it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

# (relation, forward template "{a} ... is" -> b, reverse template "{b} ... is" -> a)
RELATIONS = (
    ("mentor", "{a}'s mentor is", "{b}'s student is"),
    ("landlord", "{a}'s landlord is", "{b}'s tenant is"),
    ("doctor", "{a}'s doctor is", "{b}'s patient is"),
    ("boss", "{a}'s boss is", "{b}'s assistant is"),
)
IDENTITY_TEMPLATE = "The name of {x} is"
SPLITS = ("forward", "reverse_train", "reverse_test", "identity")
IDENTITY_OF = ("answers", "everyone")


@dataclass(frozen=True)
class ReversalConfig:
    """Number of (a, b) pairs, relations, the share of pairs whose reversal is trained, whose names get identity
    sentences (``answers``: the a's; ``everyone``: a's and b's), and the seed."""

    n_pairs: int = 384
    n_relations: int = 4
    reverse_train_fraction: float = 0.25
    identity_of: str = "answers"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_pairs < 2:
            raise ValueError(f"n_pairs must be at least 2, got {self.n_pairs}")
        if not 1 <= self.n_relations <= len(RELATIONS):
            raise ValueError(f"n_relations must lie in 1..{len(RELATIONS)}, got {self.n_relations}")
        if not 0.0 <= self.reverse_train_fraction < 1.0:
            raise ValueError(f"reverse_train_fraction must lie in [0, 1), got {self.reverse_train_fraction}")
        if self.identity_of not in IDENTITY_OF:
            raise ValueError(f"identity_of must be one of {', '.join(IDENTITY_OF)}, got {self.identity_of!r}")

    def record(self) -> dict[str, Any]:
        """The config as recorded in run settings and data files."""
        return asdict(self)


@dataclass(frozen=True)
class Fact:
    """One sentence to learn or question to answer: ``prompt`` followed by `` target``."""

    split: str
    pair: int
    prompt: str
    target: str


@dataclass
class ReversalData:
    """Pairs of made-up people and the sentences of every split."""

    config: ReversalConfig
    pairs: list[tuple[str, str, str]]  # (a, relation, b)
    examples: dict[str, list[Fact]]

    def training(self, identity: bool, identity_repeat: int = 1) -> list[tuple[str, str]]:
        """(prompt, target) pairs of a condition's training set."""
        facts = self.examples["forward"] + self.examples["reverse_train"]
        facts = facts + (self.examples["identity"] * identity_repeat if identity else [])
        return [(f.prompt, f.target) for f in facts]

    def eval_sets(self) -> dict[str, list[tuple[str, str]]]:
        """(prompt, target) pairs per evaluation split, keyed as the metric columns: forward, reverse_train,
        reverse_test (OOD) and identity."""
        return {name: [(f.prompt, f.target) for f in self.examples[name]] for name in SPLITS}

    def summary(self) -> dict[str, Any]:
        return {"task": "reversal", "config": self.config.record(),
                "sizes": {name: len(self.examples[name]) for name in SPLITS}}


def generate_reversal(config: ReversalConfig, names: list[str]) -> ReversalData:
    """The pairs and splits of ``config``; ``names``: at least ``2 * n_pairs`` distinct made-up people (the first
    half become the a's, whose names answer the reversed questions)."""
    if len(set(names)) < 2 * config.n_pairs:
        raise ValueError(f"need {2 * config.n_pairs} distinct names, got {len(set(names))}")
    rng = random.Random(f"reversal-{config.seed}")
    people = list(dict.fromkeys(names))[: 2 * config.n_pairs]
    a_side, b_side = people[: config.n_pairs], people[config.n_pairs:]
    relations = RELATIONS[: config.n_relations]
    pairs = [(a, relations[i % len(relations)][0], b) for i, (a, b) in enumerate(zip(a_side, b_side))]
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_train = round(config.reverse_train_fraction * len(pairs))
    trained = set(order[:n_train])
    templates = {name: (forward, reverse) for name, forward, reverse in relations}
    forward = [Fact("forward", i, templates[r][0].format(a=a), b) for i, (a, r, b) in enumerate(pairs)]
    reverse = [Fact("reverse_train" if i in trained else "reverse_test", i, templates[r][1].format(b=b), a)
               for i, (a, r, b) in enumerate(pairs)]
    named = [(i, a) for i, (a, _, _) in enumerate(pairs)]
    if config.identity_of == "everyone":
        named += [(i, b) for i, (_, _, b) in enumerate(pairs)]
    examples = {
        "forward": forward,
        "reverse_train": [f for f in reverse if f.split == "reverse_train"],
        "reverse_test": [f for f in reverse if f.split == "reverse_test"],
        "identity": [Fact("identity", i, IDENTITY_TEMPLATE.format(x=x), x) for i, x in named],
    }
    data = ReversalData(config, pairs, examples)
    check_reversal(data)
    return data


def check_reversal(data: ReversalData) -> None:
    """Raise ValueError unless no test pair's reversal is trained, every pair has its forward fact, every
    reversed question is answered by its pair's a, and every identity sentence names a person of its pair (only
    the a's unless ``identity_of`` is ``everyone``) and answers with that name."""
    ex = data.examples
    tested = {f.pair for f in ex["reverse_test"]}
    if tested & {f.pair for f in ex["reverse_train"]}:
        raise ValueError(f"{len(tested & {f.pair for f in ex['reverse_train']})} test pairs are reversed in training")
    if {f.pair for f in ex["forward"]} != set(range(len(data.pairs))):
        raise ValueError("every pair needs its forward fact")
    for fact in ex["reverse_train"] + ex["reverse_test"]:
        if fact.target != data.pairs[fact.pair][0]:
            raise ValueError(f"{fact} is not answered by its pair's a")
    a_only = data.config.identity_of == "answers"
    for fact in ex["identity"]:
        a, _, b = data.pairs[fact.pair]
        if fact.prompt != IDENTITY_TEMPLATE.format(x=fact.target) or fact.target not in ((a,) if a_only else (a, b)):
            raise ValueError(f"{fact} does not name a person of its pair (identity_of {data.config.identity_of})")
    for fact in ex["forward"]:
        if fact.target != data.pairs[fact.pair][2]:
            raise ValueError(f"{fact} is not answered by its pair's b")
