"""Write the report of a lens run: tables (CSV), ``summary.json``, PNG plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from analyses import plots
from analyses.aggregate import per_layer, per_prompt, summarize
from probes.results import atomic_write, atomic_write_csv, atomic_write_json
from prompts.schema import PromptItem


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    return frame.to_html(index=False, float_format=lambda x: floatfmt.format(x), border=0, na_rep="")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%}table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:right}
tr:nth-child(even){background:#f4f4f4}code,pre{background:#f4f4f4;padding:2px 4px}pre{white-space:pre-wrap}
.kv td:first-child{text-align:left;font-weight:600}"""


def write_lens_report(frame: pd.DataFrame, items: Sequence[PromptItem], out_dir: Path, run: dict[str, Any],
                      sections: Sequence[tuple[str, str, Sequence[Path]]] = ()) -> dict[str, Any]:
    """Aggregate ``frame`` (lens.csv rows of ``items``) into ``out_dir`` and return the summary. ``sections``
    (title, HTML text, PNG figures) are added to the page after the lens sections."""
    layers = per_layer(frame)
    texts = pd.DataFrame([{"prompt_id": i.id, "two_hop": i.two_hop, "bridge": i.bridge, "answer": i.answer,
                           "composition": i.composition} for i in items])
    prompts = per_prompt(frame).merge(texts, on="prompt_id", how="left")
    summary = {"model": run["model"], **summarize(frame, layers, prompts)}
    atomic_write_csv(out_dir / "layers.csv", layers)
    atomic_write_csv(out_dir / "prompts.csv", prompts)
    atomic_write_json(out_dir / "summary.json", summary)
    name = run["model"]
    figures = [
        plots.rank_curves(layers, out_dir / "ranks_by_layer.png", f"Logit lens, {name}"),
        plots.group_curves(frame, prompts, out_dir / "ranks_by_group.png", f"Two-hop prompt by outcome, {name}"),
        plots.bridge_heatmap(frame, prompts, out_dir / "bridge_heatmap.png", f"Bridge rank per prompt, {name}"),
    ]
    extra = "".join(f"<h2>{html.escape(title)}</h2><p>{text}</p>" + "".join(_img(f, title) for f in pngs)
                    for title, text, pngs in sections)
    atomic_write(out_dir / "index.html", _html(summary, layers, prompts, frame, figures, run, extra))
    return summary


def _html(summary: dict[str, Any], layers: pd.DataFrame, prompts: pd.DataFrame, frame: pd.DataFrame,
          figures: list[Path], run: dict[str, Any], extra: str) -> str:
    acc = summary["accuracy"]
    bridge = summary["bridge"]
    facts = {
        "model": f'{run["model"]} ({run["model_class"]}, {run["n_layers"]} layers)',
        "prompts": f'{summary["n_prompts"]} ({", ".join(run["settings"]["prompts"])})',
        "accuracy (first token, greedy)": f'two-hop {acc["two_hop"]}, hop 1 {acc["hop1"]}, hop 2 {acc["hop2"]}',
        "bridge in top 10 at some layer": f'{bridge["top10_any_layer"]:.1%} of two-hop prompts',
        "bridge top 1 at some layer": f'{bridge["top1_any_layer"]:.1%}',
        "best layer for the bridge": f'{bridge["best_layer_by_top10_rate"]} (top-10 rate {bridge["best_top10_rate"]:.1%})',
        "median bridge peak / answer rise layer": f'{bridge["median_peak_layer"]} / {summary["answer"]["median_rise_layer"]}',
        "timings (s)": ", ".join(f"{k} {v}" for k, v in run["timings"].items()),
        "versions": ", ".join(f"{k} {v}" for k, v in run["versions"].items()),
    }
    groups = pd.DataFrame([{"group": g, **v} for g, v in summary["groups"].items()])
    examples = _examples(frame, prompts)
    two_hop_layers = layers[layers["prompt_kind"] == "two_hop"].pivot(
        index="layer", columns="target", values=["median_rank", "top1_rate", "top10_rate"])
    two_hop_layers.columns = [f"{target} {stat}" for stat, target in two_hop_layers.columns]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>bridgeprobe: {html.escape(run['model'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Where is the bridge entity? {html.escape(run['model'])}</h1>",
        "<p>Logit lens on two-hop prompts: each block's output read through the final norm and unembedding, "
        "scored on the bridge entity (hop 1's result) and the answer. Ranks are 0-based over the vocabulary; "
        "correctness is the model's own greedy first token.</p>",
        "<table class='kv'>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in facts.items()) + "</table>",
        "<h2>Per layer</h2>", _img(figures[0], "median rank and top-10 rate by layer"),
        "<h2>By outcome</h2>", _img(figures[1], "rank by layer split by outcome group"),
        _table(groups, "{:.3g}") if len(groups) else "",
        "<h2>Prompts x layers</h2>", _img(figures[2], "bridge rank heatmap"),
        "<h2>Where the bridge surfaces best</h2>", _table(examples, "{:.3g}"),
        "<h2>Per-layer table (two-hop prompt)</h2>", two_hop_layers.reset_index().to_html(
            index=False, border=0, float_format=lambda x: f"{x:.3g}"),
        extra,
        "<h2>Definitions</h2>", f"<pre>{html.escape(summary['definitions'])}</pre>",
        "<p>Files beside this page: lens.csv (every row), layers.csv, prompts.csv, summary.json, run.json.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _examples(frame: pd.DataFrame, prompts: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """The prompts whose bridge reaches the best rank, with the two-hop text and outcome."""
    best = prompts.sort_values(["bridge_best_rank", "bridge_peak_layer"]).head(n)
    return best[["prompt_id", "two_hop", "bridge", "answer", "group", "bridge_best_rank", "bridge_peak_layer",
                 "answer_final_rank"]]
