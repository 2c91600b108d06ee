"""The few lines every ``bridgeprobe`` command prints when it ends (and keeps in ``run.json`` as ``summary``): what
it found, in numbers with their n and interval, and where the files are. Each function takes what the command
already computed (summary dicts, tables) and returns the lines; nothing here recomputes a result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd


def rate(block: Mapping[str, Any], key: str, with_n: bool = True) -> str:
    """``62.1% [58.4, 65.7] (n=794)`` from the flat ``key``, ``key_ci_low``, ``key_ci_high``, ``key_n`` entries of a
    summary block; ``n/a (reason)`` when there is no value."""
    value = block.get(key)
    if value is None:
        return f"n/a ({block.get(f'{key}_reason') or 'not measured'})"
    low, high, n = block.get(f"{key}_ci_low"), block.get(f"{key}_ci_high"), block.get(f"{key}_n")
    interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None and high is not None else ""
    return f"{100 * value:.1f}%{interval}" + (f" (n={n})" if with_n and n is not None else "")


def files_line(out: Path, names: Iterable[str], check: bool = True) -> str:
    """``Files in DIR/: a, b, c`` for the names that exist (all of them without ``check``; a table kept compressed
    as ``NAME.gz`` by that name). A name with ``*`` is a pattern: every file it matches, sorted, each once."""
    present: list[str] = []
    for name in names:
        if "*" in name:
            found = sorted(p.name for p in out.glob(name) if p.is_file())
        elif not check or (out / name).exists():
            found = [name]
        else:
            found = [f"{name}.gz"] if (out / f"{name}.gz").is_file() else []
        present += [f for f in found if f not in present]
    return f"Files in {out}/: {', '.join(present)}"


def lens_lines(summary: Mapping[str, Any], model: str) -> list[str]:
    """The lens finding (:func:`analyses.findings.lens_finding`), then two lines of headlines
    (:func:`analyses.aggregate.summarize`): accuracy; the bridge against its matched control and the best layer."""
    from bridgeprobe.analyses.findings import lens_finding
    from bridgeprobe.analyses.page import p_value

    acc, bridge = summary["accuracy"], summary["bridge"]
    control, diff = summary.get("control") or {}, summary.get("bridge_minus_control") or {}
    lines = [f"Finding: {lens_finding(summary)}", f"{model}: {summary['n_prompts']} two-hop prompts, {summary['n_layers']} layers. Two-hop accuracy "
             f"{rate(acc, 'two_hop')}; hop1 {rate(acc, 'hop1')}; hop2 {rate(acc, 'hop2')}."]
    if control.get("measured"):
        lines.append(f"Bridge in the top 10 at some layer: {rate(bridge, 'top10_any_layer')}, matched control "
                     f"{rate(control, 'top10_any_layer', False)}, difference {_signed(diff, 'top10_any_layer')} "
                     f"(sign test {p_value(diff.get('top10_any_layer_sign_test_p'))}).")
        best = diff.get("best_layer")
        lines[-1] += (f" Best layer over the control: {best}." if best is not None else
                      f" Best layer: {diff.get('best_layer_note') or 'none'}.")
    else:
        lines.append(f"Bridge in the top 10 at some layer: {rate(bridge, 'top10_any_layer')} (no matched control "
                     f"measured); best layer by top-10 rate {bridge.get('best_layer_by_top10_rate')}.")
    return lines


def _signed(block: Mapping[str, Any], key: str) -> str:
    value = block.get(key)
    if value is None:
        return "n/a"
    low, high = block.get(f"{key}_ci_low"), block.get(f"{key}_ci_high")
    interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None and high is not None else ""
    return f"{100 * value:+.1f} points{interval}"


def patching_lines(frame: pd.DataFrame, label: str, direction: str = "denoise") -> list[str]:
    """Two lines on a patching table: pairs used and kept; per site, the layer with the largest mean recovery at
    the last token (:func:`analyses.patching_report.by_layer`), with its 95% interval."""
    from bridgeprobe.analyses.patching_report import by_layer, kept_pairs

    layers = by_layer(frame, direction)
    n_pairs, n_kept = frame["clean_id"].nunique(), kept_pairs(frame)["clean_id"].nunique()
    if not n_pairs:
        return [f"{label}: no usable pair."]
    head = f"{label}: {n_pairs} pairs, " + ("all kept." if n_kept == n_pairs else
                                           f"{n_kept} kept (the others' clean-corrupted logit gap is too small).")
    peaks = []
    for site, part in layers.dropna(subset=["mean_last"]).groupby("site", sort=False):
        top = part.loc[part["mean_last"].idxmax()]
        interval = f" [{top['ci_low_last']:.2f}, {top['ci_high_last']:.2f}]" if pd.notna(top["ci_low_last"]) else ""
        peaks.append(f"{site} layer {int(top['layer'])}: {top['mean_last']:.2f}{interval}")
    return [head, ("Largest mean recovery at the last token: " + "; ".join(peaks) + ".") if peaks else
            "No pair kept: no recovery to report."]


def memory_lines(summary: Mapping[str, Any]) -> list[str]:
    """The shared-memory finding of ``memory_summary.json`` (:func:`analyses.findings.memory_finding`; the full
    statement with every bound is on the page and in the JSON; summaries written before the finding existed give
    their statement)."""
    return [f"Shared memory: {summary.get('finding') or summary['statement']}"]


PATCH_FILES = ("patching.csv", "patching_layers.csv", "patching_pairs.csv", "patching_cells.csv", "patching_layers.png",
               "patching_*.png", "run.json")
MEMORY_FILES = ("memory.html", "memory.csv", "memory_layers.csv", "memory_cells.csv", "memory_backpatch.csv",
                "memory_summary.json", "memory_layers.png", "memory_crosspatch.png", "memory_backpatch.png", "run.json")
LENS_FILES = ("index.html", "summary.json", "lens.csv", "layers.csv", "prompts.csv", "ranks_by_layer.png",
              "ranks_by_group.png", "bridge_heatmap.png", "attribution.csv", "attribution_pairs.csv",
              "attribution_cells.csv", "attribution_layers.csv", "attribution_layers.png", "attribution_*.png",
              *MEMORY_FILES)


def lens_run_lines(summary: Mapping[str, Any], out: Path, model: str, attribution: pd.DataFrame | None = None,
                   memory: Mapping[str, Any] | None = None) -> list[str]:
    """``bridgeprobe lens`` / ``run`` / ``report``: the lens headlines, one line each for the attribution and
    memory sections when present, and the files."""
    lines = lens_lines(summary, model)
    if attribution is not None:
        lines.append(" ".join(patching_lines(attribution, "Attribution patching")))
    if memory is not None:
        lines += memory_lines(memory)
    return lines + [files_line(out, LENS_FILES)]


def lens_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """The summary of a lens table without writing the report (``bridgeprobe lens`` without ``--report``)."""
    from bridgeprobe.analyses.aggregate import per_layer, per_prompt, summarize

    return summarize(frame, per_layer(frame), per_prompt(frame))


ACCURACY_NAMES = {"ood_two_hop_acc": "OOD two-hop", "id_two_hop_acc": "ID two-hop", "one_hop_acc": "one-hop",
                  "reverse_test_acc": "reversed, never seen (OOD)", "reverse_train_acc": "reversed, trained",
                  "forward_acc": "forward"}


def identity_lines(results: pd.DataFrame, by: str = "condition") -> list[str]:
    """Final accuracies per condition (mean over seeds and grid cells, with their count): OOD, ID and one-hop for
    two-hop runs, the reversed and forward questions for reversal runs."""
    shown = [c for c in ACCURACY_NAMES if c in results]
    lines = []
    for condition, part in results.groupby(by, sort=False):
        rates = [f"{ACCURACY_NAMES[c]}{' accuracy' if n == 0 else ''} {part[c].mean():.1%}" for n, c in enumerate(shown)]
        lines.append(f"{condition}: " + ", ".join(rates)
                     + (f" (mean of {len(part)} runs)" if len(part) > 1 else ""))
    return lines
