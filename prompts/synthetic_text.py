"""The synthetic two-hop knowledge (:mod:`prompts.synthetic`) in natural language: made-up person and town names
(distinct first tokens under a tokenizer when one is given), relation templates, the training sentences, and the
ID/OOD test queries as prompt items with counterfactual pairs, so the lens and patching runs read them like any
prompt set."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from bridgeprobe.prompts.schema import PromptItem
from bridgeprobe.prompts.synthetic import IDENTITY, Example, Splits


# R1: person -> town (hop-1 prompt, the description of the bridge inside a two-hop prompt)
R1_TEMPLATES = (
    ("born_in", "{e1} was born in", "the town where {e1} was born"),
    ("lives_in", "{e1} lives in", "the town where {e1} lives"),
    ("works_in", "{e1} works in", "the town where {e1} works"),
    ("studied_in", "{e1} studied in", "the town where {e1} studied"),
    ("married_in", "{e1} got married in", "the town where {e1} got married"),
    ("retired_to", "{e1} retired to", "the town where {e1} retired"),
)
# R2: town -> person ("The mayor of X is")
R2_TEMPLATES = (
    ("mayor", "The mayor of {x} is"),
    ("founder", "The founder of {x} is"),
    ("sheriff", "The sheriff of {x} is"),
    ("doctor", "The doctor of {x} is"),
    ("baker", "The baker of {x} is"),
    ("teacher", "The teacher of {x} is"),
)
IDENTITY_TEMPLATE = "The town {x} is called"

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pl",
           "qu", "r", "s", "sh", "sk", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "y")
_CODAS = ("", "", "l", "n", "r", "s", "th", "nd", "rk", "x")
_TOWN_ENDS = ("moor", "wick", "dale", "ford", "holm", "stead", "mere", "by", "thorpe", "haven", "gate", "ley")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _person(rng: random.Random) -> str:
    first = _syllable(rng) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
    last = _syllable(rng) + _syllable(rng)
    return f"{first.capitalize()} {last.capitalize()}"


def _town(rng: random.Random) -> str:
    return (_syllable(rng) + rng.choice(_TOWN_ENDS)).capitalize()


def people(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up person names ("Thaesha Tryrchaerk"), the same for the same ``seed``."""
    rng = random.Random(f"people-{seed}")
    names: dict[str, None] = {}
    for _ in range(50 * n):
        if len(names) == n:
            break
        names.setdefault(_person(rng))
    if len(names) < n:
        raise ValueError(f"could not make {n} distinct names")
    return list(names)


def make_names(splits: Splits, *, seed: int = 0, tokenizer: Any = None, attempts: int = 200) -> dict[str, str]:
    """Made-up names for every entity: people for subjects and objects, towns for bridges; all distinct. With a
    ``tokenizer``, bridges (and objects) also get distinct first tokens within their set, each taken in context
    (:func:`probes.model.targets.target_ids`) after the first R1 (R2) template, where bridges (objects) are answered, so
    first-token readouts such as the logit lens and restricted accuracy identify them unambiguously."""
    from bridgeprobe.probes.model.targets import target_ids

    rng = random.Random(f"names-{seed}")
    names: dict[str, str] = {}
    used: set[str] = set()
    contexts = {"bridges": R1_TEMPLATES[0][1].format(e1="Someone"), "objects": R2_TEMPLATES[0][1].format(x="it")}
    for group, maker, context in ((splits.subjects, _person, None), (splits.bridges, _town, contexts["bridges"]),
                                  (splits.objects, _person, contexts["objects"])):
        firsts: set[int] = set()
        for entity in group:
            for _ in range(attempts):
                name = maker(rng)
                if name in used:
                    continue
                if tokenizer is not None and context is not None:
                    first = target_ids(tokenizer, context, name)[0]
                    if first in firsts:
                        continue
                    firsts.add(first)
                break
            else:
                raise ValueError(f"could not find {len(group)} names with distinct first tokens; use fewer entities")
            names[entity] = name
            used.add(name)
    return names


def relation_names(splits: Splits) -> dict[str, str]:
    """Natural-language names of the relations (``r1_0`` -> ``born_in``); R1/R2 hold at most 6 relations each."""
    if len(splits.r1) > len(R1_TEMPLATES) or len(splits.r2) > len(R2_TEMPLATES):
        raise ValueError(f"natural-language rendering has {len(R1_TEMPLATES)} R1 and {len(R2_TEMPLATES)} R2 templates")
    names = {r: R1_TEMPLATES[i][0] for i, r in enumerate(splits.r1)}
    names.update({r: R2_TEMPLATES[i][0] for i, r in enumerate(splits.r2)})
    names[IDENTITY] = "identity"
    return names


