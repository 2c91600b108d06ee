"""LoRA identity fine-tuning: an untrained adapter (B = 0) is the base model exactly, disable_adapter gives the
base model back after training (lens included), tiny runs reduce the loss, a killed run resumes bit-identically,
adapters reload from safetensors, and the QLoRA path trains on a 4-bit model."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, CharTokenizer, requires_smollm2

pytest.importorskip("peft")

from bridgeprobe.probes.identity.finetune import (BASE, FinetuneConfig, accuracy, add_adapter, encode_texts, eval_pairs,
                                                  inner_model, item_scores, load_base, model_state, save_adapter,
                                                  target_loss, train_adapter)
from bridgeprobe.probes.model.targets import target_ids  # noqa: E402
from bridgeprobe.probes.model.hooks import NativeHooks, pad_right  # noqa: E402
from bridgeprobe.probes.readouts.lens import lens_batch, lens_queries  # noqa: E402
from bridgeprobe.prompts.synthetic import SynthConfig, generate, save_splits  # noqa: E402
from bridgeprobe.prompts.synthetic_text import TwoHopTexts, make_names, render_items  # noqa: E402

DATA = SynthConfig(n_subjects=6, n_bridges=3, n_objects=4, n_r1=2, n_r2=2, seed=0)
CONFIG = FinetuneConfig(rank=4, alpha=8, lr=5e-3, steps=8, batch_size=4, warmup=2, eval_every=2,
                        checkpoint_every=4, eval_limit=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama (vocabulary 128: the CharTokenizer's ids) with room for sentence-long inputs. Its output
    head is scaled up: after the final norm, the default 0.02-std head allows only near-uniform predictions, and
    LoRA (on the blocks, not the head) could not lower the loss."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"]()
    config.max_position_embeddings = 256
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.lm_head.weight.data *= 25
    return model.eval().requires_grad_(False)


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    return pad_right([[0, 5, 9, 33, 70, 12], [0, 44, 2]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = _ids()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]


def _task():
    splits = generate(DATA)
    return splits, make_names(splits, seed=0)


def test_untrained_adapter_is_the_base_model_exactly() -> None:
    model = _tiny()
    reference = copy.deepcopy(model)
    peft_model = add_adapter(model, "identity", CONFIG, seed=0)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    assert all(torch.count_nonzero(p) > 0 for p in lora_a)  # a real, randomly initialized adapter
    # B = 0 adds exact zeros to every adapted projection: logits equal plain HF bit for bit (tolerance 0)
    assert torch.equal(_logits(peft_model), _logits(reference))


def test_left_padded_loss_and_accuracy_equal_one_sequence_at_a_time() -> None:
    model = _tiny()
    tokenizer = CharTokenizer()
    pairs = [("The town Ab is called", "Ab"), ("Xy was born in", "Qwerty"), ("The mayor of Q is", "Zed Ko")]
    rows = encode_texts(tokenizer, pairs)
    total, count, greedy = 0.0, 0, []
    with torch.no_grad():
        for ids, labels in rows:  # unpadded, full logits, plain HF
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            picked = [(p - 1, t) for p, t in enumerate(labels) if t != -100]
            total += sum(float(-logits[q].log_softmax(-1)[t]) for q, t in picked)
            count += len(picked)
            greedy.append(int(logits[labels.index(next(t for t in labels if t != -100)) - 1].argmax()))
        batched = float(target_loss(model, rows, pad_id=0, device="cpu"))
    assert batched == pytest.approx(total / count, abs=1e-5)
    first_targets = [labels[labels.index(next(t for t in labels if t != -100))] for _, labels in rows]
    expected = sum(g == t for g, t in zip(greedy, first_targets)) / len(pairs)
    assert accuracy(model, tokenizer, pairs, batch_size=2) == expected


def test_disable_adapter_gives_the_base_model_back_after_training() -> None:
    splits, names = _task()
    tokenizer = CharTokenizer()
    model = _tiny()
    reference = copy.deepcopy(model)
    peft_model = add_adapter(model, "identity", CONFIG, seed=0)
    train_adapter(peft_model, "identity", tokenizer, TwoHopTexts(splits, names), CONFIG, identity=True, seed=0)
    assert (_logits(peft_model) - _logits(reference)).abs().max() > 1e-3  # training changed the adapted model
    with model_state(peft_model, BASE):
        assert torch.equal(_logits(peft_model), _logits(reference))
        # the logit lens through our hooks on the inner model reads the base model too
        queries = lens_queries(render_items(splits, names, ("ood_test",))[:2])
        base_rows = lens_batch(NativeHooks(inner_model(peft_model), tokenizer), queries)
    plain_rows = lens_batch(NativeHooks(reference, tokenizer), queries)
    assert [(r["rank"], r["logit"]) for r in base_rows] == [(r["rank"], r["logit"]) for r in plain_rows]
    adapted_rows = lens_batch(NativeHooks(inner_model(peft_model), tokenizer), queries)
    assert [r["logit"] for r in adapted_rows] != [r["logit"] for r in plain_rows]


def test_tiny_finetuning_reduces_loss_in_both_conditions() -> None:
    splits, names = _task()
    peft_model = _tiny()
    for condition in ("no_identity", "identity"):
        rows = []
        peft_model = add_adapter(peft_model, condition, CONFIG, seed=0)
        final = train_adapter(peft_model, condition, CharTokenizer(), TwoHopTexts(splits, names), CONFIG,
                              identity=condition == "identity", seed=0, on_eval=rows.append)
        assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
        assert rows[-1]["train_loss"] < 0.8 * rows[1]["train_loss"], condition
        assert final == rows[-1]
        # the reported accuracies (greedy next token = the target's first token) written out: one unpadded prompt
        # at a time through the adapted model, no batching, padding or kept-logit slicing
        task = TwoHopTexts(splits, names)
        peft_model.set_adapter(condition)
        peft_model.eval()
        for split, pairs in eval_pairs(task, CONFIG.eval_limit, 0).items():
            hits = 0
            for prompt, target in pairs:
                ids = torch.tensor([CharTokenizer()(prompt)["input_ids"]])
                with torch.no_grad():
                    hits += int(peft_model(input_ids=ids).logits[0, -1].argmax()) == target_ids(CharTokenizer(), prompt, target)[0]
            assert final[f"{split}_acc"] == pytest.approx(hits / len(pairs)), (condition, split)
        peft_model.train()
    assert set(peft_model.peft_config) == {"no_identity", "identity"}


def test_killed_finetuning_resumes_bit_identical(tmp_path: Path) -> None:
    splits, names = _task()
    runs = {}
    for name, interrupt in (("clean", None), ("killed", 6)):
        rows = []
        peft_model = add_adapter(_tiny(), "identity", CONFIG, seed=1)
        kwargs = dict(identity=True, seed=1, checkpoint=tmp_path / f"{name}.pt", on_eval=rows.append)
        if interrupt:
            with pytest.raises(KeyboardInterrupt):  # killed after step 6; the last checkpoint is step 4
                train_adapter(peft_model, "identity", CharTokenizer(), TwoHopTexts(splits, names), CONFIG,
                              interrupt_at=interrupt, **kwargs)
            peft_model = add_adapter(_tiny(), "identity", CONFIG, seed=1)  # a fresh process
        final = train_adapter(peft_model, "identity", CharTokenizer(), TwoHopTexts(splits, names), CONFIG, **kwargs)
        runs[name] = (peft_model, final, rows)
    clean, killed = runs["clean"][0].state_dict(), runs["killed"][0].state_dict()
    for key, value in clean.items():
        assert torch.equal(value, killed[key]), key
    assert runs["clean"][1] == runs["killed"][1]
    by_step = {r["step"]: json.dumps(r) for r in runs["clean"][2]}
    assert [r["step"] for r in runs["killed"][2]] == [0, 2, 4, 6, 6, 8]  # step 6 again after the resume
    assert all(json.dumps(r) == by_step[r["step"]] for r in runs["killed"][2])


def test_adapter_is_saved_as_safetensors_and_reloads(tmp_path: Path) -> None:
    from peft import PeftModel

    splits, names = _task()
    peft_model = add_adapter(_tiny(), "identity", CONFIG, seed=0)
    train_adapter(peft_model, "identity", CharTokenizer(), TwoHopTexts(splits, names), CONFIG, identity=True, seed=0)
    files = save_splits(splits, tmp_path / "data", names)
    path = save_adapter(peft_model, "identity", tmp_path / "adapters", files)
    assert {p.name for p in path.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "synth.json",
                                                "examples.csv"}
    assert json.loads((path / "adapter_config.json").read_text())["r"] == CONFIG.rank
    reloaded = PeftModel.from_pretrained(_tiny(), str(path))
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model), rtol=0, atol=1e-6)


def _tiny_dir(path: Path) -> Path:
    """The tiny Llama saved as a checkpoint directory, with a character-level tokenizer in which a space and a
    capital letter are one token (ids 0-25; the printable characters keep their codes), so the names of the
    synthetic entities get distinct first tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = _tiny()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    capitals = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {chr(i): i for i in range(32, 128)} | {" " + c: i for i, c in enumerate(capitals)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", c) for c in capitals]))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(path)
    return path


def test_finetune_command_writes_the_report_and_resumes_after_a_kill(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    import bridgeprobe.probes.identity.finetune
    from bridgeprobe.probes.cli import main

    model = str(_tiny_dir(tmp_path / "model"))
    args = ["finetune", "--model", model, "--subjects", "10", "--bridges", "4", "--objects", "6", "--r1", "2",
            "--r2", "2", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--checkpoint-every", "2", "--probe-items", "4", "--patch-pairs", "1", "--memory",
            "--seeds", "0", "1", "--eval-items", "8"]
    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    for name in ("metrics.csv", "results.csv", "items.csv", "comparison.csv", "lens_summary.csv", "lens_layers.csv",
                 "learning_curves.png", "index.html", "data/seed0/synth.json", "data/seed1/prompts.jsonl",
                 "adapters/identity_seed0/adapter_config.json", "adapters/identity_seed1/adapter_model.safetensors",
                 "adapters/no_identity_seed0/synth.json", "memory/base/memory.csv", "memory/identity/memory.csv"):
        assert (clean / name).stat().st_size > 0, name
    assert not (clean / "checkpoints").exists()
    adapter_config = json.loads((clean / "adapters" / "identity_seed0" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == model  # as given, not a cache path
    assert not (clean / "adapters" / "README.md").exists()  # peft's model-card template is dropped
    run = json.loads((clean / "run.json").read_text())
    assert [(r["condition"], r["seed"]) for r in run["results"]] == [
        ("no_identity", 0), ("identity", 0), ("no_identity", 1), ("identity", 1)]
    assert all({"ood_two_hop_acc", "id_two_hop_acc", "one_hop_acc"} <= set(r) for r in run["results"])
    results = pd.read_csv(clean / "results.csv")
    assert sorted(zip(results["condition"], results["seed"])) == sorted(
        (c, s) for c in ("base", "no_identity", "identity") for s in (0, 1))
    # results.csv and comparison.csv are both summaries of items.csv (every split, state and seed scored)
    items = pd.read_csv(clean / "items.csv")
    assert items.groupby(["seed", "state", "split"]).size().max() <= 8
    mean = items[(items["state"] == "identity") & (items["seed"] == 1) & (items["split"] == "ood_two_hop")]["entity"]
    row = results[(results["condition"] == "identity") & (results["seed"] == 1)].iloc[0]
    assert row["ood_two_hop_acc"] == pytest.approx(mean.mean())
    comparison = pd.read_csv(clean / "comparison.csv").set_index("split")
    assert comparison.loc["ood_two_hop", "items"] == len(mean) + len(items[
        (items["state"] == "identity") & (items["seed"] == 0) & (items["split"] == "ood_two_hop")])
    summary = pd.read_csv(clean / "lens_summary.csv")
    assert set(zip(summary["state"], summary["split"])) == {(s, p) for s in ("base", "no_identity", "identity")
                                                             for p in ("id_test", "ood_test")}
    patched = summary.dropna(subset=["patching_logit_gap"])
    for row in patched.itertuples():  # the gap column is the patching table's clean minus corrupted metric
        table = pd.read_csv(clean / "patching" / row.state / row.split / "patching.csv")
        gap = (table.groupby("clean_id")["clean_metric"].first() - table.groupby("clean_id")["corrupt_metric"].first())
        assert row.patching_logit_gap == pytest.approx(gap.mean())
    assert len(patched) > 0

    real, calls = bridgeprobe.probes.identity.finetune.train_adapter, []

    def killed_in_second_condition(*a, **kw):
        calls.append(1)
        return real(*a, **kw, interrupt_at=3 if len(calls) == 2 else None)

    monkeypatch.setattr(bridgeprobe.probes.identity.finetune, "train_adapter", killed_in_second_condition)
    # the identity adapter is killed after step 3 (checkpoint: step 2); Ctrl-C is exit 130
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    assert (tmp_path / "killed" / "checkpoints" / "identity_seed0.pt").is_file()
    monkeypatch.setattr(bridgeprobe.probes.identity.finetune, "train_adapter", real)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    for name in ("metrics.csv", "results.csv", "items.csv", "comparison.csv", "lens_summary.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / name), pd.read_csv(clean / name))


def test_reversal_command_scores_the_held_out_reversals(tmp_path: Path) -> None:
    import pandas as pd

    from bridgeprobe.probes.cli import main

    model = str(_tiny_dir(tmp_path / "model"))
    out = tmp_path / "reversal"
    assert main(["finetune", "--model", model, "--task", "reversal", "--pairs", "12", "--relations", "2",
                 "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--steps", "4", "--batch-size", "4",
                 "--eval-every", "2", "--checkpoint-every", "2", "--seeds", "0", "1", "--eval-items", "6",
                 "--identity-of", "everyone", "--out", str(out)]) == 0
    items = pd.read_csv(out / "items.csv")
    assert set(items["split"]) == {"forward", "reverse_train", "reverse_test", "identity"}
    assert set(items["state"]) == {"base", "no_identity", "identity"}
    # the OOD questions are the reversals that were never trained, for each seed's own pairs
    for seed in (0, 1):
        facts = [json.loads(line) for line in (out / "data" / f"seed{seed}" / "reversal.jsonl").open()]
        trained = {f["prompt"] for f in facts if f["split"] in ("forward", "reverse_train")}
        tested = items[(items["seed"] == seed) & (items["split"] == "reverse_test")]
        assert len(tested) > 0 and not set(tested["prompt"]) & trained
        # --identity-of everyone: an identity sentence for every person, the A's and the B's
        named = {f["target"] for f in facts if f["split"] == "identity"}
        forward = [f for f in facts if f["split"] == "forward"]
        assert named == {f["target"] for f in forward} | {f["prompt"].split("'s ")[0] for f in forward}
    assert "reverse_test" in set(pd.read_csv(out / "comparison.csv")["split"])
    assert not (out / "lens").exists()  # the lens reads two-hop prompts; a reversal run has none


class _NoSpaceTokenizer(CharTokenizer):
    """Characters as ids, spaces dropped: a target's tokens after a prompt are exactly its characters, so the
    model's own greedy continuation, decoded, is a target it answers correctly."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return super().__call__(text.replace(" ", ""), add_special_tokens)


def _greedy(model: torch.nn.Module, head: list[int], n: int) -> list[int]:
    """``n`` tokens of plain greedy decoding, one unpadded full forward per token (no generation config)."""
    ids = list(head)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(head):]


def test_item_scores_equal_greedy_generation_one_at_a_time() -> None:
    """Entity-level scores from one left-padded, teacher-forced forward equal plain greedy decoding per prompt."""
    model = _tiny(seed=3)
    tokenizer = _NoSpaceTokenizer()
    pairs = [("The town Ab is called", "Ab"), ("Xy was born in", "Qwerty"), ("The mayor of Q is", "Zed"),
             ("Ab", "b")]
    for prompt, _ in list(pairs):  # the greedy continuations: right by construction, 1 to 3 tokens long
        new = _greedy(model, list(tokenizer(prompt)["input_ids"]), 3)
        for length in (1, 3):
            ids = new[:length]
            if 0 not in ids and 33 not in ids:  # BOS and space do not survive re-tokenization
                pairs.append((prompt, tokenizer.decode(ids)))
    pairs.append((pairs[-1][0], pairs[-1][1] + "q"))  # right first tokens, wrong last one (most likely)
    scores = item_scores(model, tokenizer, pairs, batch_size=3)
    for (prompt, target), (first, entity) in zip(pairs, scores):
        tail = target_ids(tokenizer, prompt, target)
        greedy = _greedy(model, list(tokenizer(prompt)["input_ids"]), len(tail))
        assert entity == (greedy == tail), (prompt, target)
        assert first == (greedy[0] == tail[0])
    assert any(entity for _, entity in scores) and not all(entity for _, entity in scores)


def test_lora_layers_adapts_only_the_last_blocks() -> None:
    model = _tiny()
    n = model.config.num_hidden_layers
    peft_model = add_adapter(model, "identity", FinetuneConfig(rank=4, layers=1), seed=0)
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, _ in peft_model.named_parameters()
               if "lora_A" in name}
    assert adapted == {n - 1}
    splits, names = _task()
    final = train_adapter(peft_model, "identity", CharTokenizer(), TwoHopTexts(splits, names), CONFIG, identity=True,
                          seed=0)
    assert final["step"] == CONFIG.steps
    peft_model = add_adapter(peft_model, "no_identity", FinetuneConfig(rank=4, layers=1), seed=0)  # a second one
    second = {name.split(".lora_A.")[0] for name, _ in peft_model.named_parameters() if ".lora_A.no_identity" in name}
    first = {name.split(".lora_A.")[0] for name, _ in peft_model.named_parameters() if ".lora_A.identity" in name}
    assert second == first and all(f".layers.{n - 1}." in name for name in second)
    with pytest.raises(ValueError, match=f"last {n + 1} blocks"):
        FinetuneConfig(layers=n + 1).lora(_tiny())


def test_finetune_lens_reads_every_state_like_the_lens_command_and_compares_them(tmp_path: Path, capsys) -> None:
    import pandas as pd
    from scipy import stats

    from bridgeprobe.probes.cli import main

    model = str(_tiny_dir(tmp_path / "model"))
    run = tmp_path / "run"
    assert main(["finetune", "--model", model, "--subjects", "10", "--bridges", "4", "--objects", "6", "--r1", "2",
                 "--r2", "2", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--steps", "4", "--batch-size", "4",
                 "--eval-every", "2", "--checkpoint-every", "2", "--probe-items", "2", "--patch-pairs", "0",
                 "--seeds", "0", "1", "--eval-items", "4", "--out", str(run)]) == 0
    out = tmp_path / "lens"
    assert main(["finetune-lens", str(run), "--out", str(out)]) == 0
    # each state equals the lens command on the same prompts with that adapter (merged weights: not bytewise)
    for state, adapter in (("identity", ["--adapter", str(run / "adapters" / "identity_seed1")]), ("base", [])):
        assert main(["lens", "--model", model, *adapter, "--prompts", str(run / "data" / "seed1" / "prompts.jsonl"),
                     "--out", str(tmp_path / f"alone-{state}")]) == 0
        alone = pd.read_csv(tmp_path / f"alone-{state}" / "lens.csv")
        ours = pd.read_csv(out / f"{state}_seed1" / "lens.csv")
        pd.testing.assert_frame_equal(ours[alone.columns], alone, check_exact=False, atol=1e-4)
    base, adapted = (pd.read_csv(out / f"{state}_seed1" / "lens.csv")["prob"] for state in ("base", "identity"))
    assert (base - adapted).abs().max() > 1e-3  # the states differ: the adapter was switched on
    prompts = pd.read_csv(out / "prompts.csv")
    n_items = {s: sum(1 for _ in open(run / "data" / f"seed{s}" / "prompts.jsonl")) for s in (0, 1)}
    assert prompts.groupby(["state", "seed"]).size().to_dict() == {
        (state, s): n_items[s] for state in ("base", "identity", "no_identity") for s in (0, 1)}
    states = pd.read_csv(out / "lens_states.csv").set_index(["state", "split"])
    for (state, split), row in states.iterrows():  # pooled rates and the sign test, recomputed here
        part = prompts[(prompts["state"] == state) & (prompts["split"] == split)]
        bridge, control = (part["bridge_best_rank"] < 10).astype(int), (part["control_best_rank"] < 10).astype(int)
        assert row["items"] == len(part) and row["bridge_top10"] == pytest.approx(bridge.mean())
        diff = bridge - control
        p = stats.binomtest(int((diff > 0).sum()), int((diff != 0).sum())).pvalue if (diff != 0).any() else 1.0
        assert row["bridge - control sign p"] == pytest.approx(p)
    comparison = pd.read_csv(out / "lens_comparison.csv")
    assert set(zip(comparison["measure"], comparison["split"])) == {
        (m, s) for m in ("bridge_top10", "control_top10", "bridge_top10_final", "two_hop_first_token") for s in ("id_two_hop", "ood_two_hop")}
    assert "bridge top 10" in capsys.readouterr().out
    # a second call finds the run finished; a run that is not a finished two-hop finetune run is refused
    assert main(["finetune-lens", str(run), "--out", str(out)]) == 0
    assert main(["finetune-lens", str(out), "--out", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()
