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


def _cell(knobs: dict) -> dict:
    grid = pd.read_csv(ROOT / "reports" / "identity" / "grid" / "grid.csv")
    rows = grid[(grid["ood"] == "relation_pair") & (grid["seeds"] == 5)]
    for column, value in knobs.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, knobs
    return rows.iloc[0].to_dict()


def _ood(row: dict) -> str:
    return f"{row['ood_two_hop_acc no_identity mean']:.2f} → {row['ood_two_hop_acc identity mean']:.2f}"


def _identity_prose() -> list[tuple[str, str]]:
    """(page, figure) the identity prose quotes, formatted from grid.csv and reports/identity/scratch-analysis/."""
    wd0 = _cell({"weight_decay": 0.0, "init_scale": 1.0, "two_hop_training": True, "identity_coverage": 1.0})
    wd1 = _cell({"weight_decay": 1.0, "init_scale": 1.0, "two_hop_training": True, "identity_coverage": 1.0})
    one_hop = _cell({"weight_decay": 1.0, "init_scale": 1.0, "two_hop_training": False})
    one_hop_wd0 = _cell({"weight_decay": 0.0, "init_scale": 1.0, "two_hop_training": False})
    one_hop_wd01 = _cell({"weight_decay": 0.1, "init_scale": 1.0, "two_hop_training": False})
    shares = {share: _cell({"weight_decay": 1.0, "init_scale": 1.0, "identity_coverage": share})["ood_two_hop_acc identity mean"]
              for share in (0.25, 0.5, 0.75)}
    small_init = _cell({"weight_decay": 0.0, "init_scale": 0.3, "two_hop_training": True, "identity_coverage": 1.0})
    small_init_wd = _cell({"weight_decay": 0.1, "init_scale": 0.3, "two_hop_training": True, "identity_coverage": 1.0})
    wd001 = _cell({"weight_decay": 0.01, "init_scale": 1.0, "two_hop_training": True, "identity_coverage": 1.0})
    small_init_more = {wd: _cell({"weight_decay": wd, "init_scale": 0.3, "two_hop_training": True, "identity_coverage": 1.0})
                       for wd in (0.01, 1.0)}
    patch = pd.read_csv(ROOT / "reports" / "identity" / "scratch-analysis" / "crosspatch_summary.csv")
    paper = patch[(patch["split"] == "ood_test") & (patch["source_layer"] == 2) & (patch["target_layer"] == 0)]
    transfer = {(r["weight_decay"], r["init_scale"], "one_hop_only" in r["cell"], r["identity_coverage"]):
                f"{r['transfer no_identity']:.2f} → {r['transfer identity']:.2f}" for r in paper.to_dict("records")}

    def delta(row: dict) -> str:
        return (f"{row['ood_two_hop_acc delta mean']:+.2f} [{row['ood_two_hop_acc delta ci_low']:+.2f}, "
                f"{row['ood_two_hop_acc delta ci_high']:+.2f}]").replace("-", "−")

    docs = [f"weight decay 0: {_ood(wd0)}, {delta(wd0)}, {wd0['ood_two_hop_acc identity higher']} seeds higher",
            f"weight decay 1: {_ood(wd1)}, {delta(wd1)}, {wd1['ood_two_hop_acc identity higher']}",
            f"weight decay 0: {transfer[(0.0, 1.0, False, 1.0)]}", f"weight decay 1: {transfer[(1.0, 1.0, False, 1.0)]}",
            f"weight decay 0, init 0.3: {transfer[(0.0, 0.3, False, 1.0)]}",
            f"weight decay 0.1, init 0.3: {transfer[(0.1, 0.3, False, 1.0)]}",
            f"weight decay 0.01: {transfer[(0.01, 1.0, False, 1.0)]}", f"weight decay 0.01: {_ood(wd001)}, {delta(wd001)}",
            f"weight decay 0.01, init 0.3: {transfer[(0.01, 0.3, False, 1.0)]}",
            f"weight decay 1, init 0.3: {transfer[(1.0, 0.3, False, 1.0)]}",
            *[f"init 0.3 at weight decay {wd:g}: {_ood(row)}, {delta(row)}" for wd, row in small_init_more.items()],
            f"one-hop only: {transfer[(1.0, 1.0, True, 1.0)]}", f"{_ood(one_hop)}, {delta(one_hop)}",
            f"one-hop only, weight decay 0: {transfer[(0.0, 1.0, True, 1.0)]}",
            f"weight decay 0: {_ood(one_hop_wd0)}, {delta(one_hop_wd0)}, {one_hop_wd0['ood_two_hop_acc identity higher']}",
            f"one-hop only, weight decay 0.1: {transfer[(0.1, 1.0, True, 1.0)]}",
            f"weight decay 0.1: {_ood(one_hop_wd01)}, {delta(one_hop_wd01)}, {one_hop_wd01['ood_two_hop_acc identity higher']}",
            f"→ {shares[0.25]:.2f} (25% of the bridges) → {shares[0.5]:.2f} (50%) → {shares[0.75]:.2f} (75%)",
            f"init 0.3 at weight decay 0: {_ood(small_init)}, {delta(small_init)}",
            f"init 0.3 at weight decay 0.1: {_ood(small_init_wd)}, {delta(small_init_wd)}"]
    readme = [f"{_ood(wd0)} at weight decay 0", f"{_ood(wd1)} at weight decay 1",
              f"{transfer[(0.0, 1.0, False, 1.0)].replace('0.', '').replace(' → ', '% → ')}% of items",
              f"({shares[0.25]:.2f}, {shares[0.5]:.2f}, {shares[0.75]:.2f})"]
    return [("docs/identity.md", q) for q in docs] + [("README.md", q) for q in readme]


@pytest.mark.parametrize("page,quoted", _identity_prose())
def test_identity_prose_quotes_the_grid_and_the_analyses(page: str, quoted: str) -> None:
    text = re.sub(r"\s+", " ", _text(ROOT / page))
    assert re.sub(r"\s+", " ", quoted) in text
