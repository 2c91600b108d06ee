"""Incremental, resumable result files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridgeprobe.probes.io.results import IncrementalCSV, ResumeMismatch


def test_resume_skips_done_rows_and_cuts_an_uncommitted_tail(tmp_path: Path) -> None:
    store = IncrementalCSV(tmp_path, "t", ["key", "value"], {"a": 1})
    store.append([{"key": "x", "value": 1}, {"key": "y", "value": 2}])
    with store.partial.open("a") as fh:  # a batch killed half-way through its write
        fh.write("z,3\nw,")
    resumed = IncrementalCSV(tmp_path, "t", ["key", "value"], {"a": 1})
    assert resumed.done(["key"]) == {("x",), ("y",)}
    resumed.append([{"key": "z", "value": 3}])
    frame = resumed.finish(sort_by=["key"])
    assert frame.to_dict("records") == [{"key": "x", "value": 1}, {"key": "y", "value": 2}, {"key": "z", "value": 3}]
    assert (tmp_path / "t.csv").exists() and not store.partial.exists()


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    IncrementalCSV(tmp_path, "t", ["key"], {"a": 1}).append([{"key": "x"}])
    with pytest.raises(ResumeMismatch, match="other settings"):
        IncrementalCSV(tmp_path, "t", ["key"], {"a": 2})
