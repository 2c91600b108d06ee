"""The identity experiments' data on disk and their named configurations: synthetic two-hop (or reversal) data
sets written with their natural-language prompt and training files, the presets of ``bridgeprobe reproduce``, and the
probe items a fine-tuning run reads."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from bridgeprobe.probes.io.results import atomic_write
from bridgeprobe.prompts.reversal import generate_reversal
from bridgeprobe.prompts.sampling import sample_items
from bridgeprobe.prompts.schema import PromptItem
from bridgeprobe.prompts.synthetic import SynthConfig, Splits, generate, save_splits
from bridgeprobe.prompts.synthetic_text import TwoHopTexts, make_names, people, render_items, training_texts

# Named configurations. `cpu` is the default: the grid's best cell, 5 seeds x 2 conditions in about 12 minutes on 2
# quiet CPU cores and up to about 25 under load (docs/identity.md: 2-layer GPT-2, untied embeddings, zero-hop identity, weight decay
# 1, bridge-level OOD); `gpu` a larger one for GPU hosts (not run here); `tiny` a seconds-long smoke run.
REPRODUCE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"data": dict(n_subjects=100, n_bridges=20, n_objects=20, n_r1=4, n_r2=4, identity_form="zero_hop"),
            "train": dict(model="gpt2", n_layer=2, d_model=64, n_head=4, d_mlp=256, tie_embeddings=False,
                          steps=5000, batch_size=128, lr=2e-3, weight_decay=1.0, eval_every=500,
                          checkpoint_every=500, identity_repeat=10),
            "seeds": [0, 1, 2, 3, 4]},
    "gpu": {"data": dict(n_subjects=2000, n_bridges=200, n_objects=200, n_r1=6, n_r2=6, identity_form="zero_hop"),
            "train": dict(model="gpt2", n_layer=4, d_model=256, n_head=8, d_mlp=1024, tie_embeddings=False,
                          steps=20000, batch_size=1024, lr=5e-4, weight_decay=1.0, eval_every=500,
                          checkpoint_every=2000, identity_repeat=10, eval_limit=2000),
            "seeds": [0, 1, 2, 3, 4]},
    "tiny": {"data": dict(n_subjects=16, n_bridges=6, n_objects=6, n_r1=2, n_r2=2),
             "train": dict(model="gpt2", n_layer=2, d_model=32, n_head=2, d_mlp=64, steps=40, batch_size=16,
                           lr=3e-3, warmup=5, eval_every=10, checkpoint_every=20),
             "seeds": [0]},
}


# LoRA data: at least 256 ID and 256 OOD two-hop queries per seed (bridge split), about 530 training sentences
FINETUNE_DATA = dict(n_subjects=112, n_bridges=16, n_objects=32, n_r1=2, n_r2=4, two_hop_train_fraction=0.4)


def write_synth(config: SynthConfig, out: Path, tokenizer: Any = None) -> Splits:
    """Generate and check the data of ``config`` and save it under ``out`` with its natural-language prompt set
    (prompts.jsonl) and training sentences (train.jsonl); ``tokenizer`` makes first tokens distinct."""
    splits = generate(config)
    names = make_names(splits, seed=config.seed, tokenizer=tokenizer)
    save_splits(splits, out, names)
    write_text_sets(splits, names, out, tokenizer)
    return splits


def write_text_sets(splits: Splits, names: dict[str, str], out: Path, tokenizer: Any) -> list[PromptItem]:
    """DIR/prompts.jsonl (ID and OOD two-hop test items) and DIR/train.jsonl (training sentences by split)."""
    items = render_items(splits, names, ("id_test", "ood_test"), tokenizer=tokenizer)
    atomic_write(out / "prompts.jsonl", "".join(json.dumps(i.to_dict()) + "\n" for i in items))
    lines = []
    for split in ("one_hop", "two_hop_train", "identity"):
        examples = splits.examples[split]
        for example, (prompt, target) in zip(examples, training_texts(splits, examples, names)):
            lines.append(json.dumps({"split": split, "task": example.task, "prompt": prompt, "target": target}))
    atomic_write(out / "train.jsonl", "\n".join(lines) + "\n")
    return items


def task_data(kind: str, config: Any, tokenizer: Any, out: Path) -> tuple[Any, list[Path], list[PromptItem]]:
    """The text task of one seed (``two_hop``: :class:`TwoHopTexts`; ``reversal``: :class:`ReversalData`), saved
    under ``out``; with its files and, for two-hop, the natural-language prompt items the lens reads."""
    if kind == "reversal":
        data = generate_reversal(config, people(2 * config.n_pairs, seed=config.seed))
        rows = [{"split": split, **asdict(fact)} for split in data.examples for fact in data.examples[split]]
        atomic_write(out / "reversal.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(out / "reversal.json", json.dumps(data.summary(), indent=1))
        return data, [out / "reversal.jsonl", out / "reversal.json"], []
    splits = generate(config)
    names = make_names(splits, seed=config.seed, tokenizer=tokenizer)
    files = save_splits(splits, out, names)
    items = write_text_sets(splits, names, out, tokenizer)
    return TwoHopTexts(splits, names), files + [out / "prompts.jsonl", out / "train.jsonl"], items


def select_split_items(items: Sequence[PromptItem], split: str, n: int, seed: int = 0) -> list[PromptItem]:
    """``n`` items of a split drawn by the project's stratified sampler (:func:`prompts.sampling.sample_items`:
    round-robin over the relation compositions, ``seed``-shuffled), each item's pair partner taken along so patching
    has pairs. (The first ``n`` in file order would cover only the first compositions.)"""
    prefix = f"synth-{split.replace('_', '-')}-"
    return sample_items([i for i in items if i.id.startswith(prefix)], n, "stratified", seed, pairs=True)


def adapter_name(condition: str, seed: int) -> str:
    """The adapter (and model-state) name of one condition and seed, e.g. ``identity_seed0``."""
    return f"{condition}_seed{seed}"
