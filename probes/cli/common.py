"""Options shared by the ``bridgeprobe`` subcommands: model, prompts and run flags, and turning them into objects."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from bridgeprobe.probes.model.load import DTYPES, EMBEDDED
from bridgeprobe.probes.runs.pipeline import BACKENDS, ModelOptions
from bridgeprobe.prompts.loaders import PRESETS, load_prompts, parse_columns
from bridgeprobe.prompts.sampling import SAMPLES
from bridgeprobe.prompts.schema import PromptItem

EPILOG = f"""embedded models (no hub needed): {', '.join(f'{k} ({v.description})' for k, v in EMBEDDED.items())}.
Any other MODEL is a local checkpoint directory, a .gguf file, or a hub name."""


def model_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    """The --model ... --trust-remote-code flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help="embedded alias, local directory, .gguf file or hub name"
                            + (f" (default: {default_model})" if default_model else " (required)"))
    group.add_argument("--backend", choices=BACKENDS, default="native",
                       help="hooks: plain PyTorch hooks on the HF modules (default) or TransformerLens TransformerBridge")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    group.add_argument("--device", help="put the whole model on this device (cpu, cuda, cuda:1, ...)")
    group.add_argument("--device-map", help="shard with accelerate instead: auto, balanced, sequential, ...")
    group.add_argument("--max-memory", help='JSON per-device caps for --device-map, e.g. \'{"0": "20GiB", "cpu": "60GiB"}\'')
    group.add_argument("--quantize", choices=("4bit", "8bit"), help="bitsandbytes quantization (GPU hosts)")
    group.add_argument("--offline", action="store_true", help="never contact the model hub")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    group.add_argument("--adapter", metavar="DIR",
                       help="apply a peft (LoRA) adapter saved in DIR (adapter_config.json + "
                            "adapter_model.safetensors), e.g. DIR/adapters/identity_seed0 of a finetune run: merged "
                            "into the weights (kept as LoRA layers on a --quantize model); needs the finetune extra")


def prompt_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The --prompts, --preset, --columns, --limit and --sample flags."""
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts", nargs="+", default=[default] if default else None, required=default is None,
                       help="bundled set name (curated) or JSONL/CSV files (default: %(default)s)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="column mapping for a known external format")
    group.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                       help="column mapping for CSV/JSONL in another format: field=column or field='{col} text'")
    group.add_argument("--limit", type=positive_int,
                       help="use only N items (patch: N pairs), chosen as --sample says; an item's pair partner "
                            "comes along")
    group.add_argument("--sample", choices=SAMPLES, default="stratified",
                       help="how --limit chooses: stratified (default: round-robin over the relation compositions, "
                            "in an order shuffled by --seed) or first (the first N in file order)")


def run_args(parser: argparse.ArgumentParser) -> None:
    """The --batch-size, --all-positions and --seed flags of the lens jobs."""
    parser.add_argument("--batch-size", type=positive_int,
                        help="queries per forward pass (default: as many as fit in half the free GPU memory, halved "
                             "on out-of-memory; 16 on the CPU)")
    parser.add_argument("--all-positions", action="store_true", help="also read out every prompt position")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed recorded in run.json (default 0)")


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound without ``high``), checked at parse time so a
    bad value stops with a one-line message naming the option before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if high is None
                                             else f"must lie in {low}..{high}, got {value}")
        return value

    return parse


def real_number(low: float, high: float | None = None, *, open_low: bool = False,
                open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``low`` to ``high`` (each end included unless
    ``open_low`` / ``open_high``; no upper bound without ``high``), checked at parse time."""
    if high is None:
        wanted = f"must be {'greater than' if open_low else 'at least'} {low:g}"
    else:
        wanted = f"must lie in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = math.isfinite(value) and (value > low if open_low else value >= low) and (
            high is None or (value < high if open_high else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"{wanted}, got {text}")
        return value

    return parse


positive_int = whole_number(1)  # sizes, steps, intervals: --batch-size, --steps, --eval-every, ...
non_negative_int = whole_number(0)  # counts where 0 means none or all (--patch-pairs 0 skips), seeds
positive_float = real_number(0, open_low=True)  # learning rates, init scales
non_negative_float = real_number(0)  # weight decays
fraction = real_number(0, 1)  # shares of a set


def rundir_args(parser: argparse.ArgumentParser) -> None:
    """--overwrite and --recompute: what a rerun into a used output directory does (docs/runs.md)."""
    group = parser.add_argument_group("reruns (an unfinished run with the same settings always resumes)")
    group.add_argument("--overwrite", action="store_true",
                       help="empty the output directory first when it holds another run (default: stop, naming "
                            "the settings that differ)")
    group.add_argument("--recompute", action="store_true",
                       help="run again even when the directory holds this run finished (default: print its "
                            "summary and stop)")


