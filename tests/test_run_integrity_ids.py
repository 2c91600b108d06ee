"""Ids stay text end to end, and ``report`` re-reads only what its run recorded: prompt ids that pandas would
re-type ("1" vs "01") or read as missing ("NA", "null", "None", "nan") come back from every table exactly as the
prompt file spells them, through lens, patch, memory and the report; an edited prompt file or a cut-short table
stops ``report`` with exit 2 and one line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import place_items, save_tiny_checkpoint
from bridgeprobe.probes.cli import main
from bridgeprobe.probes.io.results import TEXT_COLUMNS, read_table

# eight ids, paired as in place_items (0-1, 2-3, ...): each pair holds two ids that pandas would confuse
IDS = ["1", "01", "NA", "null", "None", "nan", "Zürich/1", "1.0"]


def cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as stop:
        return int(stop.code)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint and the place items renamed to :data:`IDS` (their pair partners too)."""
    path = tmp_path_factory.mktemp("ids")
    save_tiny_checkpoint(path)
    items = place_items()
    rename = {item["id"]: new for item, new in zip(items, IDS)}
    for item in items:
        item["id"], item["pair"] = rename[item["id"]], rename[item["pair"]]
    (path / "prompts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_read_table_keeps_text_columns_as_written_and_reads_numbers() -> None:
    """Against the csv module, which never re-types: every text column equal, numbers and missing values parsed."""
    text = "clean_id,corrupt_id,token,value\n" + "".join(f"{a},{b},{a},{v}\n" for a, b, v in
                                                          zip(IDS, IDS[::-1], ["1.5", "", "nan", "2"] * 2))
    frame = read_table(io.StringIO(text))
    rows = list(csv.DictReader(io.StringIO(text)))
    for column in ("clean_id", "corrupt_id", "token"):
        assert column in TEXT_COLUMNS and frame[column].tolist() == [row[column] for row in rows]
    assert frame["value"].dtype == float and frame["value"].isna().tolist() == [False, True, True, False] * 2


def test_ids_stay_text_through_run_lens_attribution_memory_and_report(ws: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "run"
    assert cli(["run", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
                "--batch-size", "3", "--patch-pairs", "4", "--memory-items", "4", "--memory-map-items", "2"]) == 0
    lens = read_table(out / "lens.csv")
    assert set(lens["prompt_id"]) == set(IDS)
    assert lens.groupby("prompt_id").size().nunique() == 1  # no two ids merged into one
    attribution = read_table(out / "attribution.csv")
    assert set(zip(attribution["clean_id"], attribution["corrupt_id"])) <= {(IDS[i], IDS[i ^ 1]) for i in range(8)}
    assert attribution[["clean_id", "corrupt_id"]].drop_duplicates().shape[0] == 4
    memory = read_table(out / "memory.csv")
    per_item = memory[memory["analysis"] != "alignment"]  # the alignment's set-level rows have no prompt id
    assert set(per_item["prompt_id"]) <= set(IDS) and per_item["prompt_id"].nunique() == 4
    cross = memory[(memory["analysis"] == "crosspatch") & memory["source_layer"].notna()]  # patched cells
    assert set(cross["source_id"]) <= set(IDS) and set(cross["receiving_id"]) <= set(IDS)
    assert not memory[["prompt_id"]].isna().any().any()
    # the alignment's set-level rows (empty id) stay set-level: the memory curves are those of the same table with
    # missing ids, as the analysis built them before ids were read as text (CKA with its interval, not as curves)
    from bridgeprobe.analyses.memory_tables import curves

    as_missing = memory.assign(prompt_id=memory["prompt_id"].replace("", np.nan))
    assert (memory["prompt_id"] == "").sum() > 0
    pd.testing.assert_frame_equal(curves(memory), curves(as_missing))
    assert not curves(memory)["curve"].str.contains("_ci_").any()
    # the report re-reads every table: same ids, and the prompt table of the page shows each one
    assert cli(["report", str(out)]) == 0
    prompts = pd.read_csv(out / "prompts.csv", dtype=str, keep_default_na=False)
    assert set(prompts["prompt_id"]) == set(IDS)


def test_patch_keeps_pairs_whose_ids_look_alike(ws: Path, tmp_path: Path, one_thread) -> None:
    """"1" and "01" are two items: every item is the clean side of one pair (the issue: run.json said 4 pairs, the table 2)."""
    out = tmp_path / "patch"
    assert cli(["patch", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"),
                "--out", str(out), "--site", "resid_pre"]) == 0
    table = read_table(out / "patching.csv")
    pairs = set(zip(table["clean_id"], table["corrupt_id"]))
    assert pairs == {(IDS[i], IDS[i ^ 1]) for i in range(8)}
    assert json.loads((out / "run.json").read_text())["n_pairs"] == 8
    # a rerun into the finished directory reads the same (no re-typing between the run and its rerun)
    assert cli(["patch", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"),
                "--out", str(out), "--site", "resid_pre"]) == 0


def test_report_refuses_an_edited_prompt_file_and_cut_short_tables(ws: Path, tmp_path: Path, one_thread,
                                                                     capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes((ws / "prompts.jsonl").read_bytes())
    out = tmp_path / "run"
    assert cli(["run", "--model", str(ws / "model"), "--prompts", str(prompts), "--out", str(out), "--limit", "4",
                "--batch-size", "3", "--patch-pairs", "2", "--memory-items", "2", "--memory-map-items", "1"]) == 0
    capsys.readouterr()
    original = prompts.read_bytes()
    prompts.write_bytes(original.replace(b'"bridge": "Spain"', b'"bridge": "Italy"'))
    assert original != prompts.read_bytes()
    assert cli(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(prompts) in err and "changed" in err and "--recompute" in err
    prompts.write_bytes(original)
    assert cli(["report", str(out)]) == 0
    for name in ("attribution.csv", "memory.csv"):
        saved = (out / name).read_bytes()
        lines = saved.splitlines(keepends=True)
        (out / name).write_bytes(b"".join(lines[: len(lines) // 2]))
        capsys.readouterr()
        assert cli(["report", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert f"{name} has" in err and err.count("\n") == 1
        (out / name).write_bytes(saved)
    assert cli(["report", str(out)]) == 0
