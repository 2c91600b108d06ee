"""Options shared by the ``bridgeprobe`` subcommands: model, prompts and run flags, and turning them into objects."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from probes.models import DTYPES, EMBEDDED
from probes.pipeline import BACKENDS, ModelOptions
from prompts.loaders import PRESETS, load_prompts, parse_columns
from prompts.schema import PromptItem

EPILOG = f"""embedded models (no hub needed): {', '.join(f'{k} ({v.description})' for k, v in EMBEDDED.items())}.
Any other MODEL is a local checkpoint directory, a .gguf file, or a hub name."""


def model_args(parser: argparse.ArgumentParser, default_model: str | None) -> None:
    """The --model ... --trust-remote-code flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help=f"embedded alias, local directory, .gguf file or hub name (default: {default_model})")
    group.add_argument("--backend", choices=BACKENDS, default="native",
                       help="hooks: plain PyTorch hooks on the HF modules (default) or TransformerLens TransformerBridge")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    group.add_argument("--device", help="put the whole model on this device (cpu, cuda, cuda:1, ...)")
    group.add_argument("--device-map", help="shard with accelerate instead: auto, balanced, sequential, ...")
    group.add_argument("--max-memory", help='JSON per-device caps for --device-map, e.g. \'{"0": "20GiB", "cpu": "60GiB"}\'')
    group.add_argument("--quantize", choices=("4bit", "8bit"), help="bitsandbytes quantization (GPU hosts)")
    group.add_argument("--offline", action="store_true", help="never contact the model hub")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")


def prompt_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The --prompts, --preset, --columns and --limit flags."""
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts", nargs="+", default=[default] if default else None, required=default is None,
                       help="bundled set name (curated) or JSONL/CSV files (default: %(default)s)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="column mapping for a known external format")
    group.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                       help="column mapping for CSV/JSONL in another format: field=column or field='{col} text'")
    group.add_argument("--limit", type=int, help="use only the first N items (patch: the first N pairs)")


def run_args(parser: argparse.ArgumentParser) -> None:
    """The --batch-size, --all-positions and --seed flags of the lens jobs."""
    parser.add_argument("--batch-size", type=int,
                        help="queries per forward pass (default: as many as fit in half the free GPU memory, halved "
                             "on out-of-memory; 16 on the CPU)")
    parser.add_argument("--all-positions", action="store_true", help="also read out every prompt position")
    parser.add_argument("--seed", type=int, default=0, help="random seed recorded in run.json (default 0)")


def load_items(args: argparse.Namespace, paths: Sequence[str] | None = None, limit: int | None = None) -> list[PromptItem]:
    """The prompt items named by the prompt flags (or by ``paths`` with the same column mapping)."""
    columns = parse_columns(args.columns) if args.columns else None
    return load_prompts(paths or args.prompts, columns=columns, preset=args.preset, limit=limit)


def prompt_settings(args: argparse.Namespace) -> dict:
    """The prompt flags as recorded in run.json (enough to reload the same items)."""
    return {"prompts": [str(p) for p in args.prompts], "preset": args.preset, "columns": args.columns,
            "limit": args.limit}


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model flags as :class:`~probes.pipeline.ModelOptions`."""
    max_memory = None
    if args.max_memory:
        try:
            raw = json.loads(args.max_memory)
        except json.JSONDecodeError as err:
            raise ValueError(f"--max-memory must be a JSON object: {err}") from err
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in raw.items()}
    return ModelOptions(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device, device_map=args.device_map,
        max_memory=max_memory, quantize=args.quantize, offline=args.offline,
        trust_remote_code=args.trust_remote_code,
    )


def default_out(model: str) -> Path:
    """``reports/<model name>``: where the main job writes its report."""
    return Path("reports") / Path(model.rstrip("/")).name.removesuffix(".gguf")
