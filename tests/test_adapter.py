"""--adapter: probing a LoRA-adapted model. The loaded model equals peft's own unmerged PeftModel (merged and
unmerged paths), the lens run on it equals the lens on a model with the update folded in by hand, a bad adapter
directory is a one-line exit 2 before any model loads, and a retrained adapter is another run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import save_tiny_checkpoint

pytest.importorskip("peft")

from bridgeprobe.probes.cli import main  # noqa: E402
from bridgeprobe.probes.model.load import ModelLoadError, apply_adapter, check_adapter, load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for the checkpoint in ``model_dir`` with random (not zero) B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(str(model_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    save_tiny_checkpoint(tmp_path)
    _save_adapter(tmp_path / "model", tmp_path / "adapter", seed=1)
    return tmp_path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[3, 7, 11, 2, 9], [5, 5, 1, 8, 4]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("merge", [True, False])
def test_adapted_model_equals_peft_unmerged(workspace: Path, merge: bool) -> None:
    from peft import PeftModel

    reference = PeftModel.from_pretrained(load_model(str(workspace / "model"))[0], str(workspace / "adapter"))
    base = load_model(str(workspace / "model"))[0]
    adapted = apply_adapter(load_model(str(workspace / "model"))[0], workspace / "adapter", merge=merge)
    assert type(adapted) is type(base)  # a plain transformers model: hooks see the usual module tree
    torch.testing.assert_close(_logits(adapted), _logits(reference), rtol=0, atol=1e-5)
    assert (_logits(adapted) - _logits(base)).abs().max() > 1e-2  # the adapter does change the model
    assert not any(p.requires_grad for p in adapted.parameters())


def _fold(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """The LoRA update W + (alpha / r) B A written into the weights by hand, from the safetensors file."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    folded = 0
    for key, a in tensors.items():
        if "lora_A" not in key:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        modules[name].weight.data += scale * b @ a
        folded += 1
    assert folded
    return model


def test_lens_with_adapter_equals_lens_on_hand_folded_weights(workspace: Path) -> None:
    model, _ = load_model(str(workspace / "model"))
    folded = _fold(model, workspace / "adapter")
    folded.save_pretrained(workspace / "folded")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (workspace / "folded" / name).write_bytes((workspace / "model" / name).read_bytes())
    common = ["lens", "--prompts", str(workspace / "prompts.jsonl")]
    assert main([*common, "--model", str(workspace / "model"), "--adapter", str(workspace / "adapter"),
                 "--out", str(workspace / "with_adapter")]) == 0
    assert main([*common, "--model", str(workspace / "folded"), "--out", str(workspace / "by_hand")]) == 0
    assert main([*common, "--model", str(workspace / "model"), "--out", str(workspace / "base")]) == 0
    ours, by_hand, base = (pd.read_csv(workspace / d / "lens.csv") for d in ("with_adapter", "by_hand", "base"))
    pd.testing.assert_frame_equal(ours, by_hand, check_exact=False, atol=1e-4)
    assert not ours.equals(base)
    load = json.loads((workspace / "with_adapter" / "run.json").read_text())["load"]
    assert load["adapter"] == str(workspace / "adapter")


def test_bad_adapter_is_one_line_before_loading(workspace: Path, capsys) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        check_adapter(workspace / "nowhere")
    pickled = workspace / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors.*pickle"):
        check_adapter(pickled)
    code = main(["lens", "--model", str(workspace / "no-model-here"), "--prompts", str(workspace / "prompts.jsonl"),
                 "--adapter", str(pickled), "--out", str(workspace / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "adapter_model.safetensors" in err[0]  # the adapter, not the model
    assert main(["finetune", "--model", str(workspace / "model"), "--adapter", str(workspace / "adapter"),
                 "--out", str(workspace / "ft")]) == 2


def test_retrained_adapter_in_the_same_directory_is_another_run(workspace: Path, capsys) -> None:
    args = ["lens", "--model", str(workspace / "model"), "--prompts", str(workspace / "prompts.jsonl"),
            "--adapter", str(workspace / "adapter"), "--out", str(workspace / "out")]
    assert main(args) == 0
    first = (workspace / "out" / "lens.csv").read_bytes()
    _save_adapter(workspace / "model", workspace / "adapter", seed=2)  # same path, other weights
    capsys.readouterr()
    assert main(args) == 2
    assert "adapter" in capsys.readouterr().err
    assert (workspace / "out" / "lens.csv").read_bytes() == first  # nothing overwritten
