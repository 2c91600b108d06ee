"""Numbers that cannot drift: every result table the README and docs/ quote is recomputed from the checked-in
report files (summary.json, memory_summary.json, comparison.csv, grid.csv, reports/calibration/) and compared with
the text. The generated tables (analyses/results_tables.py) must equal their blocks verbatim; the prose figures
listed here must be what the files say."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from bridgeprobe.analyses import results_tables

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("page", [p for p in PAGES if results_tables.blocks(_text(p))], ids=lambda p: p.name)
def test_generated_blocks_equal_what_the_reports_say(page: Path) -> None:
    for name, content in results_tables.blocks(_text(page)).items():
        assert content == results_tables.TABLES[name](ROOT / "reports"), (
            f"{page.name}: the {name} table differs from reports/; run python -m bridgeprobe.analyses.results_tables")


def test_the_readme_carries_the_lens_memory_and_lora_tables() -> None:
    assert {"lens", "memory", "lora"} <= set(results_tables.blocks(_text(ROOT / "README.md")))


def test_the_identity_page_carries_the_generated_grid() -> None:
    grid = pd.read_csv(ROOT / "reports" / "identity" / "grid" / "grid.csv")
    block = results_tables.blocks(_text(ROOT / "docs" / "identity.md"))["identity_grid"]
    assert len(block.splitlines()) == 2 + len(grid)  # header, rule, one row per cell


def test_operating_characteristics_table_is_the_checked_in_simulation() -> None:
    """docs/statistics.md quotes reports/calibration/operating_characteristics.md verbatim."""
    made = _text(ROOT / "reports" / "calibration" / "operating_characteristics.md").split("\n\n", 1)[1]
    assert made in _text(ROOT / "docs" / "statistics.md")


def _memory(model: str) -> dict:
    return json.loads(_text(ROOT / "reports" / model / "memory" / "memory_summary.json"))


def test_memory_prose_states_what_the_summaries_decide() -> None:
    """The words docs/memory.md uses for each statement are the summaries' decisions."""
    text = _text(ROOT / "docs" / "memory.md")
    words = {"band": "band", "none": "no band", "undecided": "not enough items to decide"}
    for model, name in results_tables.MODELS.items():
        for position, where in results_tables.POSITIONS.items():
            status = _memory(model)["positions"][position]["status"]
            assert f"{name}, {where}: {words[status]}" in text, (model, position)


def _summary(*parts: str) -> dict:
    return json.loads(_text(ROOT.joinpath("reports", *parts, "summary.json")))


def _rate(block: dict, key: str) -> str:
    return f"{100 * block[key]:.1f}% [{100 * block[f'{key}_ci_low']:.1f}, {100 * block[f'{key}_ci_high']:.1f}]"


def _lens_prose() -> list[str]:
    """The lens figures the README's prose quotes, formatted from the summaries."""
    smol, gemma = _summary("smollm2-135m"), _summary("gemma3-270m")
    htl = [_summary("htl", m) for m in results_tables.MODELS]
    failed, correct = gemma["groups"]["hops_ok_composition_failed"], gemma["groups"]["correct"]
    fisher = gemma["failures_vs_correct"]["bridge_top1_any_layer_fisher_p"]
    ranks = {m: [round(x) for x in s["bridge"]["median_rank_by_layer"]] for m, s in (("s", smol), ("g", gemma))}
    return [
        f"({smol['unambiguous']['n_prompts']} and {gemma['unambiguous']['n_prompts']},",
        f"{_rate(smol['unambiguous']['bridge'], 'top10_any_layer')} and\n{_rate(gemma['unambiguous']['bridge'], 'top10_any_layer')}",
        f"({htl[0]['unambiguous']['n_flagged']} and {htl[1]['unambiguous']['n_flagged']}\nof 750 prompts flagged)",
        f"on the {htl[0]['unambiguous']['n_prompts']} and {htl[1]['unambiguous']['n_prompts']} unambiguous",
        f"{_rate(htl[0]['unambiguous']['bridge'], 'top10_any_layer')} (control 0.0%)",
        f"{_rate(htl[1]['unambiguous']['bridge'], 'top10_any_layer')} (control 0.0%)",
        f"the {failed['n_bridge_is_output']} whose output *is* the bridge",
        f"{_rate(failed, 'bridge_top1_any_layer')} (n = {failed['bridge_top1_any_layer_n']})",
        f"{_rate(correct, 'bridge_top1_any_layer')} of the correct prompts (n = {correct['bridge_top1_any_layer_n']}; "
        f"Fisher's exact test p = {fisher:.2g})",
        f"{ranks['s'][23]:,} at layer 23, {ranks['s'][-1]} at the output",
        f"from {ranks['g'][10]:,} at layer 10 and {ranks['g'][11]:,} at layer 11 to {ranks['g'][12]} at layer 12",
    ]


@pytest.mark.parametrize("quoted", _lens_prose())
def test_readme_lens_prose_quotes_the_summaries(quoted: str) -> None:
    text = re.sub(r"\s+", " ", _text(ROOT / "README.md"))
    assert re.sub(r"\s+", " ", quoted) in text
