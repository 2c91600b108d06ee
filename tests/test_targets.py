"""Target tokens in context (probes.model.targets) for every tokenizer family, against an independent in-context
tokenization (character offsets of the joint text), and the lens/patching/memory/synthetic paths that use them.

The tokenizers are built offline with the ``tokenizers`` library, each laid out as its family's tokenizer.json:
byte-level BPE (GPT-2/Llama-3/Qwen), Llama-2/Mistral/TinyLlama SentencePiece-BPE with a dummy prefix (normalizer
``Prepend('▁')`` + ``Replace(' ', '▁')``, no pre-tokenizer), the same with byte fallback, a Metaspace
pre-tokenizer with ``prepend_scheme="first"``, and Gemma's (spaces to '▁', no dummy prefix)."""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import requires_gemma3, requires_smollm2
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import control_bridges, flag_queries, lens_batch, lens_queries
from bridgeprobe.probes.memory.plans import encode
from bridgeprobe.probes.runs.pipeline import item_pairs
from bridgeprobe.probes.model.targets import target_ids
from bridgeprobe.prompts.schema import PromptItem

CORPUS = [
    "The capital of the country where the Eiffel Tower is located is Paris.",
    "The Eiffel Tower is located in the country of France. The capital of France is Paris.",
    "The capital of the country where the Colosseum is located is Rome. The capital of Italy is Rome.",
    "The Brandenburg Gate is located in the country of Germany. The capital of Germany is Berlin.",
    "The Alhambra is located in the country of Spain. The capital of Spain is Madrid.",
    "The United States and the United Kingdom, Tokyo and Japan, 1984 and 2001.",
    " ".join(chr(c) for c in range(ord("A"), ord("Z") + 1)),  # a '▁X' piece for every initial
] * 4
BYTES = [f"<0x{b:02X}>" for b in range(256)]
FAMILIES = ("byte_level", "llama2", "llama2_byte_fallback", "metaspace_first", "gemma")


