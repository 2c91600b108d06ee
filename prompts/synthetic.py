"""Synthetic two-hop knowledge for the identity-bridge experiments: entities, relations, facts and splits.

Entity sets E1 (subjects), E2 (bridges), E3 (objects); relations R1 (E1 -> E2) and R2 (E2 -> E3), each a random
function. Atomic facts ``(e1, r1) -> e2`` and ``(e2, r2) -> e3``; two-hop queries ``(e1, r1, r2) -> e3`` through
the bridge ``e2``; the zero-hop identity task ``(e2, r_id) -> e2`` (or ``e2 -> e2`` without a relation token,
``identity_form="zero_hop"``) for every bridge, or for a share of them (``identity_coverage``, the dose).

Splits (:class:`Splits`), under one of two notions of out of distribution (``SynthConfig.ood``):

- ``bridge`` (default; the Grokked Transformers' OOD, where the paper's "complete failure" without identity
  holds): a random ``ood_bridge_fraction`` of the bridges are OOD bridges. No trained two-hop query goes through
  them: their hop-2 facts are seen only as explicit one-hop facts, never with the bridge as a latent
  intermediate. ``ood_test`` = every two-hop query through an OOD bridge; every relation pair is composed in
  training (through the other bridges).
- ``relation_pair``: a random ``ood_pair_fraction`` of the (r1, r2) pairs is never composed in training;
  ``ood_test`` = every composition of those pairs. Every r1 and r2 keeps at least one ID pair, and every bridge
  serves as a latent bridge in trained compositions, so this tests composing relations, not bridges.

In both: ``one_hop`` holds every atomic fact, all trained; ``identity`` the identity example of every covered bridge
(trained only in the ``identity`` condition); ``two_hop_train`` a ``two_hop_train_fraction`` of each ID relation
pair's in-distribution queries; ``id_test`` the other in-distribution queries. With ``two_hop_training=False``
there is no two-hop training data at all: every query is OOD and ``id_test`` is empty.

Renderings: token level (:func:`token_vocab` / :meth:`Example.tokens`: one token per entity and relation, for the
from-scratch models in ``probes.identity.scratch``) and natural language with made-up names
(:mod:`prompts.synthetic_text`: :func:`~prompts.synthetic_text.render_items` gives :class:`~prompts.schema.PromptItem`
s, so every probe reads them; :func:`~prompts.synthetic_text.training_texts` the fine-tuning sentences).
:func:`save_splits` writes a dataset as files that :func:`load_splits` reads back and re-checks.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bridgeprobe.prompts.schema import PromptSetError

SPLITS = ("one_hop", "identity", "two_hop_train", "id_test", "ood_test")
TASKS = ("hop1", "hop2", "identity", "two_hop")
IDENTITY = "r_id"
OOD_KINDS = ("bridge", "relation_pair")
IDENTITY_FORMS = ("relation", "zero_hop")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes, ratios and the seed of a synthetic knowledge base."""

    n_subjects: int = 200  # |E1|
    n_bridges: int = 40  # |E2|
    n_objects: int = 40  # |E3|
    n_r1: int = 4  # |R1|
    n_r2: int = 4  # |R2|
    ood_pair_fraction: float = 0.25  # relation_pair OOD: share of the (r1, r2) pairs held out of two-hop training
    two_hop_train_fraction: float = 0.5  # share of each ID pair's in-distribution compositions that are trained
    two_hop_training: bool = True  # False: no two-hop training data at all (every query OOD)
    seed: int = 0
    ood: str = "bridge"  # "bridge" or "relation_pair": what the OOD queries hold out (module docstring)
    ood_bridge_fraction: float = 0.5  # bridge OOD: share of the bridges never used as a latent bridge in training
    identity_form: str = "relation"  # "relation": (e2, r_id) -> e2; "zero_hop": (e2) -> e2, no relation token
    identity_coverage: float = 1.0  # share of the bridges with an identity example (the dose; :func:`covered_bridges`)

    def __post_init__(self) -> None:
        for name in ("n_subjects", "n_bridges", "n_objects", "n_r1", "n_r2"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("ood_pair_fraction", "two_hop_train_fraction", "ood_bridge_fraction", "identity_coverage"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.identity_form not in IDENTITY_FORMS:
            raise ValueError(f"identity_form must be one of {', '.join(IDENTITY_FORMS)}, got {self.identity_form!r}")
        if self.ood not in OOD_KINDS:
            raise ValueError(f"ood must be one of {', '.join(OOD_KINDS)}, got {self.ood!r}")
        n_ood = round(self.ood_bridge_fraction * self.n_bridges)
        if self.ood == "bridge" and self.two_hop_training and not 0 < n_ood < self.n_bridges:
            raise ValueError(f"ood_bridge_fraction {self.ood_bridge_fraction} of {self.n_bridges} bridges must leave "
                             f"at least one OOD and one in-distribution bridge")
        n_pairs = self.n_r1 * self.n_r2
        if (self.ood == "relation_pair" and self.two_hop_training
                and round(self.ood_pair_fraction * n_pairs) > n_pairs - max(self.n_r1, self.n_r2)):
            raise ValueError(f"ood_pair_fraction {self.ood_pair_fraction} leaves too few ID pairs for every relation "
                             f"to be composed in training ({n_pairs} pairs, need {max(self.n_r1, self.n_r2)} ID)")

    def record(self) -> dict[str, Any]:
        """The config as recorded in run settings and data files. ``identity_coverage`` (added later) appears only
        when below 1, so the records of runs made before it existed stay equal and those runs resume."""
        values = asdict(self)
        if values["identity_coverage"] == 1.0:
            del values["identity_coverage"]
        return values


@dataclass(frozen=True)
class Example:
    """One training or test example. Entities and relations are names such as ``e1_17``, ``r2_3``, ``r_id``.

    ``task``: ``hop1`` (e1, r1 -> e2), ``hop2`` (e2, r2 -> e3), ``identity`` (e2, r_id -> e2; or e2 -> e2, the
    ``zero_hop`` form, whose token-level rendering is the entity alone) or ``two_hop``
    (e1, r1, r2 -> e3 through e2)."""

    task: str
    head: str
    relations: tuple[str, ...]
    target: str
    bridge: str | None = None  # two-hop only

    def tokens(self) -> list[str]:
        """Token-level rendering: the head entity, then each relation; the model predicts :attr:`target` next."""
        return [self.head, *self.relations]


@dataclass
class Splits:
    """A generated knowledge base: the facts, the relation-pair split and the example splits."""

    config: SynthConfig
    subjects: list[str]
    bridges: list[str]
    objects: list[str]
    r1: list[str]
    r2: list[str]
    hop1: dict[tuple[str, str], str]  # (e1, r1) -> e2
    hop2: dict[tuple[str, str], str]  # (e2, r2) -> e3
    id_pairs: list[tuple[str, str]]
    ood_pairs: list[tuple[str, str]]
    ood_bridges: list[str] = field(default_factory=list)  # bridge OOD: never a latent bridge in training
    examples: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def entities(self) -> list[str]:
        return self.subjects + self.bridges + self.objects

    @property
    def relations(self) -> list[str]:
        return self.r1 + self.r2 + [IDENTITY]

    def two_hop(self, e1: str, r1: str, r2: str) -> Example:
        bridge = self.hop1[(e1, r1)]
        return Example("two_hop", e1, (r1, r2), self.hop2[(bridge, r2)], bridge)

    def training(self, identity: bool, identity_repeat: int = 1) -> list[Example]:
        """The training examples of a condition: one-hop facts, trained two-hop queries and, with ``identity``,
        ``identity_repeat`` copies of the identity examples (the data-ratio knob)."""
        return (self.examples["one_hop"] + self.examples["two_hop_train"]
                + (self.examples["identity"] * identity_repeat if identity else []))

    def summary(self) -> dict[str, Any]:
        return {"config": self.config.record(), "id_pairs": [list(p) for p in self.id_pairs],
                "ood_pairs": [list(p) for p in self.ood_pairs], "ood_bridges": list(self.ood_bridges),
                "sizes": {name: len(self.examples[name]) for name in SPLITS}}


def _split_pairs(config: SynthConfig, r1: list[str], r2: list[str], rng: random.Random) -> tuple[list, list]:
    """(ID pairs, OOD pairs): a random ``ood_pair_fraction`` of the grid held out, keeping every relation in some
    ID pair (greedy over a random order; a held-out pair is skipped when it would orphan a relation)."""
    pairs = [(a, b) for a in r1 for b in r2]
    if not config.two_hop_training:
        return [], pairs
    if config.ood == "bridge":
        return pairs, []
    n_ood = round(config.ood_pair_fraction * len(pairs))
    order = pairs[:]
    rng.shuffle(order)
    ood: list[tuple[str, str]] = []
    for pair in order:
        if len(ood) == n_ood:
            break
        rest = [p for p in pairs if p not in ood and p != pair]
        if {a for a, _ in rest} == set(r1) and {b for _, b in rest} == set(r2):
            ood.append(pair)
    if len(ood) < n_ood:
        raise ValueError(f"cannot hold out {n_ood} relation pairs and keep every relation composed in training")
    return [p for p in pairs if p not in ood], sorted(ood)


def covered_bridges(config: SynthConfig, bridges: Sequence[str], ood_bridges: Sequence[str]) -> list[str]:
    """The bridges that get an identity example: all of them at ``identity_coverage`` 1, else a random share drawn
    from its own seeded generator (the facts and splits stay those of coverage 1), stratified so that OOD and
    in-distribution bridges are covered in nearly the same proportion: ``round(identity_coverage * bridges)`` in
    all, of which the OOD bridges get their share rounded."""
    if config.identity_coverage == 1.0:
        return list(bridges)
    rng = random.Random(f"identity-coverage-{config.seed}")
    held_out = [b for b in bridges if b in set(ood_bridges)]
    others = [b for b in bridges if b not in set(ood_bridges)]
    total = round(config.identity_coverage * len(bridges))
    n_held_out = round(total * len(held_out) / len(bridges))
    covered = set(rng.sample(held_out, n_held_out)) | set(rng.sample(others, total - n_held_out))
    return [b for b in bridges if b in covered]


def generate(config: SynthConfig) -> Splits:
    """A random knowledge base and its splits; the same config (seed included) always gives the same data."""
    rng = random.Random(config.seed)
    subjects = [f"e1_{i}" for i in range(config.n_subjects)]
    bridges = [f"e2_{i}" for i in range(config.n_bridges)]
    objects = [f"e3_{i}" for i in range(config.n_objects)]
    r1 = [f"r1_{i}" for i in range(config.n_r1)]
    r2 = [f"r2_{i}" for i in range(config.n_r2)]
    hop1 = {(e, r): rng.choice(bridges) for e in subjects for r in r1}
    hop2 = {(e, r): rng.choice(objects) for e in bridges for r in r2}
    id_pairs, ood_pairs = _split_pairs(config, r1, r2, rng)
    ood_bridges: list[str] = []
    if config.ood == "bridge":
        n_ood = round(config.ood_bridge_fraction * len(bridges)) if config.two_hop_training else len(bridges)
        ood_bridges = sorted(rng.sample(bridges, n_ood), key=bridges.index)
    splits = Splits(config, subjects, bridges, objects, r1, r2, hop1, hop2, id_pairs, ood_pairs, ood_bridges)
    one_hop = ([Example("hop1", e, (r,), b) for (e, r), b in hop1.items()]
               + [Example("hop2", e, (r,), o) for (e, r), o in hop2.items()])
    held_out = set(ood_bridges)
    train, id_test = [], []
    for a, b in id_pairs:
        queries = [q for q in (splits.two_hop(e, a, b) for e in subjects) if q.bridge not in held_out]
        rng.shuffle(queries)
        n_train = round(config.two_hop_train_fraction * len(queries))
        train += queries[:n_train]
        id_test += queries[n_train:]
    every = [(a, b) for a in r1 for b in r2]
    ood_test = ([q for a, b in every for q in (splits.two_hop(e, a, b) for e in subjects) if q.bridge in held_out]
                if config.ood == "bridge" else [splits.two_hop(e, a, b) for a, b in ood_pairs for e in subjects])
    splits.examples = {
        "one_hop": one_hop,
        "identity": [Example("identity", b, (IDENTITY,) if config.identity_form == "relation" else (), b)
                     for b in covered_bridges(config, bridges, ood_bridges)],
        "two_hop_train": train,
        "id_test": id_test,
        "ood_test": ood_test,
    }
    return splits


def check_splits(splits: Splits) -> None:
    """Raise ValueError unless the splits are consistent: every example follows the facts; the trained, ID-test and
    OOD-test queries are disjoint; no OOD relation pair is composed in training; ``ood_test`` covers exactly the
    OOD pairs; ``one_hop`` holds every atomic fact."""
    ex = splits.examples
    for name in SPLITS:
        for item in ex[name]:
            if item.task == "two_hop":
                if splits.two_hop(item.head, *item.relations) != item:
                    raise ValueError(f"{name}: {item} does not follow the facts")
            elif item.task == "identity":
                if item.head != item.target or item.head not in splits.bridges:
                    raise ValueError(f"{name}: {item} is not an identity example of a bridge")
            else:
                table = splits.hop1 if item.task == "hop1" else splits.hop2
                if table.get((item.head, item.relations[0])) != item.target:
                    raise ValueError(f"{name}: {item} does not follow the facts")
    keys = {name: {(i.head, i.relations) for i in ex[name]} for name in ("two_hop_train", "id_test", "ood_test")}
    for a, b in (("two_hop_train", "id_test"), ("two_hop_train", "ood_test"), ("id_test", "ood_test")):
        if keys[a] & keys[b]:
            raise ValueError(f"splits {a} and {b} share {len(keys[a] & keys[b])} queries")
    if splits.config.ood == "bridge":
        held_out = set(splits.ood_bridges)
        latent = {i.bridge for i in ex["two_hop_train"] + ex["id_test"]} & held_out
        if latent:
            raise ValueError(f"OOD bridges used as a latent bridge in training or the ID test: {sorted(latent)}")
        expected = {(e, (a, b)) for (e, a), bridge in splits.hop1.items() if bridge in held_out for b in splits.r2}
        if {(i.head, i.relations) for i in ex["ood_test"]} != expected or len(ex["ood_test"]) != len(expected):
            raise ValueError("ood_test does not hold exactly the two-hop queries through the OOD bridges")
    else:
        trained_pairs = {i.relations for i in ex["two_hop_train"]}
        ood = {i.relations for i in ex["ood_test"]}
        if trained_pairs & ood:
            raise ValueError(f"OOD relation pairs composed in training: {sorted(trained_pairs & ood)}")
        if set(map(tuple, splits.ood_pairs)) != ood and ex["ood_test"]:
            raise ValueError("ood_test does not cover exactly the OOD relation pairs")
    if len(ex["one_hop"]) != len(splits.hop1) + len(splits.hop2):
        raise ValueError("one_hop must hold every atomic fact")


# ------------------------------------------------------------------------------------------------ token level


def token_vocab(splits: Splits) -> list[str]:
    """The token-level vocabulary: every entity, then every relation (identity last); position = token id."""
    return splits.entities + splits.relations


# ------------------------------------------------------------------------------------------------------ files

_COLUMNS = ("split", "task", "head", "r1", "r2", "bridge", "target")


def save_splits(splits: Splits, out_dir: Path, names: dict[str, str] | None = None) -> list[Path]:
    """Write ``synth.json`` (config, relation pairs, sizes, names) and ``examples.csv`` (one row per example and
    split, long format) into ``out_dir``, atomically; return the paths."""
    from bridgeprobe.probes.io.results import atomic_write, atomic_write_json

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(_COLUMNS)
    for split in SPLITS:
        for e in splits.examples[split]:
            writer.writerow([split, e.task, e.head, e.relations[0] if e.relations else "",
                             e.relations[1] if len(e.relations) > 1 else "",
                             e.bridge or "", e.target])
    meta = {**splits.summary(), "names": names or {}}
    atomic_write_json(out_dir / "synth.json", meta)
    atomic_write(out_dir / "examples.csv", buffer.getvalue())
    return [out_dir / "synth.json", out_dir / "examples.csv"]


def load_splits(out_dir: Path) -> tuple[Splits, dict[str, str]]:
    """Read a dataset written by :func:`save_splits`: regenerate it from its config, check that the saved
    examples are exactly the regenerated ones (the files are the record; a mismatch names the first differing
    line) and return it with its names."""
    meta_path, csv_path = out_dir / "synth.json", out_dir / "examples.csv"
    for path in (meta_path, csv_path):
        if not path.is_file():
            raise PromptSetError(str(path), None, None, "file not found")
    meta = json.loads(meta_path.read_text())
    try:  # files written before the bridge-level split existed hold relation-pair splits
        config = SynthConfig(**{"ood": "relation_pair", **meta["config"]})
    except (TypeError, KeyError) as err:
        raise PromptSetError(str(meta_path), None, "config", f"not a synthetic dataset config: {err}") from err
    splits = generate(config)
    expected = [(s, e) for s in SPLITS for e in splits.examples[s]]
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(expected):
        raise PromptSetError(str(csv_path), None, None, f"{len(rows)} examples, the config generates {len(expected)}")
    for line, (row, (split, e)) in enumerate(zip(rows, expected), start=2):
        saved = Example(row["task"], row["head"], tuple(r for r in (row["r1"], row["r2"]) if r), row["target"],
                        row["bridge"] or None)
        if row["split"] != split or saved != e:
            raise PromptSetError(str(csv_path), line, None,
                                 f"example {dict(row)} differs from the generated {split} {e}")
    check_splits(splits)
    return splits, meta.get("names", {})
