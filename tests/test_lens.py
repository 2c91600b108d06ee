"""The logit lens against an independent plain-HF computation, batched against one-at-a-time."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import CharTokenizer, requires_transformer_lens, tiny_model
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import LensQuery, lens_batch, lens_queries
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.probes.model.tl_backend import TransformerLensHooks
from bridgeprobe.prompts.schema import PromptItem


def reference_lens(model, tokenizer, final_norm, query: LensQuery) -> list[dict]:
    """Plain HF, one prompt at a time: hidden_states[l + 1] through the final norm and lm_head for l < L-1 (HF's
    last hidden state is already normalised), the model's logits for the last layer; rank by sorting."""
    prompt = tokenizer(query.prompt)["input_ids"]
    target = target_ids(tokenizer, query.prompt, query.target_text)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + target[:-1]]), output_hidden_states=True)
        n_layers = len(out.hidden_states) - 1
        rows = []
        for layer in range(n_layers):
            last = len(prompt) - 1
            if layer < n_layers - 1:
                logits = model.get_output_embeddings()(final_norm(out.hidden_states[layer + 1][0, last]))
                cap = getattr(model.config, "final_logit_softcapping", None)
                logits = torch.tanh(logits / cap) * cap if cap else logits
            else:
                logits = out.logits[0, last]
            order = logits.argsort(descending=True)
            # tokens within float noise of the target's logit may order either way in another computation
            ties = int(((logits - logits[target[0]]).abs() < 1e-4).sum()) - 1
            whole = sum(float(out.logits[0].log_softmax(-1)[last + j, t]) for j, t in enumerate(target))
            rows.append({"layer": layer, "rank": int((order == target[0]).nonzero()[0, 0]), "ties": ties,
                         "logprob": float(logits.log_softmax(-1)[target[0]]), "whole_logprob": whole})
    return rows


def _compare(rows: list[dict], queries: list[LensQuery], reference: dict) -> None:
    for row in rows:
        ref = reference[(row["prompt_id"], row["prompt_kind"], row["target"])][row["layer"]]
        assert abs(row["rank"] - ref["rank"]) <= ref["ties"], (row, ref)
        assert row["logprob"] == pytest.approx(ref["logprob"], abs=1e-4)
        if row["whole_logprob"] is not None:
            assert row["layer"] == len(reference[next(iter(reference))]) - 1
            assert row["whole_logprob"] == pytest.approx(ref["whole_logprob"], abs=1e-3)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text", "gpt2"])
def test_lens_equals_plain_hf_on_tiny_models(kind: str) -> None:
    model = tiny_model(kind)
    tokenizer = CharTokenizer()
    items = [PromptItem(f"p{i}", "ab" * i + "cd", "xy"[: 1 + i % 2], "zw", hop1="q" * (i + 1), hop2="r" + "s" * i)
             for i in range(1, 6)]
    queries = lens_queries(items)
    rows = lens_batch(NativeHooks(model, tokenizer), queries)
    final_norm = NativeHooks(model).modules.final_norm
    _compare(rows, queries, {q.key: reference_lens(model, tokenizer, final_norm, q) for q in queries})
    assert len(rows) == len(queries) * 3  # one row per query and layer at the last position


@requires_transformer_lens
def test_transformer_lens_backend_gives_the_same_lens() -> None:
    model = tiny_model("llama")
    tokenizer = CharTokenizer()
    queries = lens_queries([PromptItem("a", "hello there", "xy", "z"), PromptItem("b", "hi", "q", "rs")])
    native = lens_batch(NativeHooks(model, tokenizer), queries)
    bridge = lens_batch(TransformerLensHooks(model, tokenizer), queries)
    for a, b in zip(native, bridge):
        assert (a["prompt_id"], a["layer"], a["rank"]) == (b["prompt_id"], b["layer"], b["rank"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_all_positions_includes_the_last_position_rows() -> None:
    hooked = NativeHooks(tiny_model("qwen2"), CharTokenizer())
    queries = lens_queries([PromptItem("a", "hello there", "xy", "z"), PromptItem("b", "hi", "q", "rs")])
    last = lens_batch(hooked, queries)
    every = lens_batch(hooked, queries, all_positions=True)
    n_tokens = {"a": 12, "b": 3}
    assert len(every) == sum(n_tokens[q.prompt_id] * 3 for q in queries)
    at_last = [r for r in every if r["position"] == r["n_prompt_tokens"] - 1]
    for a, b in zip(last, at_last):
        assert (a["prompt_id"], a["target"], a["layer"], a["rank"]) == (b["prompt_id"], b["target"], b["layer"], b["rank"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)


def _unseen_items(seed: int, n: int) -> list[PromptItem]:
    """Prompts generated on the fly, so no result can have been recorded for them."""
    rng = random.Random(seed)
    places = ["Lake Titicaca", "the Alhambra", "Table Mountain", "the Atomium", "Angkor Wat", "the Matterhorn",
              "Petra", "Uluru", "the Acropolis", "Machu Picchu", "the Little Mermaid statue", "Chichen Itza"]
    relations = ["capital", "official language", "currency", "largest city"]
    items = []
    for i in range(n):
        place, relation = rng.choice(places), rng.choice(relations)
        items.append(PromptItem(
            f"u{i}", f"The {relation} of the country where {place} is located is", rng.choice(["Peru", "Spain"]),
            rng.choice(["Lima", "Madrid", "the euro", "Spanish"]), hop1=f"{place} is located in the country of",
            hop2=f"The {relation} of {rng.choice(['Peru', 'Spain', 'Belgium'])} is",
        ))
    return items


@pytest.mark.slow
def test_lens_on_unseen_prompts_equals_plain_hf_smollm2(smollm2) -> None:
    model, tokenizer = smollm2
    queries = lens_queries(_unseen_items(seed=random.randrange(10**6), n=4))
    batched = lens_batch(NativeHooks(model, tokenizer), queries)
    _compare(batched, queries, {q.key: reference_lens(model, tokenizer, model.model.norm, q) for q in queries})
    # batched with padding == one query at a time
    single = [row for q in queries for row in lens_batch(NativeHooks(model, tokenizer), [q])]
    key = lambda r: (r["prompt_id"], r["prompt_kind"], r["target"], r["layer"])  # noqa: E731
    for a, b in zip(sorted(batched, key=key), sorted(single, key=key)):
        assert key(a) == key(b) and abs(a["rank"] - b["rank"]) <= 1
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
