"""Run integrity, second round (issue 26): options are checked at parse time, an adapter for another base model is
a one-line exit 2 before peft loads it, Ctrl-C is one line and exit 130, and the model cache names the damaged
file and what to do, keeps no temporary directory from an interrupted conversion, and a full disk names the file."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bridgeprobe.probes.cli.identity
import bridgeprobe.probes.io.results
from bridgeprobe.probes.cli import main
from conftest import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(capsys: pytest.CaptureFixture) -> str:
    """The one message line on stderr (transformers' loading progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A tiny checkpoint in ``model/`` with ``prompts.jsonl``."""
    save_tiny_checkpoint(tmp_path)
    return tmp_path


@pytest.fixture
def cached_gguf(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A stand-in GGUF file whose conversion cache entry (keyed by its sha256) is the tiny checkpoint, in a cache
    under the test's directory: (the .gguf file, its cache entry)."""
    monkeypatch.setenv("BRIDGEPROBE_CACHE", str(workspace / "cache"))
    gguf = workspace / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    entry = workspace / "cache" / "converted" / hashlib.sha256(gguf.read_bytes()).hexdigest()
    shutil.copytree(workspace / "model", entry)
    (entry / "SOURCE").write_text(f"{gguf}\n")
    return gguf, entry


# -------------------------------------------------------------------------------- options checked at parse time

NO_MODEL = ["--model", "no-model-here"]  # (the old code went on to load it, or trained when the option allowed)
STOP = ["--steps", "0"]  # after the option under test: the old code stopped there instead of training
BAD_OPTIONS = {  # before: ZeroDivisionError (one mid-training), a dropped pair, or a late error naming another option
    "finetune --eval-every 0": (["finetune", *NO_MODEL, "--eval-every", "0"], "argument --eval-every: must be at "
                                                                              "least 1, got 0"),
    "finetune --checkpoint-every 0": (["finetune", *NO_MODEL, "--checkpoint-every", "0"],
                                      "argument --checkpoint-every: must be at least 1, got 0"),
    "reproduce --eval-every 0": (["reproduce", "--eval-every", "0"], "argument --eval-every: must be at least 1"),
    "reproduce --checkpoint-every 0": (["reproduce", "--checkpoint-every", "0", *STOP], "argument --checkpoint-every"),
    "finetune --patch-pairs -1": (["finetune", *NO_MODEL, "--patch-pairs", "-1"],
                                  "argument --patch-pairs: must be at least 0, got -1"),
    "run --patch-pairs -1": (["run", *NO_MODEL, "--patch-pairs", "-1"], "argument --patch-pairs: must be at least 0"),
    "finetune --lr 0": (["finetune", *NO_MODEL, "--lr", "0"], "argument --lr: must be greater than 0, got 0"),
    "reproduce --lr nan": (["reproduce", "--lr", "nan", *STOP], "argument --lr: must be greater than 0, got nan"),
    "reproduce --seeds -1": (["reproduce", "--seeds", "0", "-1", *STOP], "argument --seeds: must be at least 0"),
    "synth --ood-pair-fraction 1.5": (["synth", "--ood-pair-fraction", "1.5"], "argument --ood-pair-fraction: must "
                                                                             "lie in [0, 1], got 1.5"),
    "finetune --reverse-train-fraction 1": (["finetune", *NO_MODEL, "--reverse-train-fraction", "1"],
                                            "argument --reverse-train-fraction: must lie in [0, 1), got 1"),
    "memory --decode-layer -1": (["memory", *NO_MODEL, "--prompts", "p", "--decode-layer", "-1"],
                                 "argument --decode-layer: must be at least 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_number_stops_at_parse_naming_the_option(case: str, tmp_path: Path, capsys) -> None:
    argv, expected = BAD_OPTIONS[case]
    with pytest.raises(SystemExit) as stop:  # at parse: nothing is loaded or written
        main([*argv, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert expected in _one_line(capsys)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- adapter of another base model

def test_adapter_of_another_base_model_is_one_line_before_peft_loads_it(workspace: Path, capsys) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_config(other), config).save_pretrained(workspace / "adapter")
    code = main(["lens", "--model", str(workspace / "model"), "--prompts", str(workspace / "prompts.jsonl"),
                 "--adapter", str(workspace / "adapter"), "--out", str(workspace / "out")])
    line = _one_line(capsys)  # before: RuntimeError, dozens of "size mismatch for ..." lines (exit 1)
    assert code == 2
    assert f"--adapter {workspace / 'adapter'} does not fit this base model" in line and "has shape [4, 64]" in line
    assert not (workspace / "out" / "lens.csv").exists()


# -------------------------------------------------------------------------------- Ctrl-C

def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bridgeprobe.probes.cli.identity, "write_synth", _interrupted)
    try:
        code = main(["synth", "--out", str(tmp_path / "synth")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a KeyboardInterrupt traceback")  # before
    assert code == 130
    assert _one_line(capsys) == "bridgeprobe: interrupted; rerun the same command to resume"
    with pytest.raises(KeyboardInterrupt):  # --debug keeps the traceback
        main(["--debug", "synth", "--out", str(tmp_path / "synth")])


# -------------------------------------------------------------------------------- model cache

@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_damaged_cache_file_names_the_path_and_delete_it(name: str, workspace: Path, cached_gguf, capsys) -> None:
    gguf, entry = cached_gguf
    (entry / name).write_text('{"version": "1.0\x01')  # cut short, with a control character
    code = main(["lens", "--model", str(gguf), "--prompts", str(workspace / "prompts.jsonl"),
                 "--out", str(workspace / "out")])
    line = _one_line(capsys)  # before: "Invalid control character at: line 1 column 17" (tokenizer.json)
    assert code == 2
    assert f"{entry / name} is damaged" in line and f"delete {entry} and rerun the same command" in line


def test_checkpoint_without_tokenizer_files_names_them(workspace: Path, capsys) -> None:
    bare = workspace / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(workspace / "model" / name, bare / name)
    code = main(["lens", "--model", str(bare), "--prompts", str(workspace / "prompts.jsonl"),
                 "--out", str(workspace / "out")])
    line = _one_line(capsys)  # before: a traceback about sentencepiece or tiktoken
    assert code == 2
    assert f"{bare} has no tokenizer files: missing tokenizer.json and tokenizer_config.json" in line
    assert "sentencepiece" not in line


def test_interrupted_conversion_leaves_no_temporary_directory(workspace: Path, monkeypatch) -> None:
    import transformers

    from bridgeprobe.probes.model.load import convert_gguf

    monkeypatch.setenv("BRIDGEPROBE_CACHE", str(workspace / "cache"))
    gguf = workspace / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    tokenizer = transformers.AutoTokenizer.from_pretrained(workspace / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(workspace / "model")
    monkeypatch.setattr(tokenizer, "save_pretrained", _interrupted)  # Ctrl-C after the weights are written
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf)
    assert list((workspace / "cache" / "converted").iterdir()) == []  # before: .tmp-XXXX with model.safetensors


def test_conversion_removes_temporary_directories_of_dead_processes(cached_gguf) -> None:
    from bridgeprobe.probes.model.load import convert_gguf

    gguf, entry = cached_gguf
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    killed = entry.parent / f".tmp-{host}-{dead}-abcd1234"  # a conversion killed with SIGKILL
    running = entry.parent / f".tmp-{host}-{os.getppid()}-efgh5678"  # one still converting
    legacy = entry.parent / ".tmp-ijkl9012"  # unnamed, from before: removed once a day old
    for path in (killed, running, legacy):
        path.mkdir()
        (path / "model.safetensors").write_bytes(bytes(16))
    os.utime(legacy, (time.time() - 2 * 86400,) * 2)
    assert convert_gguf(gguf) == entry
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, running.name])


# -------------------------------------------------------------------------------- disk full

class _FullFile:
    """A file on a full disk: every write fails with ENOSPC, as os.write does (no file name in the error)."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


class _FullDisk:
    """The ``os`` module of probes.io.results on a full disk."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd: int, *args, **kwargs) -> _FullFile:
        return _FullFile(os.fdopen(fd, *args, **kwargs))


def test_disk_full_names_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bridgeprobe.probes.io.results, "os", _FullDisk())
    assert main(["synth", "--out", str(tmp_path / "synth")]) == 2
    line = _one_line(capsys)  # before: "bridgeprobe: error: [Errno 28] No space left on device"
    assert line.startswith(f"bridgeprobe: error: {tmp_path / 'synth'}{os.sep}")
    assert line.endswith(": No space left on device; free some space and rerun the same command to resume")