def prompt_text(splits: Splits, example: Example, names: dict[str, str]) -> str:
    """The natural-language prompt of an example, ending right before its target."""
    if example.task == "hop1":
        return R1_TEMPLATES[splits.r1.index(example.relations[0])][1].format(e1=names[example.head])
    if example.task == "hop2":
        return R2_TEMPLATES[splits.r2.index(example.relations[0])][1].format(x=names[example.head])
    if example.task == "identity":
        return IDENTITY_TEMPLATE.format(x=names[example.head])
    r1, r2 = example.relations
    described = R1_TEMPLATES[splits.r1.index(r1)][2].format(e1=names[example.head])
    return R2_TEMPLATES[splits.r2.index(r2)][1].format(x=described)


def training_texts(splits: Splits, examples: Iterable[Example], names: dict[str, str]) -> list[tuple[str, str]]:
    """(prompt, target) pairs for fine-tuning: the model learns ``prompt + " " + target + "."``."""
    return [(prompt_text(splits, e, names), names[e.target]) for e in examples]


@dataclass
class TwoHopTexts:
    """The natural-language two-hop task a LoRA adapter learns: training (prompt, target) pairs per condition and
    evaluation pairs per split (keys = metric names without ``_acc``)."""

    splits: Splits
    names: dict[str, str]

    def training(self, identity: bool, identity_repeat: int = 1) -> list[tuple[str, str]]:
        return training_texts(self.splits, self.splits.training(identity, identity_repeat), self.names)

    def eval_sets(self) -> dict[str, list[tuple[str, str]]]:
        sources = {"one_hop": "one_hop", "id_two_hop": "id_test", "ood_two_hop": "ood_test",
                   "train_two_hop": "two_hop_train", "identity": "identity"}
        return {name: training_texts(self.splits, self.splits.examples[split], self.names)
                for name, split in sources.items()}

    def summary(self) -> dict[str, Any]:
        return {"task": "two_hop", **self.splits.summary(), "names": self.names}


def render_items(splits: Splits, names: dict[str, str], split_names: Sequence[str] = ("id_test", "ood_test"),
                 *, tokenizer: Any = None) -> list[PromptItem]:
    """Two-hop examples of ``split_names`` as prompt items (ids ``synth-<split>-<n>``), with hop-1 and hop-2
    prompts, relation names, and a counterfactual ``pair``: an item of the same split and composition with another
    bridge and answer (of the same token length under ``tokenizer`` when one is given; unpaired otherwise)."""
    rel = relation_names(splits)
    items: list[PromptItem] = []
    for split in split_names:
        group = [e for e in splits.examples[split] if e.task == "two_hop"]
        ids = [f"synth-{split.replace('_', '-')}-{n:05d}" for n in range(len(group))]
        lengths = [len(tokenizer(prompt_text(splits, e, names))["input_ids"]) if tokenizer else 0 for e in group]
        partner = _pairs(group, lengths)
        for n, example in enumerate(group):
            hop1 = Example("hop1", example.head, example.relations[:1], example.bridge)
            hop2 = Example("hop2", example.bridge, example.relations[1:], example.target)
            items.append(PromptItem(
                id=ids[n], two_hop=prompt_text(splits, example, names), bridge=names[example.bridge],
                answer=names[example.target], e1=names[example.head], r1=rel[example.relations[0]],
                r2=rel[example.relations[1]], hop1=prompt_text(splits, hop1, names),
                hop2=prompt_text(splits, hop2, names), pair=ids[partner[n]] if n in partner else None,
            ))
    return items


def _pairs(group: list[Example], lengths: list[int]) -> dict[int, int]:
    """Mutual partners within ``group``: same relations, same length, different bridge and answer (greedy)."""
    partner: dict[int, int] = {}
    for i, a in enumerate(group):
        if i in partner:
            continue
        for j in range(i + 1, len(group)):
            b = group[j]
            if (j not in partner and a.relations == b.relations and lengths[i] == lengths[j]
                    and a.bridge != b.bridge and a.target != b.target):
                partner[i], partner[j] = j, i
                break
    return partner