def fingerprint(args: argparse.Namespace, command: str, **options: Any) -> dict[str, Any]:
    """Everything that determines a job's numbers (:mod:`probes.runs.rundir`): the model's identity and loading
    options, the prompt files' content, the prompt selection, the job's own ``options``, seed and versions."""
    from bridgeprobe.probes.runs.rundir import adapter_identity, model_identity, prompt_identity

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    found: dict[str, Any] = {"command": command}
    if hasattr(args, "backend"):  # the model flags of model_args
        found.update(model=model_identity(args.model), dtype=args.dtype, quantize=args.quantize, device=args.device,
                     device_map=args.device_map, max_memory=args.max_memory, backend=args.backend,
                     trust_remote_code=args.trust_remote_code)
        if getattr(args, "adapter", None):  # absent from fingerprints of runs without one, which stay valid
            found.update(adapter=adapter_identity(args.adapter))
    if getattr(args, "prompts", None):
        found.update(prompts=prompt_identity(list(args.prompts)), preset=args.preset, columns=args.columns,
                     limit=args.limit, sample=getattr(args, "sample", None))
    found.update(options=options, seed=getattr(args, "seed", None),
                 versions={name: version(name) for name in ("bridgeprobe", "torch", "transformers")})
    return found


def check_options(args: argparse.Namespace) -> None:
    """Option checks that argparse cannot do, before anything is loaded: the device exists, --max-memory is a
    JSON object of device -> size, the optional package an option needs is installed."""
    import torch

    device = getattr(args, "device", None)
    if device and getattr(args, "device_map", None):
        raise ValueError("pass either --device or --device-map, not both")
    if device:
        try:
            parsed = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps): {err}") from None
        if parsed.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"--device {device}: this torch build or host has no CUDA GPU; use --device cpu")
            if parsed.index is not None and parsed.index >= count:
                raise ValueError(f"--device {device}: there are only {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
        elif parsed.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available on this host; use --device cpu")
    if getattr(args, "max_memory", None):
        parse_max_memory(args.max_memory)
    if getattr(args, "adapter", None):
        from bridgeprobe.probes.model.load import check_adapter

        if getattr(args, "command", None) == "finetune":
            raise ValueError("finetune trains its own adapters on --model; --adapter is for the probing commands")
        check_adapter(args.adapter)
    for module, wanted, extra in (("transformer_lens", getattr(args, "backend", None) == "transformer-lens", "lens"),
                                  ("bitsandbytes", bool(getattr(args, "quantize", None))
                                   or bool({"8bit", "4bit"} & set(getattr(args, "compare", None) or ())), "quant"),
                                  ("peft", getattr(args, "command", None) == "finetune"
                                   or bool(getattr(args, "adapter", None)), "finetune")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(f"{module} is not installed; it comes with the optional '{extra}' extra: "
                             f"pip install -e '.[{extra}]'")


def parse_max_memory(text: str) -> dict[int | str, str | int]:
    """--max-memory: a JSON object of device (GPU index, "cpu", "disk") -> size ("20GiB" or bytes)."""
    shape = 'a JSON object of device -> size, e.g. \'{"0": "20GiB", "cpu": "60GiB"}\''
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--max-memory must be {shape}: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--max-memory must be {shape}, got {text}")
    for key, value in raw.items():
        if not (str(key).isdigit() or key in ("cpu", "disk", "mps")):
            raise ValueError(f"--max-memory: device {key!r} must be a GPU index, \"cpu\" or \"disk\"")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ValueError(f"--max-memory: size of {key!r} must be a string like \"20GiB\" or a byte count")
    return {int(k) if str(k).isdigit() else k: v for k, v in raw.items()}


def load_items(args: argparse.Namespace, paths: Sequence[str] | None = None, limit: int | None = None) -> list[PromptItem]:
    """The prompt items named by the prompt flags (or by ``paths`` with the same column mapping)."""
    columns = parse_columns(args.columns) if args.columns else None
    return load_prompts(paths or args.prompts, columns=columns, preset=args.preset, limit=limit,
                        sample=args.sample, seed=getattr(args, "seed", 0))


def prompt_settings(args: argparse.Namespace) -> dict:
    """The prompt flags as recorded in run.json (enough to reload the same items)."""
    from bridgeprobe.prompts.loaders import BUNDLED

    prompts = [p if p in BUNDLED else str(Path(p).resolve()) for p in map(str, args.prompts)]
    return {"prompts": prompts, "preset": args.preset, "columns": args.columns, "limit": args.limit,
            "sample": args.sample}


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model flags as :class:`~probes.runs.pipeline.ModelOptions`."""
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    offline = args.offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return ModelOptions(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device, device_map=args.device_map,
        max_memory=max_memory, quantize=args.quantize, offline=offline,
        trust_remote_code=args.trust_remote_code, adapter=getattr(args, "adapter", None),
    )


RUNS = Path("runs")  # default output root, git-ignored: a run never writes over the checked-in reports/


def default_out(model: str) -> Path:
    """``runs/<model name>``: where the main job writes its report by default."""
    return RUNS / Path(model.rstrip("/")).name.removesuffix(".gguf")