@lru_cache(maxsize=None)
def raw_tokenizer(family: str) -> Tokenizer:
    """A small trained tokenizer of ``family`` (module docstring), with a BOS template as the family has."""
    fallback = family == "llama2_byte_fallback"
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=fallback))
    specials = ["<unk>", "<s>", "</s>"] + (BYTES if fallback else [])
    if family == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        alphabet = []
        if family == "metaspace_first":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        else:
            dummy = [normalizers.Prepend("▁")] if family.startswith("llama2") else []
            tok.normalizer = normalizers.Sequence([*dummy, normalizers.Replace(" ", "▁")])
            # trained on words (no merges across '▁'), then run as the family does: no pre-tokenizer
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                            + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=len(specials) + 400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    if family in ("llama2", "llama2_byte_fallback", "gemma"):
        tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if fallback:  # byte pieces are ordinary vocabulary, as in Llama-2's tokenizer.json, not added tokens
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTES]
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def hf_tokenizer(family: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer(family), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def offsets_reference(family: str, prompt: str, target: str) -> list[int]:
    """Independent in-context tokenization: the ids of ``prompt + " " + target`` whose characters reach past the
    prompt (from the raw tokenizer's offsets, no special tokens)."""
    enc = raw_tokenizer(family).encode(prompt + " " + target, add_special_tokens=False)
    return [i for i, (_, end) in zip(enc.ids, enc.offsets) if end > len(prompt)]


CASES = [
    ("The capital of the country where the Eiffel Tower is located is", "Paris"),
    ("The Eiffel Tower is located in the country of", "France"),
    ("The capital of France is", "Paris"),
    ("The Alhambra is located in the country of", "Spain"),
    ("The capital of the country where the Colosseum is located is", "Rome"),
    ("The largest city of the country is", "United Kingdom"),
    ("The year of the event was", "1984"),
    ("The capital of the country where Mount Fuji is located is", "Tokyo"),
    ("The country where Mount Fuji is located is", "Japan"),
    ("The capital of Japan in kanji is", "東京"),
    ("The city of", "Ōsaka"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_target_ids_equal_the_in_context_tokens(family: str) -> None:
    tokenizer = hf_tokenizer(family)
    for prompt, target in CASES:
        ids = target_ids(tokenizer, prompt, target)
        assert ids == offsets_reference(family, prompt, target), (family, prompt, target)
        assert tokenizer.bos_token_id not in ids
        if tokenizer.unk_token_id not in ids:  # characters outside the vocabulary: unknown without byte fallback
            assert tokenizer.decode(ids).strip() == target
        else:
            assert family in ("llama2", "metaspace_first", "gemma")
        # the joint text is exactly the prompt's tokens then the target's
        joint = tokenizer(prompt + " " + target, add_special_tokens=False)["input_ids"]
        assert joint == tokenizer(prompt, add_special_tokens=False)["input_ids"] + ids


def test_the_old_convention_reads_the_whitespace_piece_on_dummy_prefix_tokenizers() -> None:
    """``tokenizer(" " + target)[0]`` is '▁' for every entity under Llama-2-style tokenizers; in context the
    entity's own piece comes first. Byte-level BPE and Gemma's were right before and stay the same."""
    for family in FAMILIES:
        tokenizer = hf_tokenizer(family)
        old = [tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for _, t in CASES]
        new = [target_ids(tokenizer, p, t)[0] for p, t in CASES]
        if family.startswith("llama2"):
            assert {tokenizer.convert_ids_to_tokens(i) for i in old} == {"▁"}
            assert sum(o == n for o, n in zip(old, new)) == sum(t[0] in "東Ō" for _, t in CASES)  # no '▁X' piece
        else:
            assert old == new, family


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.architectures = None
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


ITEMS = [
    PromptItem("a", "The capital of the country where the Eiffel Tower is located is", "France", "Paris", r1="loc",
               r2="capital", hop1="The Eiffel Tower is located in the country of", hop2="The capital of France is",
               pair="b"),
    PromptItem("b", "The capital of the country where the Colosseum is located is", "Italy", "Rome", r1="loc",
               r2="capital", hop1="The Colosseum is located in the country of", hop2="The capital of Italy is",
               pair="a"),
    PromptItem("c", "The capital of the country where the Brandenburg Gate is located is", "Germany", "Berlin",
               r1="loc", r2="capital"),
    PromptItem("d", "The capital of the country where the Alhambra is located is", "Spain", "Madrid", r1="loc",
               r2="capital"),
]


def test_lens_scores_the_in_context_token_on_a_llama2_style_tokenizer() -> None:
    """A tiny Llama with a Llama-2-style tokenizer: every lens query is scored on the token the entity gets after
    the prompt ('▁France'), none on '▁' (the old convention scored all on '▁'); the last layer's logprob is the
    model's own log-softmax there, and the prompt keeps its BOS."""
    tokenizer = hf_tokenizer("llama2")
    model = tiny_llama(len(tokenizer))
    queries = lens_queries(ITEMS, tokenizer)
    rows = lens_batch(NativeHooks(model, tokenizer), queries)
    last = [r for r in rows if r["layer"] == 2]
    assert len(last) == len(queries) == 4 * 3 + 2 * 2  # two-hop bridge/answer/control; hop1/hop2 where present
    space = tokenizer.convert_tokens_to_ids("▁")
    old = [tokenizer(" " + q.target_text, add_special_tokens=False)["input_ids"][0] for q in queries]
    assert sum(t == space for t in old) == len(queries)
    by_key = {(r["prompt_id"], r["prompt_kind"], r["target"]): r for r in last}
    in_context = 0
    for q in queries:
        row = by_key[q.key]
        expected = offsets_reference("llama2", q.prompt, q.target_text)
        in_context += row["token_id"] == expected[0] != space
        assert row["target_token"] == tokenizer.decode(expected[:1]) and row["n_target_tokens"] == len(expected)
        prompt = tokenizer(q.prompt)["input_ids"]
        assert prompt[0] == tokenizer.bos_token_id and row["n_prompt_tokens"] == len(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        assert row["logprob"] == pytest.approx(float(logits.log_softmax(-1)[expected[0]]), abs=1e-4)
    assert in_context == len(queries)


def test_pairs_memory_and_names_use_the_in_context_tokens() -> None:
    """Pair patching, the memory analyses and made-up names under a Llama-2-style tokenizer: the old
    convention gave '▁' for both answers ("same token") and every name."""
    from bridgeprobe.prompts.synthetic import SynthConfig, generate
    from bridgeprobe.prompts.synthetic_text import make_names

    tokenizer = hf_tokenizer("llama2")
    space = tokenizer.convert_tokens_to_ids("▁")
    items = [PromptItem("p", "The capital of France is", "France", "Paris", pair="q"),
             PromptItem("q", "The capital of Italy is", "Italy", "Rome", pair="p")]
    assert {tokenizer(" " + i.answer, add_special_tokens=False)["input_ids"][0] for i in items} == {space}
    pairs, skipped = item_pairs(items, tokenizer)  # the old tokens: "the same token" for every pair
    assert not skipped and len(pairs) == 2
    for named, (clean, corrupt) in zip(pairs, [items, items[::-1]]):
        assert named.pair.clean_answer == offsets_reference("llama2", clean.two_hop, clean.answer)[0]
        assert named.pair.corrupt_answer == offsets_reference("llama2", corrupt.two_hop, corrupt.answer)[0]
        assert named.bridge_token == offsets_reference("llama2", clean.two_hop, clean.bridge)[0]
    enc = encode(tokenizer, ITEMS[0])
    assert (enc.bridge, enc.answer) == (offsets_reference("llama2", ITEMS[0].two_hop, "France")[0],
                                        offsets_reference("llama2", ITEMS[0].two_hop, "Paris")[0])
    assert tokenizer.convert_ids_to_tokens(enc.bridge) == "▁France"
    splits = generate(SynthConfig(n_subjects=12, n_bridges=6, n_objects=6, n_r1=2, n_r2=2))
    names = make_names(splits, seed=0, tokenizer=tokenizer)
    for group, context in ((splits.bridges, "Someone was born in"), (splits.objects, "The mayor of it is")):
        firsts = [target_ids(tokenizer, context, names[e])[0] for e in group]
        assert len(set(firsts)) == len(firsts) and space not in firsts
        assert {tokenizer(" " + names[e], add_special_tokens=False)["input_ids"][0] for e in group} == {space}


def test_fallback_when_the_join_merges_across_the_boundary(caplog: pytest.LogCaptureFixture) -> None:
    """An empty separator merges the prompt's last piece with the target's first: the target's ids start where
    the joint tokenization departs from the prompt's, and a warning says so."""
    tokenizer = hf_tokenizer("byte_level")
    prompt, target = "The capital of Fr", "ance"
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    assert joint[: len(head)] != head  # the case the fallback is for
    with caplog.at_level(logging.WARNING, logger="bridgeprobe.probes.model.targets"):
        ids = target_ids(tokenizer, prompt, target, sep="")
    assert "not a prefix" in caplog.text
    common = next(i for i, (a, b) in enumerate(zip(head, joint)) if a != b)
    assert ids == joint[common:] and tokenizer.decode(ids).endswith("France")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        target_ids(tokenizer, prompt, "", sep="")


def test_controls_without_partners_are_matched_on_frequency_and_never_share_the_first_token() -> None:
    """Hopping Too Late has no pairs: a bridge used by many items gets a control used by about as many (the old
    next-in-sorted-order rule gave frequent bridges rare controls), and never one with the bridge's first token."""
    def item(i: int, bridge: str) -> PromptItem:
        return PromptItem(f"i{i}", f"The capital of the country of citizenship of person {i} is", bridge, "X",
                          r1="citizen", r2="capital")

    bridges = ["United States"] * 6 + ["United Kingdom"] * 5 + ["France"] * 5 + ["Peru"] * 1 + ["Chile"] * 1
    items = [item(i, b) for i, b in enumerate(bridges)]
    controls = control_bridges(items)
    assert controls["i0"] == "France"  # 6 uses: France (5) over Chile/Peru (1); United Kingdom shares " United"
    assert controls["i6"] == "France"  # 5 uses: France (5)
    assert controls["i11"] == "United Kingdom"  # France (5): United Kingdom (5) is the closest after its own
    assert controls["i16"] == "Chile"  # Peru (1): Chile (1), cyclically after Peru
    for i, b in enumerate(bridges):
        assert controls[f"i{i}"].split()[0] != b.split()[0]


def test_flags_and_controls() -> None:
    """target_flags against a direct count over the set, and the control entity: the partner's bridge, else the
    next other bridge of the same composition."""
    tokenizer = hf_tokenizer("llama2_byte_fallback")
    items = ITEMS + [
        PromptItem("e", "The capital of the country where Mount Fuji is located is", "日本", "東京", r1="loc",
                   r2="capital"),
        PromptItem("f", "The largest city of the country where Big Ben is located is", "United Kingdom", "London",
                   r1="loc", r2="largest"),
        PromptItem("g", "The largest city of the country where the Statue of Liberty is located is",
                   "United States", "New York", r1="loc", r2="largest"),
    ]
    # f and g: the other bridge of their composition starts with the same token (" United"), so the control comes
    # from the same r1, the next bridge after their own in sorted order, cyclically
    expected = {"a": "Italy", "b": "France", "c": "Italy", "d": "日本", "e": "France", "f": "日本", "g": "日本"}
    assert control_bridges(items) == expected == control_bridges(items, tokenizer)
    queries = flag_queries(lens_queries(items), tokenizer)
    first = {q.key: target_ids(tokenizer, q.prompt, q.target_text)[0] for q in queries}
    for q in queries:
        flags = set(q.flags.split(";")) - {""}
        starts = {r.target_text for r in queries if first[r.key] == first[q.key]}
        assert ("shared_first_token" in flags) == (len(starts) >= 2), q
        assert ("short_token" in flags) == (len(tokenizer.decode([first[q.key]]).strip()) <= 2), q
        answer = first[(q.prompt_id, "two_hop", "answer")]
        entity = first[(q.prompt_id, "two_hop", "control" if q.target == "control" else "bridge")]
        assert ("same_as_answer" in flags) == (entity == answer), q
    flagged = {q.key: q.flags for q in queries}
    # 日本 and 東京 both start with '▁' then bytes: same first token, whitespace-only
    assert flagged[("e", "two_hop", "bridge")] == "shared_first_token;same_as_answer;short_token"
    assert "shared_first_token" in flagged[("f", "two_hop", "bridge")]  # '▁United'
    assert flagged[("a", "two_hop", "bridge")] == ""
    assert lens_queries(items)[0].flags is None  # without a tokenizer, not computed


@pytest.mark.slow
@pytest.mark.parametrize("alias", [pytest.param("smollm2-135m", marks=requires_smollm2),
                                   pytest.param("gemma3-270m", marks=requires_gemma3)])
def test_real_tokenizers_keep_their_curated_targets(alias: str) -> None:
    """Both embedded models' tokenizers on the curated set: target_ids equal the in-context tokens from the
    offsets, and equal the old ``tokenizer(" " + target)`` ids wherever those were right (byte-level BPE and
    Gemma's have no dummy prefix: every one of them)."""
    from transformers import AutoTokenizer

    from bridgeprobe.probes.model.load import resolve
    from bridgeprobe.prompts.loaders import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(resolve(alias))
    queries = lens_queries(load_prompts("curated"))
    same = 0
    for q in queries:
        ids = target_ids(tokenizer, q.prompt, q.target_text)
        enc = tokenizer(q.prompt + " " + q.target_text, add_special_tokens=False, return_offsets_mapping=True)
        reference = [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end > len(q.prompt)]
        assert ids == reference, q
        same += ids == tokenizer(" " + q.target_text, add_special_tokens=False)["input_ids"]
    assert same == len(queries), f"{len(queries) - same} of {len(queries)} targets change tokens"
