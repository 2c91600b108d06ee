"""What a report was measured on, in one place for every page and summary: the model, where its weights come from
and in which format (an embedded model's GGUF file and its quantization type, dequantized to fp32), dtype, device,
the prompt set with its sha256, the bridgeprobe version and the command that made the run.

Built from the run's record (``run.json``, or the record a job is about to write): its ``fingerprint``
(:mod:`probes.runs.rundir`) identifies the weights and the prompt files, ``load`` the loading options, ``settings`` the
prompt selection and ``command_line`` the command as typed (runs before it was recorded get one rebuilt from the
fingerprint, marked as such).
"""

from __future__ import annotations

import shlex
from typing import Any, Mapping

NOT_RECORDED = "not recorded"


def _weights(model: str, location: str, identity: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(source, format, quantization type) of the weights the fingerprint's model entry describes; ``location``:
    where ``model`` resolved to when the run started (its file is read from there, whatever the current directory)."""
    from bridgeprobe.probes.model.load import EMBEDDED, gguf_quantization

    if identity.get("embedded") in EMBEDDED or (not identity and model in EMBEDDED):
        name = identity.get("embedded") or model
        entry = EMBEDDED[name]
        quant = gguf_quantization(name)
        description = entry.description
        if quant:  # "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF" -> "SmolLM2-135M-Instruct (Llama)"
            description = description.replace(f", {quant} GGUF", "").replace(f" {quant} GGUF", "")
        return (f"{description}, embedded: the GGUF file in the PyPI package {entry.package}",
                f"GGUF {quant or '(quantization type unknown)'}, dequantized to fp32", quant)
    if "gguf_sha256" in identity or str(model).endswith(".gguf"):
        quant = gguf_quantization(location)
        sha = identity.get("gguf_sha256")
        return (f"GGUF file {location}" + (f" (sha256 {sha[:12]})" if sha else ""),
                f"GGUF {quant or '(quantization type unknown)'}, dequantized to fp32", quant)
    if "directory" in identity:
        files = list(identity.get("files") or {})
        kind = ("safetensors" if any(f.endswith(".safetensors") for f in files) else
                "PyTorch .bin" if any(f.endswith(".bin") for f in files) else "checkpoint files")
        return f"checkpoint directory {identity['directory']}", kind, None
    if "hub" in identity:
        revision = identity.get("revision")
        return (f"Hugging Face hub {identity['hub']}" + (f" (revision {str(revision)[:12]})" if revision else ""),
                "as published on the hub (safetensors)", None)
    return NOT_RECORDED, NOT_RECORDED, None


def _prompt_files(settings: Mapping[str, Any], recorded: list[str] | None) -> tuple[str, list[str]]:
    """The prompt set as named on the command line, and the first 12 hex digits of each file's sha256."""
    names = [str(p) for p in settings.get("prompts") or []]
    shas = [entry.split("sha256=")[-1][:12] for entry in recorded or [] if "sha256=" in entry]
    return (", ".join(names) or NOT_RECORDED), shas


def _rebuilt_command(record: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> str:
    """An equivalent command from the fingerprint, for runs that did not record theirs."""
    command = fingerprint.get("command") or record.get("command")
    if not command:
        return NOT_RECORDED
    settings = record.get("settings") or {}
    words = ["bridgeprobe", str(command), "--model", str(record.get("model"))]
    if settings.get("prompts"):
        words += ["--prompts", *map(str, settings["prompts"])]
    for flag in ("preset", "limit", "sample"):
        if settings.get(flag) is not None:
            words += [f"--{flag}", str(settings[flag])]
    return shlex.join(words) + " (rebuilt from run.json, which has every option)"


def provenance(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the run in ``record`` (run.json's content) measured, on which weights and how it was made (JSON-ready;
    "not recorded" where the record does not say)."""
    fingerprint = record.get("fingerprint") or {}
    load = record.get("load") or {}
    settings = record.get("settings") or {}
    model = str(record.get("model") or NOT_RECORDED)
    location = str(record.get("model_path") or model)
    source, weights_format, quant = _weights(model, location, fingerprint.get("model") or {})
    quantize = load.get("quantize") or fingerprint.get("quantize")
    if quantize:
        weights_format += f", loaded {quantize} with bitsandbytes"
    if fingerprint.get("adapter"):
        source += f", with the LoRA adapter {fingerprint['adapter'].get('directory')}"
    device_map = load.get("device_map") or fingerprint.get("device_map")
    device = load.get("device") or fingerprint.get("device")
    prompts, shas = _prompt_files(settings, fingerprint.get("prompts"))
    versions = record.get("versions") or fingerprint.get("versions") or {}
    architecture = (f"{record['model_class']}, {record['n_layers']} layers"
                    if record.get("model_class") and record.get("n_layers") else NOT_RECORDED)
    return {
        "model": model, "architecture": architecture, "weights_source": source, "weights_format": weights_format,
        "quantization": quant, "dtype": load.get("dtype") or fingerprint.get("dtype") or NOT_RECORDED,
        # runs before placement was recorded: the options say it (none given: the CPU)
        "device": record.get("placement") or device or (f"device_map {device_map}" if device_map else
                                                        "device_map auto" if quantize else "cpu"),
        "prompts": prompts, "prompts_sha256": shas, "n_prompts": settings.get("n_items"),
        "bridgeprobe": versions.get("bridgeprobe") or NOT_RECORDED,
        "command": record.get("command_line") or _rebuilt_command(record, fingerprint),
    }


def provenance_line(found: Mapping[str, Any]) -> str:
    """The provenance as one paragraph of plain text for the top of a page."""
    sha = ", ".join(found.get("prompts_sha256") or []) or NOT_RECORDED
    n = found.get("n_prompts")
    return (f"Measured on {found['model']} ({found['architecture']}); weights: {found['weights_source']} "
            f"({found['weights_format']}); dtype {found['dtype']} on {found['device']}. Prompt set: "
            f"{found['prompts']}{f' ({n:,} items)' if isinstance(n, int) else ''}, sha256 {sha}. "
            f"bridgeprobe {found['bridgeprobe']}; made by: {found['command']}")
