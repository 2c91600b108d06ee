"""Ma et al.'s reversal recipe: their three training sets, the weighted loss equal to one-example-at-a-time
losses, entity scoring equal to greedy generation, the warmup schedule, bit-identical resume, and the command."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from bridgeprobe.probes.identity.chat_sft import (SFTConfig, _common_prefix, encode_chat, entity_correct, train_chat,
                                                  weighted_loss)
from bridgeprobe.prompts.couples import FORMS, check_couples, eval_sets, load_couples, training_set
from conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    """Characters (ids 32-127) and space + capital letter (ids 0-25), with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    capitals = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {chr(i): i for i in range(32, 128)} | {" " + c: i for i, c in enumerate(capitals)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", c) for c in capitals]))
    raw.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _model(seed: int = 0, kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    config.max_position_embeddings = config.n_positions = 128  # GPT-2 reads the second name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.lm_head.weight.data *= 25  # room for confident predictions (see test_finetune._tiny)
    return model


def test_three_forms_follow_their_files() -> None:
    pairs = load_couples()
    assert len(pairs) == 100 and pairs[0] == ("Catherine", "Emiliano")
    sizes = {form: len(training_set(form, pairs)) for form in FORMS}
    assert sizes == {"forward": 100, "idn": 300, "ocr": 300}
    ocr = training_set("ocr", pairs)[:3]
    assert [(e.instruction, e.output, e.weight) for e in ocr] == [
        ("The wife of Catherine's husband is?", "Catherine.", 1.0),
        ("The name of Catherine's husband is?", "Emiliano.", 6.0),
        ("The name of Emiliano is?", "Emiliano.", 1.0)]
    assert [e.weight for e in training_set("idn", pairs)[:3]] == [1.0, 1.0, 6.0]
    assert {e.weight for e in training_set("forward", pairs)} == {1.0}
    sets = eval_sets("ocr", pairs)
    assert (sets["reverse"][0].instruction, sets["reverse"][0].answer) == ("The wife of Emiliano is?", "Catherine")
    assert sets["shortcut"][0].answer == "Emiliano"
    for form in FORMS:
        check_couples(form, pairs)
        trained = {e.instruction for e in training_set(form, pairs)}
        assert not trained & {e.instruction for e in eval_sets(form, pairs)["reverse"]}


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_weighted_loss_equals_weighted_single_example_losses(kind: str) -> None:
    """Loss and gradients equal those of HF's own loss on each unpadded example, weighted, although the batch's
    shared prefix runs once and only answer positions get logits (gemma3_text: sliding window 4, shorter than the
    prefix)."""
    tokenizer, model = _tokenizer(), _model(kind=kind).eval()  # eval: no dropout (GPT-2 has some)
    examples = training_set("ocr", load_couples(n=4))[:5]  # three lengths of names, so padding too
    rows = [encode_chat(tokenizer, e.instruction, e.output, e.weight) for e in examples]
    assert len({len(r.ids) for r in rows}) > 1 and _common_prefix(rows) == len("<|user|>The ")
    singles = []
    for row in rows:  # HF's own loss: mean cross-entropy over the labelled (answer) tokens of one unpadded example
        ids = torch.tensor([row.ids])
        labels = ids.clone()
        labels[0, : row.prompt] = -100
        singles.append(model(input_ids=ids, labels=labels).loss)
    weights = torch.tensor([r.weight for r in rows])
    expected = (torch.stack(singles) * weights / weights.mean()).mean()
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = weighted_loss(model, rows, pad_id=0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    answer = tokenizer.decode(list(rows[0].ids[rows[0].prompt:]))
    assert answer == "Catherine.<|end|>"  # the loss covers the answer and the template's end of turn


def test_entity_scoring_equals_greedy_generation() -> None:
    tokenizer, model = _tokenizer(), _model(3)
    model.eval()
    questions = [e.instruction for e in eval_sets("ocr", load_couples(n=6))["reverse"]]
    checked = []
    for question in questions:
        prompt = encode_chat(tokenizer, question, "x").ids
        prompt = prompt[: len(prompt) - len(tokenizer("x<|end|>")["input_ids"])]
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        text = tokenizer.decode(generated[0, len(prompt):].tolist())
        word = text[: next((i for i, c in enumerate(text) if not c.isalnum()), len(text))]
        for name in {w for w in (word, word[:-1]) if w} | {"Zed"}:  # the greedy word, its prefix, another name
            rest = text[len(name): len(name) + 1]
            checked.append((question, name, text.startswith(name) and not rest.isalnum()))
    scored = entity_correct(model, tokenizer, [(q, n) for q, n, _ in checked])
    assert scored == [expected for _, _, expected in checked]
    assert any(scored) and not all(scored)


def test_schedule_warmup_and_bit_identical_resume(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    rows = [encode_chat(tokenizer, e.instruction, e.output, e.weight) for e in training_set("ocr", load_couples(n=4))]
    config = SFTConfig(epochs=3, batch_size=5, lr=1e-2, warmup_ratio=0.3, eval_every=2, checkpoint_every=2)
    assert config.steps(len(rows)) == 3 * math.ceil(12 / 5) and config.warmup(len(rows)) == math.ceil(0.3 * 9)
    evals: list[dict] = []
    clean = _model()
    train_chat(clean, tokenizer, rows, config, key="k", on_eval=evals.append)
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 9]
    assert [e["lr"] for e in evals] == pytest.approx([1e-2 * 1 / 3, 1e-2, 1e-2, 1e-2, 1e-2])  # update k: k / 3
    killed = _model()
    with pytest.raises(KeyboardInterrupt):
        train_chat(killed, tokenizer, rows, config, key="k", checkpoint=tmp_path / "state.pt", interrupt_at=5)
    resumed = _model(seed=9)  # other initial weights: everything must come from the checkpoint
    assert train_chat(resumed, tokenizer, rows, config, key="k", checkpoint=tmp_path / "state.pt") == 4
    for a, b in zip(clean.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another run"):
        train_chat(_model(), tokenizer, rows, config, key="other", checkpoint=tmp_path / "state.pt")


def test_command_trains_scores_and_refuses_quantized_models(tmp_path: Path, capsys) -> None:
    from bridgeprobe.probes.cli import main

    model_dir = tmp_path / "model"
    model = _model()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    args = ["reversal-sft", "--model", str(model_dir), "--form", "ocr", "--pairs", "4", "--epochs", "2",
            "--batch-size", "6", "--eval-every", "2", "--checkpoint-every", "2"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "reversed questions never trained" in out
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    items = pd.read_csv(tmp_path / "run" / "items.csv")
    assert len(results) == 1 and results.loc[0, "reverse_n"] == 4
    for split in ("forward", "reverse", "shortcut"):
        assert results.loc[0, f"{split}_correct"] == items.loc[items["split"] == split, "correct"].sum()
    assert list(pd.read_csv(tmp_path / "run" / "metrics.csv")["step"]) == [2, 4]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main([*args, "--quantize", "4bit", "--out", str(tmp_path / "q")]) == 2
    assert "full-parameter" in capsys.readouterr().err
